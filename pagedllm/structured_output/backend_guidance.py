"""The llguidance backend (`--structured-outputs-backend guidance`): grammars are built
lazily by each matcher (cheap to "compile"), masks filled in parallel by llguidance."""

from __future__ import annotations

import json
from typing import Any

import llguidance
import llguidance.hf
import llguidance.numpy
import numpy as np

from pagedllm.structured_output.backend import (
    GrammarBackend,
    GrammarSpec,
    Matcher,
    close_objects,
)

# Compact JSON, as with xgrammar: no free whitespace to loop on.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


def _grammar(spec: GrammarSpec) -> str:
    if spec.kind in ("json", "json_object"):
        # Objects closed unless the schema opens them, as xgrammar's strict mode does.
        schema = close_objects(json.loads(spec.spec)) if spec.kind == "json" else {
            "type": "object"}
        if isinstance(schema, dict):
            schema = {**schema, "x-guidance": {**_JSON_OPTIONS, **schema.get("x-guidance", {})}}
        return llguidance.grammar_from("json_schema", json.dumps(schema))
    if spec.kind == "regex":
        return llguidance.grammar_from("regex", spec.spec)
    if spec.kind == "grammar":
        return llguidance.grammar_from("grammar", spec.spec)
    raise ValueError(f"the guidance backend does not support {spec.kind}")


class GuidanceMatcher(Matcher):
    __slots__ = ("matcher",)

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher

    def accept_token(self, token_id: int) -> bool:
        return bool(self.matcher.consume_token(token_id)) and not self.matcher.is_error()

    def rollback(self, num_tokens: int) -> None:
        if num_tokens:
            self.matcher.rollback(num_tokens)

    def is_terminated(self) -> bool:
        return bool(self.matcher.is_stopped())


class GuidanceBackend(GrammarBackend):
    name = "guidance"

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        super().__init__(tokenizer, vocab_size)
        self.ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self.executor = llguidance.LLExecutor()

    @staticmethod
    def validate(spec: GrammarSpec) -> None:
        try:
            grammar = _grammar(spec)
        except (ValueError, TypeError) as e:
            raise ValueError(str(e)) from e
        ok, error = _validate(grammar)
        if not ok:
            raise ValueError(error)

    def compile(self, spec: GrammarSpec) -> Any:
        grammar = _grammar(spec)
        ok, error = _validate(grammar, self.ll_tokenizer)
        if not ok:
            raise ValueError(error)
        return grammar

    def new_matcher(self, compiled: Any, stop_token_ids: list[int]) -> Matcher:
        matcher = llguidance.LLMatcher(self.ll_tokenizer, compiled)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return GuidanceMatcher(matcher)

    def fill_bitmask(self, matchers: list[Matcher], bitmask: np.ndarray) -> None:
        pairs = [(m.matcher, i) for i, m in enumerate(matchers)]
        llguidance.numpy.fill_next_token_bitmask_par(self.executor, pairs, bitmask)


def _validate(grammar: str, tokenizer: Any = None) -> tuple[bool, str]:
    result = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
    if isinstance(result, tuple):
        return result[0], str(result[1])
    return (not result), str(result)  # an error string, empty when valid


BACKEND = GuidanceBackend
