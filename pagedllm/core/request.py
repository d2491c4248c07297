"""The engine core's view of one request: its tokens, progress, status and block hashes."""

from __future__ import annotations

import enum
from collections.abc import Iterable

from pagedllm.core.block_hash import BlockHash, compute_block_hashes
from pagedllm.engine.protocol import EngineCoreRequest, FinishReason
from pagedllm.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Lifecycle of a request. Every status after PREEMPTED is final."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH_CAPPED = 4
    FINISHED_ABORTED = 5

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.PREEMPTED

    @property
    def finish_reason(self) -> FinishReason | None:
        """The FinishReason reported to the client; None while not finished."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS: dict[RequestStatus, FinishReason] = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH_CAPPED: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
}


class Request:
    """One request in the engine core.

    Invariants: `all_token_ids == prompt_token_ids + output_token_ids`;
    `0 <= num_computed_tokens <= num_tokens + num_output_placeholders`; `block_hashes` holds the chain hash of every
    full block of `all_token_ids` (and nothing for a trailing partial block).
    """

    __slots__ = (
        "request_id",
        "prompt_token_ids",
        "sampling_params",
        "eos_token_id",
        "arrival_time",
        "pooling",
        "block_size",
        "output_token_ids",
        "all_token_ids",
        "num_computed_tokens",
        "status",
        "stop_reason",
        "num_cached_tokens",
        "num_preemptions",
        "block_hashes",
        "max_tokens",
        "num_output_placeholders",
        "num_output_tokens_sent",
        "priority",
        "grammar",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams | None,
        eos_token_id: int | None,
        arrival_time: float,
        pooling: bool = False,
        block_size: int = 16,
        priority: int = 0,
    ) -> None:
        if not pooling and sampling_params is None:
            raise ValueError(f"request {request_id}: a generation request needs sampling_params")
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_id = eos_token_id
        self.arrival_time = arrival_time
        self.priority = priority  # lower runs first under the "priority" policy
        self.pooling = pooling
        self.block_size = block_size
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(self.prompt_token_ids)
        self.num_computed_tokens = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        # Prefix-cache hit tokens at the first schedule; -1 until then.
        self.num_cached_tokens = -1
        self.num_preemptions = 0
        # None means "up to the context length"; the scheduler resolves it in add_request.
        self.max_tokens: int | None = (
            1 if pooling else (sampling_params.max_tokens if sampling_params else None)
        )
        self.block_hashes: list[BlockHash] = compute_block_hashes(self.all_token_ids, block_size)
        # Async scheduling: tokens sampled by steps in flight, not yet appended.
        self.num_output_placeholders = 0
        # Pipeline batch queue: output tokens already sent to the workers in a step.
        self.num_output_tokens_sent = 0
        # Structured outputs: a structured_output.RequestGrammar, set by the scheduler.
        self.grammar = None

    @classmethod
    def from_engine_core_request(cls, req: EngineCoreRequest, block_size: int) -> Request:
        return cls(
            request_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
            sampling_params=req.sampling_params,
            eos_token_id=req.eos_token_id,
            arrival_time=req.arrival_time,
            pooling=req.pooling,
            block_size=block_size,
            priority=req.priority,
        )

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def use_structured_output(self) -> bool:
        sp = self.sampling_params
        return sp is not None and sp.structured_outputs is not None

    @property
    def finish_reason(self) -> FinishReason | None:
        return self.status.finish_reason

    def append_output_token_ids(self, token_ids: int | Iterable[int]) -> None:
        """Append sampled tokens and hash any block they complete."""
        if isinstance(token_ids, int):
            token_ids = (token_ids,)
        for t in token_ids:
            self.output_token_ids.append(t)
            self.all_token_ids.append(t)
        if len(self.all_token_ids) // self.block_size > len(self.block_hashes):
            self.block_hashes = compute_block_hashes(
                self.all_token_ids, self.block_size, self.block_hashes
            )

    def append_output_token_id(self, token_id: int) -> None:
        """`append_output_token_ids` for one token (the per-step common case)."""
        self.output_token_ids.append(token_id)
        all_ids = self.all_token_ids
        all_ids.append(token_id)
        if len(all_ids) // self.block_size > len(self.block_hashes):
            self.block_hashes = compute_block_hashes(all_ids, self.block_size, self.block_hashes)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, "
            f"tokens={self.num_tokens}, computed={self.num_computed_tokens})"
        )
