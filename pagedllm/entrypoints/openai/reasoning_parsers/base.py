"""The reasoning-parser interface, its registry and streaming over any parser."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod

_BUILTIN = {
    "deepseek_r1": "pagedllm.entrypoints.openai.reasoning_parsers.think_tags",
    "qwen3": "pagedllm.entrypoints.openai.reasoning_parsers.think_tags",
}
REASONING_PARSERS: dict[str, type[ReasoningParser]] = {}


def register_reasoning_parser(name: str):
    def deco(cls: type[ReasoningParser]) -> type[ReasoningParser]:
        REASONING_PARSERS[name] = cls
        return cls

    return deco


def get_reasoning_parser(name: str) -> type[ReasoningParser]:
    if name not in REASONING_PARSERS and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in REASONING_PARSERS:
        known = sorted(set(REASONING_PARSERS) | set(_BUILTIN))
        raise ValueError(f"--reasoning-parser {name!r} is unknown; known: {', '.join(known)}")
    return REASONING_PARSERS[name]


class ReasoningParser(ABC):
    # The text that ends the reasoning (its token ids end it in the engine, for constraints).
    end_marker: str = ""

    def __init__(self, chat_template_kwargs: dict | None = None) -> None:
        self.chat_template_kwargs = chat_template_kwargs or {}

    @abstractmethod
    def parse(self, text: str, final: bool) -> tuple[str, str, bool]:
        """(reasoning, content, ended) of the text so far; with `final` False neither part
        may include text that could still move to the other."""

    def thinks(self) -> bool:
        """Whether this request's output starts inside the reasoning (so an output
        constraint must wait for `end_marker`)."""
        return True


class ReasoningStreamer:
    """Deltas of reasoning and content from the growing text."""

    def __init__(self, parser: ReasoningParser) -> None:
        self.parser = parser
        self.sent_reasoning = 0
        self.sent_content = 0

    def update(self, text: str, final: bool) -> tuple[str, str, str]:
        """(new reasoning, new content, all content so far)."""
        reasoning, content, _ = self.parser.parse(text, final)
        new_r = reasoning[self.sent_reasoning:]
        new_c = content[self.sent_content:]
        self.sent_reasoning = max(self.sent_reasoning, len(reasoning))
        self.sent_content = max(self.sent_content, len(content))
        return new_r, new_c, content
