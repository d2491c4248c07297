"""`<think> ... </think>` reasoning: DeepSeek-R1 (its template opens the tag in the prompt,
so the output is reasoning until `</think>`) and Qwen3 (reasoning only when the output opens
with `<think>`; `chat_template_kwargs: {"enable_thinking": false}` turns it off)."""

from __future__ import annotations

from pagedllm.entrypoints.openai.reasoning_parsers.base import (
    ReasoningParser,
    register_reasoning_parser,
)
from pagedllm.entrypoints.openai.tool_parsers.base import hold_back_marker

START, END = "<think>", "</think>"


def _split(text: str, final: bool) -> tuple[str, str, bool]:
    """Reasoning up to END (a leading START dropped), content after it."""
    body = text.lstrip()
    if body.startswith(START):
        body = body[len(START):]
    elif not final and START.startswith(body):
        return "", "", False
    end = body.find(END)
    if end < 0:
        return (body if final else hold_back_marker(body, (END,))), "", False
    return body[:end], body[end + len(END):].lstrip("\n"), True


@register_reasoning_parser("deepseek_r1")
class DeepSeekR1ReasoningParser(ReasoningParser):
    end_marker = END

    def parse(self, text: str, final: bool) -> tuple[str, str, bool]:
        return _split(text, final)


@register_reasoning_parser("qwen3")
class Qwen3ReasoningParser(ReasoningParser):
    end_marker = END

    def thinks(self) -> bool:
        return self.chat_template_kwargs.get("enable_thinking", True) is not False

    def parse(self, text: str, final: bool) -> tuple[str, str, bool]:
        if not self.thinks():
            return "", text, True
        body = text.lstrip()
        if not final and START.startswith(body):
            return "", "", False
        if not body.startswith(START) and END not in body:
            return "", text, True  # answered without thinking
        return _split(text, final)
