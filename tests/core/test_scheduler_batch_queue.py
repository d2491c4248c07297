"""The scheduler under the pipeline batch queue (max_concurrent_batches > 1), driven as
EngineCore._step_batch_queue drives it: up to two steps submitted, the oldest handed back.

Checks: steps in flight hold disjoint requests (none is scheduled before its previous step is
back), the active requests split into even micro-batches, the tokens equal a plain run's under
preemption and chunked prefill, and the `new_token_ids` each step carries rebuild, on a stage
that never samples, exactly the tokens the sampling stage holds.
"""

from __future__ import annotations

from collections import deque

import pytest

from pagedllm.core.scheduler import Scheduler
from pagedllm.core.scheduler_output import SchedulerOutput
from tests.core.test_scheduler import (
    FakeRunner,
    make_req,
    make_scheduler,
    reference_tokens,
    workload,
)


def _queue_scheduler(**kwargs) -> Scheduler:
    sched = make_scheduler(**kwargs)
    sched.max_concurrent_batches = 2
    return sched


class FirstStageMirror:
    """What a stage before the last knows of each request: its outputs only from the steps."""

    def __init__(self) -> None:
        self.outputs: dict[str, list[int]] = {}

    def apply(self, so: SchedulerOutput) -> None:
        for rid in so.finished_req_ids | so.preempted_req_ids:
            self.outputs.pop(rid, None)
        for nr in so.scheduled_new_reqs:
            self.outputs[nr.req_id] = list(nr.output_token_ids)
        for cr in so.scheduled_cached_reqs:
            self.outputs[cr.req_id].extend(cr.new_token_ids)


def _drive(sched: Scheduler, runner: FakeRunner, max_steps: int = 3000):
    """Runs to completion; returns (tokens per request, scheduled request sets, peak)."""
    mirror = FirstStageMirror()
    q: deque = deque()
    tokens: dict[str, list[int]] = {}
    batches: list[set[str]] = []
    peak = 0
    for _ in range(max_steps):
        if not (sched.has_unfinished_requests() or q):
            break
        while len(q) < 2 and sched.has_unfinished_requests():
            so = sched.schedule()
            if so.total_num_scheduled_tokens == 0 and not (
                so.finished_req_ids or so.preempted_req_ids
            ):
                break
            ids = set(so.num_scheduled_tokens)
            for _, other, _ in q:
                assert not ids & other, "a request was scheduled while its step was in flight"
            mirror.apply(so)
            for rid in ids:  # the first stage's inputs are the sampling stage's tokens
                st = runner.state.get(rid)
                if st is not None:
                    assert mirror.outputs[rid] == st.tokens[st.num_prompt:], rid
            q.append((so, ids, runner.execute(so)))
            batches.append(ids)
            peak = max(peak, sum(1 for s, _, _ in q if s.total_num_scheduled_tokens))
        so, _, out = q.popleft()
        for o in sched.update_from_output(so, out).outputs:
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
    else:
        pytest.fail("scheduler made no progress")
    assert not sched.in_flight
    assert sched.kv_cache_manager.num_free_blocks == sched.kv_cache_manager.num_blocks
    return tokens, batches, peak


def test_requests_split_into_alternating_micro_batches() -> None:
    sched = _queue_scheduler(num_blocks=256, budget=512)
    for i in range(8):
        sched.add_request(make_req(f"q{i}", [5 + i] * 6, max_tokens=5, ignore_eos=True))
    tokens, batches, peak = _drive(sched, FakeRunner(256))
    assert peak == 2
    # 8 requests over 2 steps in flight: two micro-batches of 4 that alternate.
    first, second = batches[0], batches[1]
    assert len(first) == len(second) == 4 and not first & second
    for i, ids in enumerate(batches[2:10]):
        assert ids == (first if i % 2 == 0 else second)
    assert all(len(t) == 5 for t in tokens.values()) and len(tokens) == 8


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_batch_queue_matches_reference_under_pressure(async_scheduling: bool) -> None:
    """A tiny cache and budget: chunked prefills, preemption and resumption give the
    reference tokens."""
    ref = reference_tokens()
    sched = _queue_scheduler(num_blocks=10, budget=7, max_num_seqs=3,
                             async_scheduling=async_scheduling)  # fmt: skip
    for r in workload():
        sched.add_request(r)
    runner = FakeRunner(10)
    tokens, _, peak = _drive(sched, runner)
    assert tokens == ref
    assert peak == 2
    assert runner.new_with_output, "the small cache must have forced a preemption"


def test_abort_in_flight_request_is_not_scheduled_again() -> None:
    sched = _queue_scheduler(num_blocks=256, budget=512)
    for i in range(4):
        sched.add_request(make_req(f"a{i}", [7 + i] * 5, max_tokens=6, ignore_eos=True))
    runner = FakeRunner(256)
    first = sched.schedule()
    out_first = runner.execute(first)
    assert set(first.num_scheduled_tokens) == {"a0", "a1"}
    sched.finish_requests("a0", sched.requests["a0"].status.FINISHED_ABORTED)
    second = sched.schedule()  # a0 (aborted) and a1 (in flight) are not in it
    assert set(second.num_scheduled_tokens) == {"a2", "a3"}
    assert second.finished_req_ids == {"a0"}
    outs = sched.update_from_output(first, out_first).outputs
    assert [o.request_id for o in outs] == ["a1"]  # the aborted request's token is dropped
    assert sched.in_flight == {"a2", "a3"}
    third = sched.schedule()
    assert set(third.num_scheduled_tokens) == {"a1"}
    assert third.scheduled_cached_reqs[0].new_token_ids == outs[0].new_token_ids
