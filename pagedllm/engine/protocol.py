"""Typed messages between the front-end and the engine core (msgspec, never pickle).

This module is a leaf: it imports nothing from pagedllm but SamplingParams, so `core/`
may build these messages without depending on the rest of `engine/`.
"""

from __future__ import annotations

import enum
import time

import msgspec

from pagedllm.sampling_params import SamplingParams


class FinishReason(enum.IntEnum):
    STOP = 0
    LENGTH = 1
    ABORT = 2

    def __str__(self) -> str:
        return ("stop", "length", "abort")[self.value]


class EngineCoreRequest(msgspec.Struct, omit_defaults=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams | None
    eos_token_id: int | None
    arrival_time: float
    # Embedding requests carry pooling instead of sampling parameters.
    pooling: bool = False
    priority: int = 0


class LogprobsLists(msgspec.Struct, array_like=True):
    """Per position: [sampled token, top-1 .. top-k] ids and their logprobs."""

    logprob_token_ids: list[list[int]]
    logprobs: list[list[float]]
    sampled_token_ranks: list[int]  # rank of the sampled token (1 = most likely)


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    request_id: str
    new_token_ids: list[int]
    new_logprobs: LogprobsLists | None = None
    # For prompt positions 1..n-1 (position 0 has none); sent once, with the first token.
    new_prompt_logprobs: LogprobsLists | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    pooling_output: list[float] | None = None
    # Wall-clock time (time.time()) the request was first scheduled; set by the engine-core
    # process on the request's first output, for the queue-time metric.
    first_scheduled_time: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class SchedulerStats(msgspec.Struct, omit_defaults=True):
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0  # fraction in [0, 1]
    prefix_cache_queries: int = 0  # tokens queried this step (counters are deltas)
    prefix_cache_hits: int = 0  # tokens hit this step
    num_preemptions: int = 0  # preemptions this step
    num_scheduled_tokens: int = 0
    num_prompt_tokens: int = 0  # prompt tokens computed this step
    num_generation_tokens: int = 0  # tokens sampled this step


class EngineCoreOutputs(msgspec.Struct, omit_defaults=True):
    outputs: list[EngineCoreOutput] = []
    scheduler_stats: SchedulerStats | None = None
    timestamp: float = msgspec.field(default_factory=time.monotonic)
    # Set when the engine core failed; the front-end fails every in-flight request with it.
    engine_error: str | None = None
    # ADD messages this engine core had taken in when it sent this (cumulative; set by the
    # engine-core process). The data-parallel router counts the requests it sent beyond this
    # as pending: routed, but not yet in `scheduler_stats`.
    num_requests_received: int = 0


# ---- Front-end <-> engine-core process (ZMQ multipart frames: [tag, msgpack payload]) ----


class EngineCoreRequestType(bytes, enum.Enum):
    """First frame of every front-end -> engine-core message."""

    ADD = b"\x00"  # payload: EngineCoreRequest
    ABORT = b"\x01"  # payload: list[str] of engine-core request ids
    UTILITY = b"\x02"  # payload: UtilityRequest
    SHUTDOWN = b"\x03"  # payload: empty


class EngineCoreOutputType(bytes, enum.Enum):
    """First frame of every engine-core -> front-end message."""

    READY = b"\x00"  # payload: EngineCoreReady
    OUTPUTS = b"\x01"  # payload: EngineCoreOutputs
    REJECTED = b"\x02"  # payload: RequestRejection
    UTILITY = b"\x03"  # payload: UtilityResult


class EngineCoreReady(msgspec.Struct):
    """The engine core's start-up handshake: sent once, before any output."""

    num_blocks: int
    block_size: int
    max_model_len: int
    pid: int


class RequestRejection(msgspec.Struct):
    """A request the engine core refused in add_request (it can never run); never queued."""

    request_id: str
    error: str


class UtilityRequest(msgspec.Struct):
    """Calls a whitelisted EngineCore method (e.g. reset_prefix_cache) in the core process."""

    call_id: int
    method: str
    args: list = []


class UtilityResult(msgspec.Struct, omit_defaults=True):
    call_id: int
    result: int | float | str | bool | None = None
    error: str | None = None
