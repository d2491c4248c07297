"""Hermes / Qwen2.5 / Qwen3: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`."""

from __future__ import annotations

from pagedllm.entrypoints.openai.tool_parsers.base import (
    ParsedToolCall,
    ToolParser,
    hold_back_marker,
    register_tool_parser,
)
from pagedllm.entrypoints.openai.tool_parsers.json_scan import complete_call, partial_call

START, END = "<tool_call>", "</tool_call>"


@register_tool_parser("hermes")
class HermesToolParser(ToolParser):
    start_markers = (START,)

    def parse(self, text: str, final: bool) -> tuple[str, list[ParsedToolCall]]:
        first = text.find(START)
        if first < 0:
            return (text if final else hold_back_marker(text, self.start_markers)), []
        content = text[:first]
        calls: list[ParsedToolCall] = []
        pos = first
        while pos >= 0:
            body_start = pos + len(START)
            end = text.find(END, body_start)
            body = text[body_start:] if end < 0 else text[body_start:end]
            call = complete_call(body.strip()) if end >= 0 or final else partial_call(body)
            if call is not None:
                calls.append(call)
            if end < 0:
                break
            pos = text.find(START, end + len(END))
        return content, calls
