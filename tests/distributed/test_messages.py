"""Executor <-> worker messages: one msgspec encoding of a step, restored exactly."""

from __future__ import annotations

import msgspec

from pagedllm.core.scheduler_output import (
    CachedRequestData,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
)
from pagedllm.engine.protocol import LogprobsLists
from pagedllm.executor import messages as m
from pagedllm.sampling_params import SamplingParams


def test_step_message_round_trip_keeps_order_and_stop_ids():
    sp = SamplingParams(temperature=0.7, top_k=5, min_tokens=3, stop_token_ids=[9], seed=4)
    sp.all_stop_token_ids = {2, 9}  # 2: the EOS id the input processor adds
    so = SchedulerOutput(
        scheduled_new_reqs=[NewRequestData("b", [1, 2, 3], [], sp, [4, 5], 0),
                            NewRequestData("e", [7], [], None, [6], 0)],
        scheduled_cached_reqs=[CachedRequestData("a", [8], 17)],
        num_scheduled_tokens={"b": 3, "a": 1, "e": 1},  # batch order, not sorted
        total_num_scheduled_tokens=5,
        finished_req_ids={"x"},
        preempted_req_ids={"y", "z"},
    )
    payload = msgspec.msgpack.encode(m.make_step_message(7, False, so))
    msg = msgspec.msgpack.decode(payload, type=m.StepMessage)
    got = m.restore_step_message(msg)
    assert (msg.seq, msg.flush) == (7, False)
    assert list(got.num_scheduled_tokens) == ["b", "a", "e"]
    assert got.scheduled_new_reqs[0].sampling_params.all_stop_token_ids == {2, 9}
    assert got.scheduled_new_reqs[0].sampling_params == sp
    assert got.scheduled_new_reqs[1].sampling_params is None
    assert got == so


def test_step_result_round_trip():
    out = ModelRunnerOutput(["a", "b"], [[5], []],
                            logprobs={"a": LogprobsLists([[5, 1]], [[-0.1, -2.0]], [1])})
    payload = msgspec.msgpack.encode(m.StepResult(3, out))
    assert msgspec.msgpack.decode(payload, type=m.StepResult) == m.StepResult(3, out)
