"""OutputProcessor: engine-core outputs -> RequestOutputs (detokenize, stop strings, logprobs, n>1)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.engine.protocol import EngineCoreOutput, FinishReason, LogprobsLists
from pagedllm.outputs import (
    CompletionOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    Logprob,
    RequestMetrics,
    RequestOutput,
)
from pagedllm.sampling_params import RequestOutputKind, SamplingParams


class TokenDecoder:
    """Per-token strings for logprobs, cached by id."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str | None:
        if self.tokenizer is None:
            return None
        s = self._cache.get(token_id)
        if s is None:
            s = self.tokenizer.decode([token_id])
            self._cache[token_id] = s
        return s


@dataclass
class ParentRequest:
    """Fans one user request out to n child requests and gathers their outputs."""

    request_id: str
    n: int
    output_kind: RequestOutputKind
    outputs: dict[int, CompletionOutput] = field(default_factory=dict)
    num_finished: int = 0

    def child_id(self, index: int) -> str:
        return f"{index}_{self.request_id}"

    @staticmethod
    def child_params(params: SamplingParams, index: int) -> SamplingParams:
        """Child `index` samples once; a seeded request gives each child its own seed."""
        child = params.clone()
        child.n = 1
        if params.seed is not None:
            child.seed = params.seed + index
        return child


@dataclass
class RequestState:
    request_id: str  # engine-core (child) id
    external_id: str  # the id the user sees
    index: int
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams | None
    detokenizer: IncrementalDetokenizer | None
    parent: ParentRequest | None
    queue: Any = None  # an asyncio.Queue-like with put_nowait, for the async front-end
    logprobs: list | None = None
    prompt_logprobs: list | None = None
    cumulative_logprob: float | None = None
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    sent_tokens: int = 0
    sent_logprobs: int = 0
    # A FINAL_ONLY generation without stop strings or logprobs: until it finishes, an
    # output only extends its text (`process_outputs`' fast path).
    final_only_plain: bool = False


@dataclass
class OutputProcessorOutput:
    request_outputs: list[RequestOutput | EmbeddingRequestOutput]
    reqs_to_abort: list[str]  # engine-core ids finished here (stop strings) to abort in the core


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.decode_token = TokenDecoder(tokenizer)
        self.requests: dict[str, RequestState] = {}
        self.parents: dict[str, ParentRequest] = {}

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    def add_request(
        self,
        request_id: str,
        external_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams | None,
        arrival_time: float,
        parent: ParentRequest | None = None,
        index: int = 0,
        queue: Any = None,
    ) -> None:
        detok = None
        final_only_plain = (
            params is not None and params.output_kind == RequestOutputKind.FINAL_ONLY
            and not params.stop and params.logprobs is None and params.prompt_logprobs is None
            and (parent is None or parent.output_kind == RequestOutputKind.FINAL_ONLY)
        )
        if params is not None:
            detok = IncrementalDetokenizer(
                self.tokenizer, prompt_token_ids, params, defer=final_only_plain
            )
        self.requests[request_id] = RequestState(
            request_id=request_id,
            external_id=external_id,
            index=index,
            prompt=prompt,
            prompt_token_ids=prompt_token_ids,
            params=params,
            detokenizer=detok,
            parent=parent,
            queue=queue,
            logprobs=[] if params is not None and params.logprobs is not None else None,
            cumulative_logprob=0.0 if params is not None and params.logprobs is not None else None,
            metrics=RequestMetrics(arrival_time=arrival_time),
            final_only_plain=final_only_plain,
        )
        if parent is not None:
            self.parents[parent.request_id] = parent

    def abort_requests(self, request_ids: list[str]) -> list[str]:
        """Drops state; returns the engine-core ids that were known (children included)."""
        dropped = []
        for rid in request_ids:
            parent = self.parents.pop(rid, None)
            ids = [parent.child_id(i) for i in range(parent.n)] if parent else [rid]
            for cid in ids:
                if self.requests.pop(cid, None) is not None:
                    dropped.append(cid)
        return dropped

    # ---- logprobs ----
    def _to_dicts(self, lists: LogprobsLists) -> list[dict[int, Logprob]]:
        out = []
        for ids, vals, rank in zip(lists.logprob_token_ids, lists.logprobs, lists.sampled_token_ranks):
            d: dict[int, Logprob] = {}
            d[ids[0]] = Logprob(vals[0], rank, self.decode_token(ids[0]))
            for r, (t, v) in enumerate(zip(ids[1:], vals[1:]), start=1):
                if t not in d:
                    d[t] = Logprob(v, r, self.decode_token(t))
            out.append(d)
        return out

    # ---- main ----
    def process_outputs(
        self, outputs: list[EngineCoreOutput], now: float | None = None
    ) -> OutputProcessorOutput:
        now = now if now is not None else time.time()
        results: list = []
        to_abort: list[str] = []
        requests = self.requests
        for eco in outputs:
            state = requests.get(eco.request_id)
            if state is None:
                continue  # aborted meanwhile
            if state.final_only_plain and eco.finish_reason is None and (
                eco.new_logprobs is None and eco.new_prompt_logprobs is None
            ):
                # FINAL_ONLY, no stop strings, no logprobs, not finished: nothing to emit,
                # only the text to extend (`_process_one` does the same, at more cost).
                m = state.metrics
                if m.first_token_time is None and eco.new_token_ids:
                    m.first_token_time = now
                m.last_token_time = now
                state.num_cached_tokens = eco.num_cached_tokens
                state.detokenizer.update(eco.new_token_ids, check_stop=False)
                continue
            ro = self._process_one(state, eco, now, to_abort)
            if ro is None:
                continue
            if state.queue is not None:
                state.queue.put_nowait(ro)
            else:
                results.append(ro)
        return OutputProcessorOutput(results, to_abort)

    def _process_one(self, state: RequestState, eco: EngineCoreOutput, now: float, to_abort):
        m = state.metrics
        if m.first_token_time is None and (eco.new_token_ids or eco.pooling_output is not None):
            m.first_token_time = now
        m.last_token_time = now
        if state.params is None:  # embedding request
            if eco.pooling_output is None:
                return None
            self.requests.pop(state.request_id, None)
            return EmbeddingRequestOutput(
                request_id=state.external_id,
                prompt_token_ids=state.prompt_token_ids,
                outputs=EmbeddingOutput(list(eco.pooling_output)),
            )
        params = state.params
        finish_reason = eco.finish_reason
        stop_reason = eco.stop_reason
        state.num_cached_tokens = eco.num_cached_tokens
        if eco.new_prompt_logprobs is not None:
            state.prompt_logprobs = [None] + self._to_dicts(eco.new_prompt_logprobs)
        if eco.new_logprobs is not None and state.logprobs is not None:
            new = self._to_dicts(eco.new_logprobs)
            state.logprobs.extend(new)
            state.cumulative_logprob += sum(lp[0] for lp in eco.new_logprobs.logprobs)
        detok = state.detokenizer
        num_out_before = len(detok.token_ids)
        check = num_out_before + len(eco.new_token_ids) > params.min_tokens
        stop_str = detok.update(eco.new_token_ids, check_stop=check)
        if stop_str is not None and finish_reason is None:
            finish_reason = FinishReason.STOP
            stop_reason = stop_str
            to_abort.append(state.request_id)
        finished = finish_reason is not None
        if finished:
            m.finished_time = now
            self.requests.pop(state.request_id, None)
        kind = params.output_kind
        if kind == RequestOutputKind.FINAL_ONLY and not finished:
            return None
        delta = kind == RequestOutputKind.DELTA
        text = detok.get_next_output_text(finished, delta)
        token_ids = detok.token_ids
        logprobs = state.logprobs
        if delta:
            token_ids = token_ids[state.sent_tokens :]
            state.sent_tokens = len(detok.token_ids)
            if logprobs is not None:
                logprobs = logprobs[state.sent_logprobs :]
                state.sent_logprobs = len(state.logprobs)
        else:
            token_ids = list(token_ids)
            logprobs = list(logprobs) if logprobs is not None else None
        if delta and not finished and not text and not token_ids:
            return None
        comp = CompletionOutput(
            index=state.index,
            text=text,
            token_ids=token_ids,
            cumulative_logprob=state.cumulative_logprob,
            logprobs=logprobs,
            finish_reason=str(finish_reason) if finished else None,
            stop_reason=stop_reason if finished else None,
        )
        prompt_lp = state.prompt_logprobs
        if delta and prompt_lp is not None:
            state.prompt_logprobs = None  # sent once
        return self._make_request_output(state, comp, finished, prompt_lp)

    def _make_request_output(self, state, comp, finished, prompt_lp):
        parent = state.parent
        if parent is None:
            outputs, all_finished = [comp], finished
        else:
            parent.outputs[comp.index] = comp
            if finished:
                parent.num_finished += 1
            all_finished = parent.num_finished == parent.n
            if all_finished:
                self.parents.pop(parent.request_id, None)
            if parent.output_kind == RequestOutputKind.DELTA:
                outputs = [comp]
            elif parent.output_kind == RequestOutputKind.FINAL_ONLY and not all_finished:
                return None
            else:
                outputs = [parent.outputs[i] for i in sorted(parent.outputs)]
        return RequestOutput(
            request_id=state.external_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=outputs,
            finished=all_finished,
            prompt_logprobs=prompt_lp,
            num_cached_tokens=state.num_cached_tokens,
            metrics=state.metrics,
        )
