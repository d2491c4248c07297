"""Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`, or the newer
`[TOOL_CALLS]name[ARGS]{...}` (one call per marker)."""

from __future__ import annotations

from pagedllm.entrypoints.openai.tool_parsers.base import (
    ParsedToolCall,
    ToolParser,
    hold_back_marker,
    register_tool_parser,
)
from pagedllm.entrypoints.openai.tool_parsers.json_scan import (
    complete_call,
    partial_call,
    value_end,
)

MARKER, ARGS = "[TOOL_CALLS]", "[ARGS]"


def _array_calls(body: str, final: bool) -> list[ParsedToolCall]:
    calls: list[ParsedToolCall] = []
    pos = body.find("[") + 1
    while 0 < pos < len(body):
        while pos < len(body) and body[pos] in " \n\t,":
            pos += 1
        if pos >= len(body) or body[pos] != "{":
            break
        end = value_end(body, pos)
        call = complete_call(body[pos:end]) if end is not None else (
            complete_call(body[pos:]) if final else partial_call(body[pos:]))
        if call is not None:
            calls.append(call)
        if end is None:
            break
        pos = end
    return calls


def _named_call(segment: str, final: bool) -> ParsedToolCall | None:
    name, sep, args = segment.partition(ARGS)
    if not sep:
        return None
    args = args.strip()
    end = value_end(args, 0) if args else None
    if end is None:
        return None if final or not args else ParsedToolCall(name.strip(), args, complete=False)
    return ParsedToolCall(name.strip(), args[:end], complete=True)


@register_tool_parser("mistral")
class MistralToolParser(ToolParser):
    start_markers = (MARKER,)
    keep_special_tokens = True  # [TOOL_CALLS] is a special token

    def parse(self, text: str, final: bool) -> tuple[str, list[ParsedToolCall]]:
        first = text.find(MARKER)
        if first < 0:
            return (text if final else hold_back_marker(text, self.start_markers)), []
        content = text[:first]
        segments = text[first:].split(MARKER)[1:]
        calls: list[ParsedToolCall] = []
        for seg in segments:
            if seg.lstrip().startswith("["):
                calls.extend(_array_calls(seg, final))
            else:
                call = _named_call(seg, final)
                if call is not None:
                    calls.append(call)
        return content, calls
