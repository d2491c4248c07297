"""`tools` / `tool_choice` / `parallel_tool_calls` of a chat request.

"none" ignores the tools (and with --exclude-tools-when-tool-choice-none leaves them out of
the prompt); "auto" lets the model choose and needs --enable-auto-tool-choice with a
--tool-call-parser; "required" and a named function are enforced by a JSON schema of the
calls (structured outputs), so they need no parser: "required" generates
`[{"name": ..., "parameters": {...}}, ...]`, a named function generates its arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pagedllm.entrypoints.openai.tool_parsers.base import ParsedToolCall, ToolParser
from pagedllm.entrypoints.openai.tool_parsers.mistral import _array_calls
from pagedllm.sampling_params import StructuredOutputsParams

_EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(slots=True)
class ToolChoice:
    mode: str  # "none" | "auto" | "required" | "named"
    name: str | None = None  # the function of a named choice
    parallel: bool = True


def _functions(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type", "function") != "function" or not isinstance(fn, dict) or (
            not isinstance(fn.get("name"), str)
        ):
            raise ValueError(f"tools[{i}]: must be {{'type': 'function', 'function': "
                             "{'name': ..., 'parameters': ...}}")
        out[fn["name"]] = fn
    return out


def resolve_tool_choice(tools: list[dict[str, Any]] | None, tool_choice: Any,
                        parallel_tool_calls: bool | None, auto_enabled: bool) -> ToolChoice:
    """Validates the request's tool fields (ValueError naming the field)."""
    parallel = parallel_tool_calls is not False
    if tool_choice is not None and not tools:
        raise ValueError("tool_choice: requires tools to be set")
    if not tools:
        return ToolChoice("none", parallel=parallel)
    functions = _functions(tools)
    if tool_choice is None:
        tool_choice = "auto"
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise ValueError("tool_choice: a named choice is {'type': 'function', "
                             "'function': {'name': ...}}")
        if name not in functions:
            raise ValueError(f"tool_choice: the function {name!r} is not in tools")
        return ToolChoice("named", name, parallel)
    if tool_choice not in ("none", "auto", "required"):
        raise ValueError(f"tool_choice: must be none, auto, required or a named function; "
                         f"got {tool_choice!r}")
    if tool_choice == "auto" and not auto_enabled:
        raise ValueError('tool_choice: "auto" tool choice requires --enable-auto-tool-choice '
                         "and --tool-call-parser to be set")
    return ToolChoice(tool_choice, parallel=parallel)


def tool_constraint(tools: list[dict[str, Any]], choice: ToolChoice
                    ) -> StructuredOutputsParams | None:
    """The JSON schema that enforces a required or named choice (None otherwise)."""
    if choice.mode not in ("required", "named"):
        return None
    functions = _functions(tools)
    if choice.mode == "named":
        params = functions[choice.name].get("parameters") or _EMPTY_PARAMETERS
        return StructuredOutputsParams(json=params)
    items = [{
        "type": "object",
        "properties": {"name": {"type": "string", "enum": [name]},
                       "parameters": fn.get("parameters") or _EMPTY_PARAMETERS},
        "required": ["name", "parameters"],
    } for name, fn in functions.items()]
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": items[0] if len(items) == 1 else {"anyOf": items}}
    if not choice.parallel:
        schema["maxItems"] = 1
    return StructuredOutputsParams(json=schema)


class RequiredToolParser(ToolParser):
    """Reads the constrained `[{"name": ..., "parameters": {...}}, ...]` output."""

    def parse(self, text: str, final: bool) -> tuple[str, list[ParsedToolCall]]:
        calls = _array_calls(text, final)
        for c in calls:
            if c.complete and not c.arguments:
                c.arguments = "{}"
        return "", calls


class NamedToolParser(ToolParser):
    """The constrained output is the named function's arguments."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def parse(self, text: str, final: bool) -> tuple[str, list[ParsedToolCall]]:
        args = text.strip() if final else text.lstrip()
        if final and not args:
            args = "{}"
        return "", [ParsedToolCall(self.name, args, complete=final)]


def tools_for_template(tools: list[dict[str, Any]] | None, choice: ToolChoice,
                       exclude_when_none: bool) -> list[dict[str, Any]] | None:
    if choice.mode == "none" and exclude_when_none:
        return None
    return tools

