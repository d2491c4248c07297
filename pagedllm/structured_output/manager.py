"""StructuredOutputManager: compiles grammars off the engine loop and owns the matchers.

Compilation runs on a small thread pool and is cached by `GrammarSpec` (n > 1 children and
repeated schemas compile once). The backend itself (it needs the tokenizer) is built lazily,
on the pool, by the first constrained request, so engines that never see one pay nothing.
A request whose grammar is still compiling waits in the queue without holding others up
(`is_ready`); each step the scheduler asks for the token bitmask of its constrained rows.

Invariant: a request's matcher has accepted exactly its output tokens (`num_accepted ==
num_output_tokens`); preemption drops tokens still in flight, never accepted ones, and
`sync_to` rolls a matcher back should it ever be ahead.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pagedllm.sampling_params import StructuredOutputsParams
from pagedllm.structured_output.backend import (
    GrammarBackend,
    GrammarSpec,
    Matcher,
    backend_class,
    check_backend,
    grammar_spec,
)

if TYPE_CHECKING:
    from pagedllm.config import ModelConfig

logger = logging.getLogger(__name__)

_CACHE_SIZE = 512  # compiled grammars kept (least recently used dropped)


def validate_structured_outputs(params: StructuredOutputsParams, backend: str = "auto") -> None:
    """Front-end check (no tokenizer): the constraint parses. ValueError naming the field."""
    spec = grammar_spec(params)
    if spec.kind == "json_object":
        return
    field = "choice" if params.kind == "choice" else params.kind
    try:
        backend_class(backend).validate(spec)
    except ValueError as e:
        raise ValueError(f"structured_outputs.{field}: invalid {_WHAT[params.kind]}: {e}") from e


_WHAT = {"json": "JSON schema", "regex": "regular expression", "grammar": "grammar",
         "choice": "choice list", "structural_tag": "structural tag"}


@dataclass(slots=True)
class GrammarBitmask:
    """The step's constraint: row i of `bitmask` [len(req_ids), ceil(vocab_size / 32)]
    int32 (bit j of word w allows token 32 w + j) belongs to request `req_ids[i]`."""

    req_ids: list[str]
    bitmask: np.ndarray


class RequestGrammar:
    """One request's grammar: the compile future until ready, then its matcher."""

    __slots__ = ("spec", "future", "matcher", "error", "num_accepted", "stop_token_ids",
                 "reasoning_end", "num_reasoning", "_recent")

    def __init__(self, spec: GrammarSpec, future: Future, stop_token_ids: list[int],
                 reasoning_end: list[int] | None = None) -> None:
        self.spec = spec
        self.future = future
        self.matcher: Matcher | None = None
        self.error: str | None = None
        self.num_accepted = 0  # tokens the matcher consumed
        self.stop_token_ids = stop_token_ids
        # Under a reasoning parser: unconstrained until these tokens end the reasoning.
        self.reasoning_end = reasoning_end or None
        self.num_reasoning = 0  # output tokens before the constraint started
        self._recent: list[int] = []

    @property
    def in_reasoning(self) -> bool:
        return self.reasoning_end is not None

    def accept(self, token_id: int) -> bool:
        """Advances the matcher by a sampled token; False if the grammar refused it."""
        if self.reasoning_end is not None:
            self.num_reasoning += 1
            self._recent = (self._recent + [token_id])[-len(self.reasoning_end):]
            if self._recent == self.reasoning_end:
                self.reasoning_end = None  # the answer starts: constrain from here on
            return True
        if self.matcher is None:
            return True  # failed grammar: the request is being aborted
        ok = self.matcher.accept_token(token_id)
        if ok:
            self.num_accepted += 1
        return ok

    def sync_to(self, num_output_tokens: int) -> None:
        """Rolls the matcher back to `num_output_tokens` output tokens (preemption)."""
        extra = self.num_reasoning + self.num_accepted - num_output_tokens
        if extra > 0 and self.matcher is not None:
            extra = min(extra, self.num_accepted)
            self.matcher.rollback(extra)
            self.num_accepted -= extra

    @property
    def is_terminated(self) -> bool:
        return self.matcher is not None and self.matcher.is_terminated()


class StructuredOutputManager:
    def __init__(self, model_config: ModelConfig, backend: str = "auto",
                 max_workers: int = 2) -> None:
        self.model_config = model_config
        self.backend_name = backend
        check_backend(backend)  # unknown or not installed: refused now, imported on first use
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="grammar")
        self._backend_future: Future[GrammarBackend] | None = None
        self._cache: OrderedDict[GrammarSpec, Future] = OrderedDict()
        self._lock = threading.Lock()
        self.num_compiles = 0  # cache misses, for tests and stats

    # ---- compilation ----
    def _build_backend(self) -> GrammarBackend:
        from pagedllm.tokenizer import get_tokenizer

        tokenizer = get_tokenizer(self.model_config)
        return backend_class(self.backend_name)(tokenizer, self.model_config.vocab_size)

    @property
    def backend(self) -> GrammarBackend:
        return self._get_backend_future().result()

    def _get_backend_future(self) -> Future:
        with self._lock:
            if self._backend_future is None:
                self._backend_future = self._pool.submit(self._build_backend)
            return self._backend_future

    def _compile(self, spec: GrammarSpec) -> Any:
        return self._get_backend_future().result().compile(spec)

    def compile_async(self, spec: GrammarSpec) -> Future:
        """The (cached) compile future of a spec."""
        with self._lock:
            fut = self._cache.get(spec)
            if fut is not None and not (fut.done() and fut.exception() is not None):
                self._cache.move_to_end(spec)
                return fut
            self._get_backend_future_locked()
            fut = self._pool.submit(self._compile, spec)
            self.num_compiles += 1
            self._cache[spec] = fut
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
            return fut

    def _get_backend_future_locked(self) -> None:
        if self._backend_future is None:
            self._backend_future = self._pool.submit(self._build_backend)

    # ---- requests ----
    def new_request_grammar(
        self, params: StructuredOutputsParams, stop_token_ids: list[int]
    ) -> RequestGrammar:
        spec = grammar_spec(params)
        return RequestGrammar(spec, self.compile_async(spec), sorted(set(stop_token_ids)),
                              params.reasoning_end)

    def is_ready(self, grammar: RequestGrammar) -> bool:
        """Whether the grammar has compiled (making its matcher) or failed (`error` set)."""
        if grammar.matcher is not None or grammar.error is not None:
            return True
        if not grammar.future.done():
            return False
        try:
            compiled = grammar.future.result()
            grammar.matcher = self.backend.new_matcher(compiled, grammar.stop_token_ids)
        except Exception as e:  # an invalid grammar the front-end did not catch
            grammar.error = f"structured outputs: the grammar failed to compile: {e}"
            logger.warning("%s (%s)", grammar.error, grammar.spec.kind)
        return True

    def wait_for_any(self, grammars: list[RequestGrammar], timeout: float) -> None:
        """Blocks up to `timeout` s until one of the pending grammars has compiled."""
        from concurrent.futures import FIRST_COMPLETED, wait

        pending = [g.future for g in grammars if not g.future.done()]
        if pending:
            wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)

    def grammar_bitmask(self, req_ids: list[str], grammars: list[RequestGrammar | None]
                        ) -> GrammarBitmask | None:
        """The bitmask rows of the requests that sample under a live matcher this step
        (finished or failed ones are left out: their rows stay unconstrained)."""
        live = [(r, g) for r, g in zip(req_ids, grammars)
                if g is not None and g.matcher is not None and not g.in_reasoning
                and not g.is_terminated]
        if not live:
            return None
        vocab = self.model_config.vocab_size
        bitmask = np.full((len(live), -(-vocab // 32)), -1, dtype=np.int32)
        self.backend.fill_bitmask([g.matcher for _, g in live], bitmask)
        return GrammarBitmask([r for r, _ in live], bitmask)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
