"""The tool-parser interface, its registry, and incremental streaming over any parser."""

from __future__ import annotations

import importlib
import importlib.util
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass

# name -> module of a built-in parser (imported on first use).
_BUILTIN = {
    "hermes": "pagedllm.entrypoints.openai.tool_parsers.hermes",
    "llama3_json": "pagedllm.entrypoints.openai.tool_parsers.llama3_json",
    "mistral": "pagedllm.entrypoints.openai.tool_parsers.mistral",
    "pythonic": "pagedllm.entrypoints.openai.tool_parsers.pythonic",
}
TOOL_PARSERS: dict[str, type[ToolParser]] = {}


def register_tool_parser(name: str):
    """Class decorator: makes a ToolParser available as `--tool-call-parser name`."""

    def deco(cls: type[ToolParser]) -> type[ToolParser]:
        TOOL_PARSERS[name] = cls
        return cls

    return deco


def get_tool_parser(name: str) -> type[ToolParser]:
    if name not in TOOL_PARSERS and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in TOOL_PARSERS:
        known = sorted(set(TOOL_PARSERS) | set(_BUILTIN))
        raise ValueError(f"--tool-call-parser {name!r} is unknown; known: {', '.join(known)}")
    return TOOL_PARSERS[name]


def load_tool_parser_plugin(path: str) -> None:
    """Imports a Python file that registers parsers (`--tool-parser-plugin FILE`)."""
    spec = importlib.util.spec_from_file_location(f"pagedllm_tool_plugin_{uuid.uuid4().hex}", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"--tool-parser-plugin {path!r}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


@dataclass(slots=True)
class ParsedToolCall:
    """One call as parsed so far. `arguments` is JSON text; while streaming it may be a
    prefix of the final text (`complete` False), never anything else."""

    name: str
    arguments: str
    complete: bool = True


class ToolParser(ABC):
    """Parses one model family's tool-call format."""

    # Text that starts a tool-call section; content streaming holds back any output tail
    # that could be its beginning. Empty: the parser decides from the whole text.
    start_markers: tuple[str, ...] = ()
    # Whether the format uses special tokens the detokenizer must keep (skip_special_tokens).
    keep_special_tokens: bool = False

    def __init__(self, tokenizer=None) -> None:
        self.tokenizer = tokenizer

    @abstractmethod
    def parse(self, text: str, final: bool) -> tuple[str, list[ParsedToolCall]]:
        """(content, calls) of `text`. With `final` False the text may stop anywhere: calls
        may be incomplete (arguments a prefix) and content must not include text that could
        still turn out to belong to a call."""


def hold_back_marker(content: str, markers: tuple[str, ...]) -> str:
    """`content` minus a tail that is a proper prefix of one of `markers`."""
    for marker in markers:
        for k in range(min(len(marker) - 1, len(content)), 0, -1):
            if content.endswith(marker[:k]):
                return content[:-k]
    return content


def new_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


class ToolCallStreamer:
    """Incremental OpenAI deltas from a parser: feed the text so far, get the deltas.

    The first delta of a call carries index, id, type and name (and arguments ""); later ones
    carry argument fragments. Content is sent as soon as it can no longer be a call.
    """

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.sent_content = 0
        self.sent_args: list[int] = []  # per call: characters of arguments sent
        self.ids: list[str] = []

    def update(self, text: str, final: bool) -> tuple[str, list[dict]]:
        """(new content, tool_call deltas) for the whole text so far."""
        content, calls = self.parser.parse(text, final)
        new_content = content[self.sent_content:] if len(content) > self.sent_content else ""
        self.sent_content = max(self.sent_content, len(content))
        deltas: list[dict] = []
        for i, call in enumerate(calls):
            if i >= len(self.ids):
                self.ids.append(new_call_id())
                self.sent_args.append(0)
                deltas.append({"index": i, "id": self.ids[i], "type": "function",
                               "function": {"name": call.name, "arguments": ""}})
            fragment = call.arguments[self.sent_args[i]:]
            if fragment:
                self.sent_args[i] = len(call.arguments)
                deltas.append({"index": i, "function": {"arguments": fragment}})
        return new_content, deltas

    @property
    def num_calls(self) -> int:
        return len(self.ids)
