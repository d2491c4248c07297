"""Scanning JSON that may be cut off anywhere (a model's output while it streams)."""

from __future__ import annotations

import json
import re

from pagedllm.entrypoints.openai.tool_parsers.base import ParsedToolCall

_NAME = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')


def value_end(text: str, start: int) -> int | None:
    """End (exclusive) of the JSON value starting at `text[start]` (after whitespace), or None
    if the text stops before it ends. Scalars end at the next delimiter."""
    i, n = start, len(text)
    while i < n and text[i].isspace():
        i += 1
    if i >= n:
        return None
    if text[i] not in "{[\"":
        j = i
        while j < n and text[j] not in ",}] \n\t\r":
            j += 1
        return j if j < n else None
    depth, in_str, esc = 0, False, False
    for j in range(i, n):
        c = text[j]
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
                if depth == 0:
                    return j + 1
        elif c == '"':
            in_str = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return j + 1
    return None


def partial_call(body: str, args_keys: tuple[str, ...] = ("arguments", "parameters")
                 ) -> ParsedToolCall | None:
    """A call from a (possibly cut-off) `{"name": ..., "arguments": {...}}` object: None
    until its name is complete; `arguments` is the raw text of the value so far."""
    m = _NAME.search(body)
    if m is None:
        return None
    name = json.loads(f'"{m.group(1)}"')
    keys = "|".join(map(re.escape, args_keys))
    a = re.search(rf'"(?:{keys})"\s*:\s*', body)
    if a is None:
        return ParsedToolCall(name, "", complete=False)
    start = a.end()
    end = value_end(body, start)
    if end is None:
        return ParsedToolCall(name, body[start:].rstrip(), complete=False)
    return ParsedToolCall(name, body[start:end].strip(), complete=True)


def complete_call(body: str, args_keys: tuple[str, ...] = ("arguments", "parameters")
                  ) -> ParsedToolCall | None:
    """A call from a whole JSON object, or None if it is not one; arguments re-serialised
    only when the model wrote them as a JSON string."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    call = partial_call(body, args_keys)
    if call is None:
        return None
    args = next((obj[k] for k in args_keys if k in obj), {})
    if isinstance(args, str):  # some models quote the arguments
        call.arguments = args
    elif not call.arguments:
        call.arguments = json.dumps(args)
    call.complete = True
    return call
