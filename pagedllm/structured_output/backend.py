"""The grammar-backend interface, the backend registry, and the spec every backend compiles.

A `GrammarSpec` is the normalised, hashable form of a request's `StructuredOutputsParams`
(its cache key); a backend turns one into a compiled grammar (thread-safe, off the engine
loop), makes a per-request matcher from it, and fills a batch's token bitmask.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from pagedllm.sampling_params import StructuredOutputsParams

# --structured-outputs-backend name -> module (one per grammar library).
BACKENDS: dict[str, str] = {
    "xgrammar": "pagedllm.structured_output.backend_xgrammar",
    "guidance": "pagedllm.structured_output.backend_guidance",
}
BACKEND_CHOICES = ("auto", *BACKENDS)


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    """kind: "json" | "json_object" | "regex" | "grammar" | "structural_tag"; spec: the
    schema (canonical JSON text), regex, EBNF or structural tag (JSON text)."""

    kind: str
    spec: str


def close_objects(schema: Any) -> Any:
    """disable_additional_properties: every object schema without its own
    `additionalProperties` gets `false`, recursively."""
    if isinstance(schema, list):
        return [close_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: close_objects(v) for k, v in schema.items()}
    is_object = out.get("type") == "object" or "properties" in out
    if is_object and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _structural_tag_format(tag: dict) -> dict:
    """vLLM's original form `{"structures": [{"begin", "schema", "end"}], "triggers": [...]}`
    in xgrammar's `format` form (tags triggered by a prefix, JSON inside); others unchanged."""
    if "format" in tag or "structures" not in tag:
        return tag
    tags = [{"type": "tag", "begin": s["begin"], "end": s["end"],
             "content": {"type": "json_schema", "json_schema": s.get("schema", {})}}
            for s in tag["structures"]]
    return {"type": "structural_tag",
            "format": {"type": "triggered_tags", "triggers": tag.get("triggers", []),
                       "tags": tags}}


def _ebnf_literal(text: str) -> str:
    # JSON string escaping is valid EBNF literal escaping (\" \\ \n \uXXXX).
    return json.dumps(text, ensure_ascii=False)


def grammar_spec(params: StructuredOutputsParams) -> GrammarSpec:
    """The normalised spec (and cache key) of a request's constraint; ValueError naming the
    field when the value has the wrong shape (not when the grammar itself is invalid)."""
    kind = params.kind
    if kind == "json":
        schema = params.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise ValueError(f"structured_outputs.json: is not valid JSON: {e}") from e
        if not isinstance(schema, (dict, bool)):
            raise ValueError("structured_outputs.json: a JSON schema must be an object")
        if params.disable_additional_properties:
            schema = close_objects(schema)
        return GrammarSpec("json", json.dumps(schema, ensure_ascii=False))
    if kind == "json_object":
        return GrammarSpec("json_object", "")
    if kind == "choice":
        return GrammarSpec("grammar", "root ::= " + " | ".join(map(_ebnf_literal, params.choice)))
    if kind == "structural_tag":
        tag = params.structural_tag
        if isinstance(tag, str):
            try:
                tag = json.loads(tag)
            except ValueError as e:
                raise ValueError(f"structured_outputs.structural_tag: is not valid JSON: {e}") from e
        if not isinstance(tag, dict):
            raise ValueError("structured_outputs.structural_tag: must be an object")
        return GrammarSpec("structural_tag", json.dumps(_structural_tag_format(tag)))
    value = getattr(params, kind)
    if not isinstance(value, str) or not value:
        raise ValueError(f"structured_outputs.{kind}: must be a non-empty string")
    return GrammarSpec(kind, value)


class Matcher(ABC):
    """One request's position in its grammar."""

    @abstractmethod
    def accept_token(self, token_id: int) -> bool:
        """Advances by one token; False (state unchanged) if the grammar forbids it."""

    @abstractmethod
    def rollback(self, num_tokens: int) -> None:
        """Undoes the last `num_tokens` accepted tokens."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """Whether the grammar has ended (its stop token accepted)."""


class GrammarBackend(ABC):
    """A grammar library. `compile` may run on any thread; the rest run on the engine loop."""

    name: str

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size

    @staticmethod
    @abstractmethod
    def validate(spec: GrammarSpec) -> None:
        """Raises ValueError if the spec does not parse (no tokenizer needed)."""

    @abstractmethod
    def compile(self, spec: GrammarSpec) -> Any:
        """A compiled grammar, shared by every request with the same spec."""

    @abstractmethod
    def new_matcher(self, compiled: Any, stop_token_ids: list[int]) -> Matcher:
        """A fresh matcher; the grammar ends on one of `stop_token_ids`."""

    @abstractmethod
    def fill_bitmask(self, matchers: list[Matcher], bitmask: np.ndarray) -> None:
        """Row i of `bitmask` [len(matchers), ceil(vocab_size / 32)] int32 (pre-filled with
        -1, everything allowed) gets matcher i's allowed next tokens."""


def check_backend(name: str) -> str:
    """The backend a --structured-outputs-backend name means ("auto": xgrammar); ValueError if
    unknown or its library is not installed. Cheap: the library is imported on first use."""
    if name == "auto":
        name = "xgrammar"
    if name not in BACKENDS:
        raise ValueError(
            f"structured outputs backend must be one of {', '.join(BACKEND_CHOICES)}; got {name!r}"
        )
    if importlib.util.find_spec(_PACKAGES[name]) is None:
        raise ValueError(f"structured outputs backend {name!r} is not available: install the "
                         f"{_PACKAGES[name]} package")
    return name


def backend_class(name: str) -> type[GrammarBackend]:
    """The backend class for a --structured-outputs-backend name (imports its library)."""
    name = check_backend(name)
    try:
        module = importlib.import_module(BACKENDS[name])
    except ImportError as e:
        raise ValueError(
            f"structured outputs backend {name!r} is not available: {e} (install the "
            f"{_PACKAGES[name]} package)"
        ) from e
    return module.BACKEND


_PACKAGES = {"xgrammar": "xgrammar", "guidance": "llguidance"}
