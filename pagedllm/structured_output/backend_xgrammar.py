"""The xgrammar backend (the default): compiled grammars, matchers and xgrammar's batched
bitmask fill (several threads for a large batch)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import xgrammar as xgr

from pagedllm.structured_output.backend import GrammarBackend, GrammarSpec, Matcher

# JSON is never free with whitespace: compact separators, no optional spaces or newlines.
_SEPARATORS = (",", ":")


class XgrammarMatcher(Matcher):
    __slots__ = ("matcher",)

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher

    def accept_token(self, token_id: int) -> bool:
        return bool(self.matcher.accept_token(token_id))

    def rollback(self, num_tokens: int) -> None:
        if num_tokens:
            self.matcher.rollback(num_tokens)

    def is_terminated(self) -> bool:
        return bool(self.matcher.is_terminated())


class XgrammarBackend(GrammarBackend):
    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        super().__init__(tokenizer, vocab_size)
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        # Our own cache (by spec) sits in front; xgrammar's would hold a second copy.
        self.compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        self.batch_matcher = xgr.BatchGrammarMatcher(max_threads="auto")

    @staticmethod
    def validate(spec: GrammarSpec) -> None:
        try:
            if spec.kind == "json":
                xgr.Grammar.from_json_schema(spec.spec, any_whitespace=False,
                                             separators=_SEPARATORS)
            elif spec.kind == "regex":
                xgr.Grammar.from_regex(spec.spec)
            elif spec.kind == "grammar":
                xgr.Grammar.from_ebnf(spec.spec)
            elif spec.kind == "structural_tag":
                xgr.Grammar.from_structural_tag(json.loads(spec.spec))
        except (RuntimeError, ValueError, TypeError) as e:
            raise ValueError(_short(e)) from e

    def compile(self, spec: GrammarSpec) -> Any:
        c = self.compiler
        if spec.kind == "json":
            return c.compile_json_schema(spec.spec, any_whitespace=False, separators=_SEPARATORS)
        if spec.kind == "json_object":
            return c.compile_json_schema('{"type": "object"}', any_whitespace=False,
                                         separators=_SEPARATORS, strict_mode=False)
        if spec.kind == "regex":
            return c.compile_regex(spec.spec)
        if spec.kind == "grammar":
            return c.compile_grammar(spec.spec)
        if spec.kind == "structural_tag":
            return c.compile_structural_tag(spec.spec)
        raise ValueError(f"unknown grammar kind {spec.kind!r}")

    def new_matcher(self, compiled: Any, stop_token_ids: list[int]) -> Matcher:
        return XgrammarMatcher(
            xgr.GrammarMatcher(compiled, override_stop_tokens=stop_token_ids)
        )

    def fill_bitmask(self, matchers: list[Matcher], bitmask: np.ndarray) -> None:
        inner = [m.matcher for m in matchers]
        if len(inner) == 1:
            inner[0].fill_next_token_bitmask(bitmask, 0)
        else:
            self.batch_matcher.batch_fill_next_token_bitmask(inner, bitmask)


def _short(e: Exception) -> str:
    """xgrammar's C++ errors start with a timestamp and a source location; keep the message."""
    text = str(e).strip()
    for marker in ("error at ", "error: ", "Check failed: "):
        if marker in text:
            text = text[text.index(marker):]
            break
    return text.splitlines()[0] if text else type(e).__name__


BACKEND = XgrammarBackend
