"""Turning one chat choice's generated text into the message (or the stream of deltas):
reasoning first (`--reasoning-parser`), then tool calls in what remains (a tool parser for
"auto", the constrained form for "required" / named), then content."""

from __future__ import annotations

from typing import Any

from pagedllm.entrypoints.openai.reasoning_parsers import ReasoningParser, ReasoningStreamer
from pagedllm.entrypoints.openai.tool_parsers import ToolCallStreamer, ToolParser
from pagedllm.entrypoints.openai.tool_parsers.base import new_call_id


class ChoiceOutput:
    """Parses one choice; `message` for a whole output, `delta` for each streamed step.

    Streaming re-parses the text so far and sends what is new, so deltas concatenate to
    exactly what `message` would have returned.
    """

    def __init__(self, reasoning: ReasoningParser | None, tools: ToolParser | None,
                 parallel: bool = True) -> None:
        self.reasoning = reasoning
        self.tools = tools
        self.parallel = parallel
        self.text = ""
        self._reasoning_stream = ReasoningStreamer(reasoning) if reasoning else None
        self._tool_stream = ToolCallStreamer(tools) if tools else None
        self._sent_content = 0

    def _split(self, text: str, final: bool) -> tuple[str | None, str]:
        if self.reasoning is None:
            return None, text
        reasoning, content, _ = self.reasoning.parse(text, final)
        return reasoning, content

    def message(self, text: str) -> tuple[dict[str, Any], bool]:
        """(message fields, whether it holds tool calls) of a finished output."""
        reasoning, content = self._split(text, True)
        msg: dict[str, Any] = {"role": "assistant"}
        if self.reasoning is not None:
            msg["reasoning"] = msg["reasoning_content"] = reasoning or None
        calls = []
        if self.tools is not None:
            content, parsed = self.tools.parse(content, True)
            if not self.parallel:
                parsed = parsed[:1]
            calls = [{"id": new_call_id(), "type": "function",
                      "function": {"name": c.name, "arguments": c.arguments}} for c in parsed]
            if calls and not content.strip():
                content = None
        msg["content"] = content
        msg["tool_calls"] = calls
        return msg, bool(calls)

    def delta(self, new_text: str, final: bool) -> dict[str, Any] | None:
        """The delta for `new_text` appended to the output (None when nothing to send)."""
        self.text += new_text
        delta: dict[str, Any] = {}
        content = self.text
        if self._reasoning_stream is not None:
            new_r, _, content = self._reasoning_stream.update(self.text, final)
            if new_r:
                delta["reasoning"] = delta["reasoning_content"] = new_r
        if self._tool_stream is not None:
            new_c, calls = self._tool_stream.update(content, final)
            if not self.parallel:
                calls = [c for c in calls if c["index"] == 0]
            if new_c:
                delta["content"] = new_c
            if calls:
                delta["tool_calls"] = calls
        else:
            if len(content) > self._sent_content:
                delta["content"] = content[self._sent_content:]
                self._sent_content = len(content)
        return delta or None

    @property
    def has_tool_calls(self) -> bool:
        return self._tool_stream is not None and self._tool_stream.num_calls > 0
