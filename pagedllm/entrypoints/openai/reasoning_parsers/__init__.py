"""Reasoning parsers (`--reasoning-parser NAME`), one module each: split a model's thinking
from its answer, whole or streamed. The chat handler alone uses them."""

from pagedllm.entrypoints.openai.reasoning_parsers.base import (
    REASONING_PARSERS,
    ReasoningParser,
    ReasoningStreamer,
    get_reasoning_parser,
    register_reasoning_parser,
)

__all__ = [
    "REASONING_PARSERS",
    "ReasoningParser",
    "ReasoningStreamer",
    "get_reasoning_parser",
    "register_reasoning_parser",
]
