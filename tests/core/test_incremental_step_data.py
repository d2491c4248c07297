"""The incremental step data under KV cache groups, async scheduling and the pipeline batch
queue: `scheduled_cached_reqs` lists only the running requests that got blocks (under the batch
queue also those that gained tokens), and mirrors of the workers that apply only what is listed,
advance every scheduled request by its tokens themselves and null sliding-window entries by the
worker's rule, hold after every step exactly the block tables, progress and tokens the scheduler
has. Random arrivals (shared prefixes: prefix hits), aborts and preemptions (a small cache),
the steps driven as EngineCore drives them (sync, async one step ahead, P steps in flight).
"""

from __future__ import annotations

import random
import zlib
from collections import deque
from dataclasses import dataclass, field

import pytest

from pagedllm.config import CacheConfig, SchedulerConfig
from pagedllm.core.kv_cache_groups import NULL_BLOCK_ID, build_kv_cache_spec, num_dead_blocks
from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.scheduler import Scheduler
from pagedllm.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from pagedllm.sampling_params import SamplingParams

BS = 4


@dataclass
class _State:
    tokens: list[int]  # known token ids (prompt + resolved outputs)
    tables: list[list[int]]  # per KV cache group
    computed: int
    num_pending: int = 0  # sampled by submitted steps, not resolved yet


@dataclass
class WorkerMirror:
    """A worker as ModelRunner keeps its states. `samples`: the last pipeline stage (learns
    its tokens from its own samples); else a stage before it (from `new_token_ids`)."""

    windows: tuple[int | None, ...]
    samples: bool = True
    state: dict[str, _State] = field(default_factory=dict)

    def apply(self, so: SchedulerOutput) -> list[str]:
        """One step at submit: returns the requests whose token it samples."""
        for rid in so.finished_req_ids | so.preempted_req_ids:
            self.state.pop(rid, None)
        for nr in so.scheduled_new_reqs:
            assert nr.req_id not in self.state
            self.state[nr.req_id] = _State(
                nr.prompt_token_ids + nr.output_token_ids,
                [list(nr.block_ids), *map(list, nr.extra_block_ids)], nr.num_computed_tokens,
            )  # fmt: skip
        for cr in so.scheduled_cached_reqs:
            st = self.state[cr.req_id]
            assert st.computed == cr.num_computed_tokens, cr.req_id
            for table, new in zip(st.tables, [cr.new_block_ids, *cr.extra_new_block_ids]):
                table.extend(new)
            if not self.samples:
                st.tokens.extend(cr.new_token_ids)
        sampling = []
        for rid, n in so.num_scheduled_tokens.items():
            st = self.state[rid]
            for table, w in zip(st.tables, self.windows):  # as InputBuffers fills the rows
                dead = min(num_dead_blocks(st.computed, w, BS), len(table))
                table[:dead] = [NULL_BLOCK_ID] * dead
                end = st.computed + n
                assert len(table) * BS >= end
                first = max(0, st.computed - w + 1) // BS if w is not None else 0
                if any(x is not None for x in self.windows):  # else block 0 is a real one
                    assert NULL_BLOCK_ID not in table[first : -(-end // BS)]  # the window
            if st.computed + n == len(st.tokens) + st.num_pending:
                sampling.append(rid)
                st.num_pending += self.samples
            st.computed += n
        return sampling

    def resolve(self, rid: str, tok: int) -> None:
        st = self.state.get(rid)
        if self.samples and st is not None:
            st.tokens.append(tok)
            st.num_pending -= 1


def _next_token(rid: str, n: int) -> int:
    return (int(rid[1:]) * 31 + n * 7) % 50 + 1


def _check(sched: Scheduler, so: SchedulerOutput, before: dict[str, list[int]],
           mirrors: list[WorkerMirror]) -> None:  # fmt: skip
    kvm = sched.kv_cache_manager
    new_ids = {nr.req_id for nr in so.scheduled_new_reqs}
    grew = {rid for rid in so.num_scheduled_tokens if rid not in new_ids and any(
        len(t) > n for t, n in zip(kvm.get_group_block_ids(rid), before[rid]))}
    listed = {cr.req_id for cr in so.scheduled_cached_reqs}
    if sched.max_concurrent_batches == 1:
        assert listed == grew
    else:  # also every request that gained tokens since it was last scheduled
        gained = {cr.req_id for cr in so.scheduled_cached_reqs if cr.new_token_ids}
        assert listed == grew | gained and grew <= listed
    for rid in so.num_scheduled_tokens:
        req = sched.requests[rid]
        for m in mirrors:
            st = m.state[rid]
            assert st.tables == kvm.get_group_block_ids(rid), rid
            assert st.computed == req.num_computed_tokens, rid
            if not m.samples:  # its step is not in flight: it knows every token
                assert st.tokens == req.all_token_ids, rid


def _drive(sched: Scheduler, mirrors: list[WorkerMirror], rng: random.Random,
           num_requests: int, max_in_flight: int) -> tuple[dict[str, list[int]], bool]:  # fmt: skip
    """EngineCore's loop: keeps up to `max_in_flight` steps submitted, hands back the oldest."""
    prefixes = [[rng.randrange(1, 50) for _ in range(9)] for _ in range(3)]
    q: deque[tuple[SchedulerOutput, list[str]]] = deque()
    tokens: dict[str, list[int]] = {}
    n_added, steps, preempted = 0, 0, False
    while n_added < num_requests or sched.has_unfinished_requests() or q:
        steps += 1
        assert steps < 5000
        if n_added < num_requests and rng.random() < 0.5:
            prompt = rng.choice(prefixes)[: rng.randint(0, 9)]
            prompt += [rng.randrange(1, 50) for _ in range(rng.randint(1, 8))]
            rid = f"r{n_added}"
            sched.add_request(Request(rid, prompt, SamplingParams(
                max_tokens=rng.randint(1, 12), ignore_eos=True), None, float(n_added),
                block_size=BS))  # fmt: skip
            tokens[rid] = []
            n_added += 1
        if sched.running and rng.random() < 0.05:
            sched.finish_requests(rng.choice(sched.running).request_id,
                                  RequestStatus.FINISHED_ABORTED)  # fmt: skip
        while len(q) < max_in_flight and sched.has_unfinished_requests():
            before = {r.request_id: [len(t) for t in sched.kv_cache_manager.get_group_block_ids(
                r.request_id)] for r in sched.running}  # fmt: skip
            so = sched.schedule()
            preempted |= bool(so.preempted_req_ids)
            if so.total_num_scheduled_tokens == 0:
                if so.finished_req_ids or so.preempted_req_ids:
                    for m in mirrors:
                        m.apply(so)
                break
            sampling = [m.apply(so) for m in mirrors][0]
            _check(sched, so, before, mirrors)
            q.append((so, sampling))
        if not q:
            continue
        so, sampling = q.popleft()
        toks = {rid: _next_token(rid, len(tokens[rid])) for rid in sampling}
        for m in mirrors:
            for rid, tok in toks.items():
                m.resolve(rid, tok)
        mro = ModelRunnerOutput(list(so.num_scheduled_tokens),
                                [[toks[r]] if r in toks else [] for r in so.num_scheduled_tokens])
        for eco in sched.update_from_output(so, mro).outputs:
            tokens[eco.request_id] += eco.new_token_ids
    return tokens, preempted


def _scheduler(windows, caching: bool, async_scheduling: bool, batches: int) -> Scheduler:
    spec = build_kv_cache_spec(list(windows), max_model_len=64)
    # The largest request (17 prompt + 12 output tokens) and a few blocks more: preemptions.
    num_blocks = spec.max_blocks(28, BS, 10) + spec.num_reserved_blocks + 4
    return Scheduler(
        SchedulerConfig(max_num_batched_tokens=10, max_num_seqs=6, max_model_len=64),
        CacheConfig(block_size=BS, enable_prefix_caching=caching),
        num_blocks=num_blocks, max_model_len=64, async_scheduling=async_scheduling,
        kv_cache_spec=spec, max_concurrent_batches=batches,
    )  # fmt: skip


@pytest.mark.parametrize("windows", [(None,), (None, 6, None, 6), (9, 9, None)])
@pytest.mark.parametrize("mode", ["sync", "async", "queue2", "queue3"])
@pytest.mark.parametrize("caching", [True, False])
def test_listing_keeps_workers_equal_to_the_scheduler(windows, mode: str, caching: bool) -> None:
    batches = int(mode[-1]) if mode.startswith("queue") else 1
    async_scheduling = mode == "async"
    sched = _scheduler(windows, caching, async_scheduling, batches)
    group_windows = tuple(g.sliding_window for g in sched.kv_cache_manager.spec.groups)
    mirrors = [WorkerMirror(group_windows)]
    if batches > 1:  # the first stage (tokens from the scheduler) and the sampling stage
        mirrors.insert(0, WorkerMirror(group_windows, samples=False))
    max_in_flight = batches if batches > 1 else (2 if async_scheduling else 1)
    rng = random.Random(zlib.crc32(repr((windows, mode, caching)).encode()))
    tokens, preempted = _drive(sched, mirrors, rng, 24, max_in_flight)
    assert preempted  # the small cache preempts (recompute) and resumes
    kvm = sched.kv_cache_manager
    assert kvm.num_free_blocks == kvm.num_usable_blocks
    # Every request's tokens are the deterministic ones, however it was scheduled.
    for rid, toks in tokens.items():
        assert toks == [_next_token(rid, i) for i in range(len(toks))]
