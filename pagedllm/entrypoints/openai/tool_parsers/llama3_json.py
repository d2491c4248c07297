"""Llama 3.1/3.2 JSON tool calls: the output is `{"name": ..., "parameters": {...}}`
(optionally after `<|python_tag|>`), several separated by `;`."""

from __future__ import annotations

from pagedllm.entrypoints.openai.tool_parsers.base import (
    ParsedToolCall,
    ToolParser,
    register_tool_parser,
)
from pagedllm.entrypoints.openai.tool_parsers.json_scan import (
    complete_call,
    partial_call,
    value_end,
)

TAG = "<|python_tag|>"


@register_tool_parser("llama3_json")
class Llama3JsonToolParser(ToolParser):
    def parse(self, text: str, final: bool) -> tuple[str, list[ParsedToolCall]]:
        body = text.lstrip()
        if not body or (not final and TAG.startswith(body)):
            return ("" if not final else text), []  # undecided yet
        if body.startswith(TAG):
            body = body[len(TAG):].lstrip()
        if not body.startswith("{"):
            return text, []
        calls: list[ParsedToolCall] = []
        pos = 0
        while pos < len(body):
            end = value_end(body, pos)
            if end is None:
                call = complete_call(body[pos:]) if final else partial_call(body[pos:])
                if call is None and final:
                    return text, []
                if call is not None:
                    calls.append(call)
                break
            call = complete_call(body[pos:end])
            if call is None:
                return (text, []) if final else ("", calls)
            calls.append(call)
            rest = body[end:].lstrip()
            if not rest.startswith(";"):
                break
            pos = len(body) - len(rest) + 1
            while pos < len(body) and body[pos].isspace():
                pos += 1
        return "", calls
