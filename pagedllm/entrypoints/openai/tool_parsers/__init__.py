"""Tool-call parsers for `tool_choice: "auto"` (`--tool-call-parser NAME`), one module each.

A parser turns a model's whole output into (content, tool calls) in its model family's
format. Streaming reuses it: `ToolCallStreamer` re-parses the growing text and sends only
what is new, so a fragment is never lost or sent twice. `--tool-parser-plugin FILE` imports a
file whose parsers register themselves with `@register_tool_parser("name")`.
"""

from pagedllm.entrypoints.openai.tool_parsers.base import (
    TOOL_PARSERS,
    ParsedToolCall,
    ToolCallStreamer,
    ToolParser,
    get_tool_parser,
    load_tool_parser_plugin,
    register_tool_parser,
)

__all__ = [
    "TOOL_PARSERS",
    "ParsedToolCall",
    "ToolCallStreamer",
    "ToolParser",
    "get_tool_parser",
    "load_tool_parser_plugin",
    "register_tool_parser",
]
