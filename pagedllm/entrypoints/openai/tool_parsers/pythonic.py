"""Pythonic tool calls (Llama 3.2/4 style): `[get_weather(city="Paris"), ping()]`, optionally
between `<|python_start|>` and `<|python_end|>`. Arguments become JSON; a call is sent whole,
once the list parses."""

from __future__ import annotations

import ast
import json

from pagedllm.entrypoints.openai.tool_parsers.base import (
    ParsedToolCall,
    ToolParser,
    register_tool_parser,
)

_START, _END = "<|python_start|>", "<|python_end|>"


def _value(node: ast.AST):
    return ast.literal_eval(node)


def _calls(src: str) -> list[ParsedToolCall] | None:
    try:
        tree = ast.parse(src, mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(tree, ast.List):
        return None
    calls = []
    for el in tree.elts:
        if not isinstance(el, ast.Call) or not isinstance(el.func, (ast.Name, ast.Attribute)):
            return None
        name = el.func.id if isinstance(el.func, ast.Name) else ast.unparse(el.func)
        try:
            args = {kw.arg: _value(kw.value) for kw in el.keywords if kw.arg is not None}
        except (ValueError, SyntaxError):
            return None
        calls.append(ParsedToolCall(name, json.dumps(args, ensure_ascii=False)))
    return calls


@register_tool_parser("pythonic")
class PythonicToolParser(ToolParser):
    def parse(self, text: str, final: bool) -> tuple[str, list[ParsedToolCall]]:
        body = text.strip()
        if body.startswith(_START):
            body = body[len(_START):]
        elif not final and _START.startswith(body):
            return "", []
        body = body.removesuffix(_END).strip() if final else body.split(_END)[0].strip()
        if not body.startswith("["):
            return (text if final or body else ""), []
        calls = _calls(body)
        if calls is None:
            return (text, []) if final else ("", [])
        return "", calls
