"""msgspec messages between the engine core's executor and its worker processes.

Engine -> workers, on one PUB socket (every rank receives every frame):
`[kind, payload]` with kind one of the `TO_WORKER_*` bytes. Workers -> engine, on one PULL
socket: `[kind, payload]` with kind one of `FROM_WORKER_*`. Scheduler outputs and runner
outputs are dataclasses, which msgspec encodes natively; nothing is pickled per step.
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np

from pagedllm.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from pagedllm.structured_output.manager import GrammarBitmask

TO_WORKER_STEP = b"S"
TO_WORKER_FLUSH = b"F"  # resolve every submitted step now (someone waits on the newest)
TO_WORKER_RPC = b"R"
TO_WORKER_SHUTDOWN = b"X"

FROM_WORKER_READY = b"r"
FROM_WORKER_OUTPUT = b"o"
FROM_WORKER_RPC = b"c"
FROM_WORKER_ERROR = b"e"


class StepMessage(msgspec.Struct, array_like=True):
    seq: int  # submission order, from 0
    flush: bool  # answer at once (synchronous execute_model)
    scheduler_output: SchedulerOutput
    # Per new request: SamplingParams.all_stop_token_ids, which its __post_init__ resets on
    # decode (it holds the EOS id the input processor added).
    stop_token_ids: list[list[int]]
    # Structured outputs: the step's token bitmask (int32 [len(grammar_req_ids), words]),
    # filled by the engine core before the step is published.
    grammar_req_ids: list[str] | None = None
    grammar_bitmask: bytes | None = None


class StepResult(msgspec.Struct, array_like=True):
    seq: int
    output: ModelRunnerOutput


class RpcMessage(msgspec.Struct, array_like=True):
    call_id: int
    method: str
    args: list[Any]


class RpcResult(msgspec.Struct, array_like=True, omit_defaults=True):
    call_id: int
    rank: int
    result: Any = None
    error: str | None = None


class WorkerReady(msgspec.Struct, array_like=True):
    rank: int
    pid: int


class WorkerError(msgspec.Struct, array_like=True):
    rank: int
    error: str


def make_step_message(
    seq: int, flush: bool, so: SchedulerOutput, bitmask: GrammarBitmask | None = None
) -> StepMessage:
    stops = [
        sorted(nr.sampling_params.all_stop_token_ids) if nr.sampling_params is not None else []
        for nr in so.scheduled_new_reqs
    ]
    if bitmask is None:
        return StepMessage(seq, flush, so, stops)
    words = np.ascontiguousarray(bitmask.bitmask, dtype=np.int32)
    return StepMessage(seq, flush, so, stops, list(bitmask.req_ids), words.tobytes())


def step_grammar_bitmask(msg: StepMessage) -> GrammarBitmask | None:
    """The bitmask a step message carries, or None."""
    if msg.grammar_req_ids is None or msg.grammar_bitmask is None:
        return None
    flat = np.frombuffer(msg.grammar_bitmask, dtype=np.int32)
    rows = len(msg.grammar_req_ids)
    return GrammarBitmask(msg.grammar_req_ids, flat.reshape(rows, -1) if rows else flat)


def restore_step_message(msg: StepMessage) -> SchedulerOutput:
    """The decoded scheduler output with what decoding dropped put back."""
    so = msg.scheduler_output
    for nr, stops in zip(so.scheduled_new_reqs, msg.stop_token_ids, strict=True):
        if nr.sampling_params is not None:
            nr.sampling_params.all_stop_token_ids = set(stops)
    return so
