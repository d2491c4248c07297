"""Scheduler driven by a fake model runner that keeps a simulated paged KV cache.

The fake runner stores, in each KV slot, the whole token prefix up to that position, and checks
on every step that the request's block table reads back exactly its own history. Sampled tokens
are a pure function of the history, so any scheduling (chunks, preemption, prefix hits) must
give the same outputs.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from pagedllm.config import CacheConfig, SchedulerConfig
from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.scheduler import Scheduler
from pagedllm.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from pagedllm.engine.protocol import FinishReason, LogprobsLists
from pagedllm.sampling_params import SamplingParams

BS = 4
EOS = 0
TokenFn = Callable[[str, list[int], int], int]


def hash_next(rid: str, tokens: list[int], num_prompt: int) -> int:
    """Deterministic next token in [1, 60): never EOS."""
    return (sum(tokens) * 7 + len(tokens) * 3) % 59 + 1


@dataclass
class _RunnerState:
    tokens: list[int]
    num_prompt: int
    block_ids: list[int]
    computed: int
    new_count: int = 0


@dataclass
class FakeRunner:
    num_blocks: int
    token_fn: TokenFn = hash_next
    kv: dict[int, tuple[int, ...]] = field(default_factory=dict)  # slot -> prefix
    state: dict[str, _RunnerState] = field(default_factory=dict)
    new_with_output: list[str] = field(default_factory=list)

    def _slot(self, st: _RunnerState, pos: int) -> int:
        block_id = st.block_ids[pos // BS]
        assert 0 <= block_id < self.num_blocks
        return block_id * BS + pos % BS

    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        for rid in so.finished_req_ids | so.preempted_req_ids:
            self.state.pop(rid, None)
        for nr in so.scheduled_new_reqs:
            assert nr.req_id not in self.state
            if nr.output_token_ids:
                self.new_with_output.append(nr.req_id)
            self.state[nr.req_id] = _RunnerState(
                nr.prompt_token_ids + nr.output_token_ids,
                len(nr.prompt_token_ids),
                list(nr.block_ids),
                nr.num_computed_tokens,
            )
        for cr in so.scheduled_cached_reqs:
            st = self.state[cr.req_id]
            assert st.computed == cr.num_computed_tokens
            st.block_ids += cr.new_block_ids
        assert sum(so.num_scheduled_tokens.values()) == so.total_num_scheduled_tokens
        # Pass 1: write this step's KV for every request (as each attention layer does).
        for rid, n in so.num_scheduled_tokens.items():
            st = self.state[rid]
            assert n > 0 and st.computed + n <= len(st.tokens)
            assert len(st.block_ids) * BS >= st.computed + n
            assert len(set(st.block_ids)) == len(st.block_ids)
            for pos in range(st.computed, st.computed + n):
                self.kv[self._slot(st, pos)] = tuple(st.tokens[: pos + 1])
            st.computed += n
        # Pass 2: read the whole history back through the block table, then sample.
        req_ids, sampled = [], []
        for rid in so.num_scheduled_tokens:
            st = self.state[rid]
            for pos in range(st.computed):
                assert self.kv.get(self._slot(st, pos)) == tuple(st.tokens[: pos + 1]), rid
            req_ids.append(rid)
            if st.computed == len(st.tokens):
                tok = self.token_fn(rid, st.tokens, st.num_prompt)
                st.tokens.append(tok)
                sampled.append([tok])
            else:
                sampled.append([])
        return ModelRunnerOutput(req_ids=req_ids, sampled_token_ids=sampled)


def make_scheduler(
    num_blocks: int = 64,
    budget: int = 64,
    max_num_seqs: int = 16,
    max_model_len: int = 128,
    caching: bool = True,
    chunked: bool = True,
    async_scheduling: bool = False,
    policy: str = "fcfs",
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(
            max_num_batched_tokens=budget,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            enable_chunked_prefill=chunked,
            policy=policy,
        ),
        CacheConfig(block_size=BS, enable_prefix_caching=caching),
        num_blocks=num_blocks,
        max_model_len=max_model_len,
        async_scheduling=async_scheduling,
    )


def make_req(rid: str, prompt: list[int], eos: int | None = EOS, priority: int = 0,
             arrival: float = 0.0, **sp: object) -> Request:  # fmt: skip
    return Request(rid, prompt, SamplingParams(**sp), eos, arrival, block_size=BS,
                   priority=priority)  # fmt: skip


@dataclass
class RunResult:
    tokens: dict[str, list[int]]
    finish: dict[str, tuple[FinishReason, int | str | None]]
    steps: int
    totals: dict[str, int]


def _next_step(
    sched: Scheduler, runner: FakeRunner, in_flight: deque | None
) -> tuple[SchedulerOutput, ModelRunnerOutput] | None:
    """Sync: schedule and run one step. Async (`in_flight` given): keep two steps submitted
    and hand back the oldest, as EngineCore does; the fake runner knows a sampled token at
    once (the device), the scheduler only when the step is handed back."""

    def schedule() -> SchedulerOutput:
        so = sched.schedule()
        assert so.total_num_scheduled_tokens <= sched.max_num_batched_tokens
        assert sched.num_running <= sched.max_num_seqs
        return so

    if in_flight is None:
        so = schedule()
        return so, runner.execute(so)
    while len(in_flight) < 2 and sched.has_unfinished_requests():
        so = schedule()
        if so.total_num_scheduled_tokens == 0:
            runner.execute(so)  # drops finished / preempted states
            break
        in_flight.append((so, runner.execute(so)))
    return in_flight.popleft() if in_flight else None


def run(
    sched: Scheduler, runner: FakeRunner, max_steps: int = 2000
) -> RunResult:
    tokens: dict[str, list[int]] = defaultdict(list)
    finish: dict[str, tuple[FinishReason, int | str | None]] = {}
    totals: dict[str, int] = defaultdict(int)
    steps = 0
    in_flight: deque | None = deque() if sched.async_scheduling else None
    while sched.has_unfinished_requests() or in_flight:
        steps += 1
        assert steps < max_steps, "scheduler made no progress"
        step = _next_step(sched, runner, in_flight)
        if step is None:
            continue
        eco = sched.update_from_output(*step)
        stats = eco.scheduler_stats
        assert stats is not None
        for name in (
            "num_preemptions",
            "num_prompt_tokens",
            "num_generation_tokens",
            "prefix_cache_queries",
            "prefix_cache_hits",
        ):
            totals[name] += getattr(stats, name)
        for o in eco.outputs:
            assert o.request_id not in finish
            tokens[o.request_id] += o.new_token_ids
            if o.finished:
                finish[o.request_id] = (o.finish_reason, o.stop_reason)
    assert sched.kv_cache_manager.num_free_blocks == sched.kv_cache_manager.num_blocks
    return RunResult(dict(tokens), finish, steps, dict(totals))


def workload() -> list[Request]:
    reqs = []
    for i in range(6):
        prompt = [10 + i % 2] * 9 + list(range(i, i + 3 + 2 * i))  # shared prefixes
        reqs.append(make_req(f"r{i}", prompt, max_tokens=6 + 2 * i, ignore_eos=True))
    return reqs


def reference_tokens() -> dict[str, list[int]]:
    sched = make_scheduler(num_blocks=256, budget=512, caching=False)
    for r in workload():
        sched.add_request(r)
    return run(sched, FakeRunner(256)).tokens


def test_reference_run_shape() -> None:
    ref = reference_tokens()
    assert [len(ref[f"r{i}"]) for i in range(6)] == [6 + 2 * i for i in range(6)]


@pytest.mark.parametrize("caching", [True, False])
def test_chunked_prefill_tiny_budget(caching: bool) -> None:
    sched = make_scheduler(budget=5, caching=caching)
    prompt = list(range(1, 24))  # 23 tokens -> 5 chunks
    sched.add_request(make_req("long", prompt, max_tokens=3))
    runner = FakeRunner(64)
    outs = []
    for _ in range(5):
        so = sched.schedule()
        assert so.num_scheduled_tokens == {"long": 5 if len(outs) < 4 else 3}
        outs.append(sched.update_from_output(so, runner.execute(so)).outputs)
    assert outs[:4] == [[], [], [], []] and len(outs[4][0].new_token_ids) == 1
    res = run(sched, runner)
    assert len(res.tokens["long"]) == 2
    assert res.finish["long"][0] == FinishReason.LENGTH


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("caching", [True, False])
def test_workload_matches_reference_under_pressure(caching: bool, async_scheduling: bool) -> None:
    ref = reference_tokens()
    sched = make_scheduler(
        num_blocks=10, budget=7, max_num_seqs=3, caching=caching, async_scheduling=async_scheduling
    )
    for r in workload():
        sched.add_request(r)
    runner = FakeRunner(10)
    res = run(sched, runner)
    assert res.tokens == ref
    assert res.totals["num_preemptions"] > 0  # the small cache forced preemption
    assert runner.new_with_output, "a resumed request must come back as NEW with its output"
    assert res.totals["num_generation_tokens"] == sum(len(t) for t in ref.values())


def _two_requests_in_three_blocks(
    async_scheduling: bool = False,
) -> tuple[Scheduler, Request, Request, FakeRunner]:
    """Two 4-token prompts that each grow to a 2nd block: both cannot run in 3 blocks."""
    sched = make_scheduler(num_blocks=3, budget=64, caching=False,
                           async_scheduling=async_scheduling)
    a = make_req("a", [1, 2, 3, 4], max_tokens=6, ignore_eos=True)
    b = make_req("b", [5, 6, 7, 8], max_tokens=6, ignore_eos=True)
    sched.add_request(a)
    sched.add_request(b)
    return sched, a, b, FakeRunner(3)


def test_preemption_victim_is_newest_and_goes_first_in_line() -> None:
    sched, a, b, runner = _two_requests_in_three_blocks()
    so = sched.schedule()
    assert list(so.num_scheduled_tokens) == ["a", "b"]
    sched.update_from_output(so, runner.execute(so))
    # Each now needs a second block; only one is free: a gets it, b's step still fits...
    preempted_seen = False
    while sched.has_unfinished_requests():
        so = sched.schedule()
        if so.preempted_req_ids:
            preempted_seen = True
            assert so.preempted_req_ids == {"b"} and "b" not in so.num_scheduled_tokens
            assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
            assert sched.waiting[0] is b and b.num_preemptions == 1
            assert not so.scheduled_new_reqs  # no admissions in a step that preempted
        sched.update_from_output(so, runner.execute(so))
    assert preempted_seen and a.num_preemptions == 0


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_max_num_seqs_cap(async_scheduling: bool) -> None:
    sched = make_scheduler(max_num_seqs=2, async_scheduling=async_scheduling)
    for i in range(5):
        sched.add_request(make_req(f"q{i}", [i + 1] * 3, max_tokens=4, ignore_eos=True))
    runner = FakeRunner(64)
    so = sched.schedule()
    assert len(so.num_scheduled_tokens) == 2 and sched.num_waiting == 3
    sched.update_from_output(so, runner.execute(so))
    res = run(sched, runner)
    assert len(res.finish) == 5


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_prefix_cache_hits_through_scheduler(async_scheduling: bool) -> None:
    sched = make_scheduler(async_scheduling=async_scheduling)
    prefix = list(range(30, 42))  # 3 full blocks
    runner = FakeRunner(64)
    a = make_req("a", prefix + [1, 2], max_tokens=2, ignore_eos=True)
    sched.add_request(a)
    res_a = run(sched, runner)
    b = make_req("b", prefix + [3], max_tokens=2, ignore_eos=True)
    sched.add_request(b)
    so = sched.schedule()
    assert so.scheduled_new_reqs[0].num_computed_tokens == 12
    assert so.num_scheduled_tokens == {"b": 1} and b.num_cached_tokens == 12
    eco = sched.update_from_output(so, runner.execute(so))
    assert eco.outputs[0].num_cached_tokens == 12
    stats = eco.scheduler_stats
    assert stats is not None and stats.prefix_cache_hits == 12 and stats.prefix_cache_queries == 13
    assert stats.num_prompt_tokens == 1
    run(sched, runner)
    assert a.num_cached_tokens == 0 and len(res_a.tokens["a"]) == 2


def test_abort_waiting_and_running_frees_blocks() -> None:
    sched = make_scheduler(max_num_seqs=1)
    runner = FakeRunner(64)
    sched.add_request(make_req("run", [1] * 9, max_tokens=20, ignore_eos=True))
    sched.add_request(make_req("wait", [2] * 9, max_tokens=20, ignore_eos=True))
    so = sched.schedule()
    sched.update_from_output(so, runner.execute(so))
    assert sched.kv_cache_manager.num_free_blocks < 64
    so = sched.schedule()
    # Abort between schedule and update: the late output is ignored.
    sched.finish_requests(["run", "wait", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert sched.kv_cache_manager.num_free_blocks == 64
    eco = sched.update_from_output(so, runner.execute(so))
    assert eco.outputs == [] and not sched.has_unfinished_requests()
    assert sched.get_num_unfinished_requests() == 0
    assert sched.schedule().finished_req_ids == {"run", "wait"}
    assert sched.schedule().finished_req_ids == set()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_impossible_requests_rejected_others_flow(async_scheduling: bool) -> None:
    sched = make_scheduler(num_blocks=4, max_model_len=40, async_scheduling=async_scheduling)
    with pytest.raises(
        ValueError,
        match=r"maximum context length is 40 tokens.*requested 45 "
        r"tokens \(30 in the prompt, 15 in the completion\)",
    ):
        sched.add_request(make_req("too-long", [1] * 30, max_tokens=15))
    with pytest.raises(ValueError, match="KV-cache blocks"):
        sched.add_request(make_req("too-big", [1] * 14, max_tokens=10))
    with pytest.raises(ValueError, match="empty"):
        sched.add_request(make_req("empty", []))
    assert sched.num_waiting == 0
    sched.add_request(make_req("ok", [1] * 10, max_tokens=7, ignore_eos=True))  # 16 KV tokens
    with pytest.raises(ValueError, match="already in use"):
        sched.add_request(make_req("ok", [1] * 3))
    res = run(sched, FakeRunner(4))
    assert len(res.tokens["ok"]) == 7


def test_no_chunking_rejects_long_prompt_and_waits_for_budget() -> None:
    sched = make_scheduler(budget=8, chunked=False)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        sched.add_request(make_req("x", [1] * 9))
    sched.add_request(make_req("a", [1] * 6, max_tokens=3, ignore_eos=True))
    sched.add_request(make_req("b", [2] * 6, max_tokens=3, ignore_eos=True))
    so = sched.schedule()
    assert so.num_scheduled_tokens == {"a": 6}  # b would not fit whole
    runner = FakeRunner(64)
    sched.update_from_output(so, runner.execute(so))
    assert len(run(sched, runner).tokens) == 2


def scripted(script: dict[str, list[int]]) -> TokenFn:
    return lambda rid, toks, n_prompt: script[rid][len(toks) - n_prompt]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_stop_checks(async_scheduling: bool) -> None:
    script = {
        "eos": [5, 6, EOS, 7, 8],
        "stop_id": [5, 9, 6, 7, 8],
        "min_tokens": [EOS, 5, EOS, 6, 7],
        "ignore_eos": [EOS, EOS, EOS, 5, 6],
        "eos_at_max": [5, 6, EOS, 7, 8],
        "no_eos_id": [5, EOS, 6, 7, 8],
    }
    sched = make_scheduler(async_scheduling=async_scheduling)
    sched.add_request(make_req("eos", [1, 2], max_tokens=5))
    sched.add_request(make_req("stop_id", [1, 2], max_tokens=5, stop_token_ids=[9]))
    sched.add_request(make_req("min_tokens", [1, 2], max_tokens=5, min_tokens=2))
    sched.add_request(make_req("ignore_eos", [1, 2], max_tokens=4, ignore_eos=True))
    sched.add_request(make_req("eos_at_max", [1, 2], max_tokens=3))
    sched.add_request(make_req("no_eos_id", [1, 2], eos=None, max_tokens=3))
    res = run(sched, FakeRunner(64, token_fn=scripted(script)))
    assert res.tokens["eos"] == [5, 6, EOS] and res.finish["eos"] == (FinishReason.STOP, None)
    assert res.tokens["stop_id"] == [5, 9] and res.finish["stop_id"] == (FinishReason.STOP, 9)
    assert res.tokens["min_tokens"] == [EOS, 5, EOS]
    assert res.finish["min_tokens"] == (FinishReason.STOP, None)
    assert res.tokens["ignore_eos"] == [EOS, EOS, EOS, 5]
    assert res.finish["ignore_eos"] == (FinishReason.LENGTH, None)
    # Length is checked before EOS (vLLM's order).
    assert res.finish["eos_at_max"] == (FinishReason.LENGTH, None)
    assert res.tokens["no_eos_id"] == [5, EOS, 6]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_max_model_len_caps_generation(async_scheduling: bool) -> None:
    sched = make_scheduler(max_model_len=12, async_scheduling=async_scheduling)
    req = make_req("r", [1] * 5, max_tokens=None, ignore_eos=True)
    sched.add_request(req)
    assert req.max_tokens == 7
    res = run(sched, FakeRunner(64))
    assert len(res.tokens["r"]) == 7 and res.finish["r"][0] == FinishReason.LENGTH
    # The length check also fires on num_tokens >= max_model_len on its own.
    sched2 = make_scheduler(max_model_len=12, async_scheduling=async_scheduling)
    req2 = make_req("r2", [1] * 5, max_tokens=7, ignore_eos=True)
    sched2.add_request(req2)
    sched2.max_model_len = 9
    res2 = run(sched2, FakeRunner(64))
    assert len(res2.tokens["r2"]) == 4 and res2.finish["r2"][0] == FinishReason.LENGTH


def test_logprobs_and_prompt_logprobs_forwarded() -> None:
    sched = make_scheduler()
    sched.add_request(make_req("r", [1, 2, 3], max_tokens=2, ignore_eos=True, prompt_logprobs=1))
    runner = FakeRunner(64)
    lp = LogprobsLists([[7, 7]], [[-0.1, -0.1]], [1])
    plp = LogprobsLists([[2, 2], [3, 3]], [[-1.0, -1.0], [-2.0, -2.0]], [1, 1])
    so = sched.schedule()
    mro = runner.execute(so)
    mro.logprobs["r"] = lp
    mro.prompt_logprobs["r"] = plp
    out = sched.update_from_output(so, mro).outputs[0]
    assert out.new_logprobs == lp and out.new_prompt_logprobs == plp
    so = sched.schedule()
    mro = runner.execute(so)
    mro.prompt_logprobs["r"] = plp
    out = sched.update_from_output(so, mro).outputs[0]
    assert out.new_prompt_logprobs is None and out.finished  # sent only with the first token


def test_pooling_request_finishes_after_prompt() -> None:
    sched = make_scheduler(budget=4)
    req = Request("emb", [3] * 4, None, None, 0.0, pooling=True, block_size=BS)
    sched.add_request(req)
    with pytest.raises(ValueError, match="one step"):
        sched.add_request(Request("long", [3] * 5, None, None, 0.0, pooling=True, block_size=BS))
    sched.add_request(make_req("gen", [4] * 4, max_tokens=2, ignore_eos=True))
    so = sched.schedule()
    assert so.num_scheduled_tokens == {"emb": 4}  # pooling prompts are never chunked
    mro = FakeRunner(64).execute(so)
    mro.pooler_output["emb"] = [0.5, 0.25]
    eco = sched.update_from_output(so, mro)
    (out,) = eco.outputs
    assert out.finish_reason == FinishReason.STOP and out.pooling_output == [0.5, 0.25]
    assert out.new_token_ids == [] and sched.num_running == 0


def test_async_placeholders_schedule_the_next_decode_before_the_token_is_known() -> None:
    sched = make_scheduler(async_scheduling=True)
    a = make_req("a", [1, 2, 3, 4, 5], max_tokens=3, ignore_eos=True)
    one = make_req("one", [6, 7, 8], max_tokens=1, ignore_eos=True)
    sched.add_request(a)
    sched.add_request(one)
    runner = FakeRunner(64)
    so1 = sched.schedule()
    assert so1.num_scheduled_tokens == {"a": 5, "one": 3}
    assert a.num_output_placeholders == 1 and one.num_output_placeholders == 1
    out1 = runner.execute(so1)
    # Step 2 is scheduled before step 1's tokens are known: a decodes its pending token;
    # `one` is not scheduled (its only token is in flight).
    so2 = sched.schedule()
    assert so2.num_scheduled_tokens == {"a": 1}
    assert a.num_computed_tokens == 6 and a.num_output_placeholders == 2 and a.num_tokens == 5
    out2 = runner.execute(so2)
    eco = sched.update_from_output(so1, out1)
    assert {o.request_id: o.new_token_ids for o in eco.outputs} == {
        "a": runner.state["a"].tokens[5:6], "one": runner.state["one"].tokens[3:4]
    }
    assert one.is_finished and a.num_output_placeholders == 1 and a.num_tokens == 6
    # With two tokens resolved or in flight and max_tokens=3, a gets its last decode.
    so3 = sched.schedule()
    assert so3.num_scheduled_tokens == {"a": 1} and "one" in so3.finished_req_ids
    out3 = runner.execute(so3)
    sched.update_from_output(so2, out2)
    assert sched.schedule().num_scheduled_tokens == {}  # the 3rd token is in flight
    eco = sched.update_from_output(so3, out3)
    assert a.is_finished and eco.outputs[0].finish_reason == FinishReason.LENGTH
    assert len(a.output_token_ids) == 3 and a.output_token_ids == runner.state["a"].tokens[5:]


def test_async_preemption_drops_placeholders() -> None:
    sched, a, b, runner = _two_requests_in_three_blocks(async_scheduling=True)
    so1 = sched.schedule()
    out1 = runner.execute(so1)
    so2 = sched.schedule()  # both need a 2nd block for the pending token; one is free
    assert so2.preempted_req_ids == {"b"} and so2.num_scheduled_tokens == {"a": 1}
    assert b.num_output_placeholders == 0 and b.num_computed_tokens == 0
    runner.execute(so2)
    eco = sched.update_from_output(so1, out1)
    # b's token sampled in step 1 is dropped (b will recompute it); a's arrives.
    assert [o.request_id for o in eco.outputs] == ["a"] and b.num_output_tokens == 0


# ---------------------------------------------------------------- priority policy


def _admission_order(sched: Scheduler, runner: FakeRunner) -> list[str]:
    order: list[str] = []
    while sched.has_unfinished_requests():
        so = sched.schedule()
        order += [nr.req_id for nr in so.scheduled_new_reqs]
        sched.update_from_output(so, runner.execute(so))
    return order


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_waiting_requests_admitted_by_policy(policy: str) -> None:
    sched = make_scheduler(max_num_seqs=1, policy=policy)
    # (priority, arrival): lower priority values first, then earlier arrivals.
    for rid, prio, t in [("a", 1, 0.0), ("b", 0, 1.0), ("c", 0, 2.0), ("d", -1, 3.0)]:
        sched.add_request(make_req(rid, [7, 8, 9], priority=prio, arrival=t, max_tokens=2,
                                   ignore_eos=True))  # fmt: skip
    order = _admission_order(sched, FakeRunner(64))
    assert order == (["a", "b", "c", "d"] if policy == "fcfs" else ["d", "b", "c", "a"])


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_priority_preemption_evicts_least_important_even_if_scheduled_first(
    async_scheduling: bool,
) -> None:
    """a (priority 5) arrived first and was scheduled first in the step where both requests
    need a second block and one is free: under "priority" a is the victim, its share of the
    step is taken back, and b runs; outputs stay those of an unconstrained run."""
    sched = make_scheduler(num_blocks=3, budget=64, caching=False, policy="priority",
                           async_scheduling=async_scheduling)  # fmt: skip
    a = make_req("a", [1, 2, 3, 4], priority=5, arrival=0.0, max_tokens=6, ignore_eos=True)
    b = make_req("b", [5, 6, 7, 8], priority=0, arrival=1.0, max_tokens=6, ignore_eos=True)
    sched.add_request(a)
    sched.add_request(b)
    runner = FakeRunner(3)
    preempted: list[set[str]] = []
    tokens: dict[str, list[int]] = defaultdict(list)
    in_flight: deque | None = deque() if async_scheduling else None
    while sched.has_unfinished_requests() or in_flight:
        step = _next_step(sched, runner, in_flight)
        if step is None:
            continue
        so, mro = step
        if so.preempted_req_ids:
            preempted.append(set(so.preempted_req_ids))
            assert "a" not in so.num_scheduled_tokens
            assert so.total_num_scheduled_tokens == sum(so.num_scheduled_tokens.values())
        for o in sched.update_from_output(so, mro).outputs:
            tokens[o.request_id] += o.new_token_ids
    assert preempted and all(p == {"a"} for p in preempted)
    assert b.num_preemptions == 0 and a.num_preemptions >= 1
    free = make_scheduler(num_blocks=64, budget=64, caching=False)
    for r in (make_req("a", [1, 2, 3, 4], max_tokens=6, ignore_eos=True),
              make_req("b", [5, 6, 7, 8], max_tokens=6, ignore_eos=True)):  # fmt: skip
        free.add_request(r)
    assert dict(tokens) == run(free, FakeRunner(64)).tokens


def test_priority_queue_abort_and_order() -> None:
    sched = make_scheduler(max_num_seqs=1, policy="priority")
    for rid, prio in [("x", 3), ("y", 1), ("z", 2)]:
        sched.add_request(make_req(rid, [4, 5], priority=prio, max_tokens=2, ignore_eos=True))
    assert [r.request_id for r in sched.waiting] == ["y", "z", "x"]
    sched.finish_requests("z", RequestStatus.FINISHED_ABORTED)
    assert [r.request_id for r in sched.waiting] == ["y", "x"]
    res = run(sched, FakeRunner(64))
    assert set(res.finish) == {"y", "x"}
    with pytest.raises(ValueError, match="scheduling policy"):
        make_scheduler(policy="lifo")


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_incremental_step_data_equals_a_rebuild(policy: str, async_scheduling: bool) -> None:
    """Random arrivals, aborts and preemptions: each step lists in scheduled_cached_reqs
    exactly the running requests that got blocks, and a worker that only applies those
    lists and advances every scheduled request by its tokens holds, after every step, the
    block tables and progress the scheduler would send from scratch."""
    import random

    rng = random.Random(11)
    sched = make_scheduler(num_blocks=14, budget=9, max_num_seqs=5,
                           async_scheduling=async_scheduling, policy=policy)  # fmt: skip
    runner = FakeRunner(14)
    in_flight: deque | None = deque() if async_scheduling else None
    n_added, steps, listed_empty = 0, 0, 0
    saw_preemption = False
    while n_added < 30 or sched.has_unfinished_requests() or in_flight:
        steps += 1
        assert steps < 3000
        if n_added < 30 and rng.random() < 0.5:
            prompt = [rng.randrange(1, 60) for _ in range(rng.randint(1, 10))]
            sched.add_request(make_req(f"q{n_added}", prompt, priority=rng.randint(0, 3),
                                       arrival=float(n_added), max_tokens=rng.randint(1, 8),
                                       ignore_eos=True))  # fmt: skip
            n_added += 1
        if sched.running and rng.random() < 0.1:
            sched.finish_requests(rng.choice(sched.running).request_id,
                                  RequestStatus.FINISHED_ABORTED)  # fmt: skip
        before = {r.request_id: len(sched.kv_cache_manager.get_block_ids(r.request_id))
                  for r in sched.running}  # fmt: skip
        step = _next_step(sched, runner, in_flight)
        if step is None:
            continue
        so, mro = step
        saw_preemption |= bool(so.preempted_req_ids)
        if in_flight is None:  # the step just scheduled: compare with the tables before it
            new_ids = {nr.req_id for nr in so.scheduled_new_reqs}
            grew = {rid for rid in so.num_scheduled_tokens if rid not in new_ids
                    and len(sched.kv_cache_manager.get_block_ids(rid)) > before.get(rid, 0)}
            assert {cr.req_id for cr in so.scheduled_cached_reqs} == grew
        listed_empty += sum(not cr.new_block_ids for cr in so.scheduled_cached_reqs)
        for rid, st in runner.state.items():
            req = sched.requests.get(rid)
            if req is not None and req.status == RequestStatus.RUNNING:
                assert st.block_ids == sched.kv_cache_manager.get_block_ids(rid)
                # (the fake runner runs a step as soon as it is scheduled)
                assert st.computed == req.num_computed_tokens
        sched.update_from_output(so, mro)
    assert listed_empty == 0 and saw_preemption
    assert sched.kv_cache_manager.num_free_blocks == sched.kv_cache_manager.num_blocks

