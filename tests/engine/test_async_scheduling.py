"""Async scheduling (step N+1 scheduled and launched before step N's tokens reach the host)
gives exactly the outputs of synchronous scheduling, through the whole engine on SmolLM2:
every sampling parameter, stop conditions, chunked prefill, prefix hits, preemption, aborts.

On CPU the "device" finishes a step before `submit` returns, but every async code path runs:
placeholders in the scheduler, input ids copied from the previous step's sampled tensor,
deferred token resolution, and forced resolution for penalties.
"""

from __future__ import annotations

import numpy as np
import pytest

from pagedllm import LLM, EngineArgs, SamplingParams
from pagedllm.model_executor.loader.resolve import default_model_path as smollm2_path


def _llm(**kw) -> LLM:
    return LLM(model=smollm2_path(), dtype="float32", async_scheduling=True, **kw)


@pytest.fixture(scope="module")
def async_llm():
    llm = _llm(kv_cache_space=1)
    assert llm.llm_engine.engine_core.async_scheduling
    return llm


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(200, 40000, size=int(k)).tolist() for k in rng.integers(3, 120, n)]


def _mixed_params() -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=17, ignore_eos=True, logprobs=3),
        SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=11, max_tokens=12),
        SamplingParams(temperature=1.0, min_p=0.05, seed=5, max_tokens=9, logprobs=1),
        SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=0.7, seed=3, presence_penalty=0.5, frequency_penalty=0.4,
                       max_tokens=8),
        SamplingParams(temperature=0, min_tokens=6, max_tokens=14),
        SamplingParams(temperature=0, max_tokens=30, stop=["\n"]),
        SamplingParams(temperature=1.0, n=2, seed=9, max_tokens=6),
    ]  # fmt: skip


def _run(llm: LLM, prompts, params):
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert all(o.finished for o in outs)
    return [
        [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outs
    ]


def _logprobs(llm: LLM, prompts, params):
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [[c.logprobs for c in o.outputs] for o in outs]


def test_defaults_on_for_cuda_only():
    cfg = EngineArgs(model=smollm2_path(), device="cpu").create_engine_config()
    assert cfg.scheduler_config.async_scheduling is False
    cfg = EngineArgs(model=smollm2_path(), device="cpu", async_scheduling=True)
    assert cfg.create_engine_config().scheduler_config.async_scheduling is True


def test_mixed_sampling_params_match_sync(smol_llm, async_llm):
    texts = ["Once upon a time,", "The capital of France is", "List three colors:\n1.",
             "def fib(n):", "Hello", "Write a haiku about rain.", "1, 2, 3,", "Q: Why?\nA:",
             "The weather today", "In 1905, Einstein"]  # fmt: skip
    params = _mixed_params()
    smol_llm.reset_prefix_cache()
    async_llm.reset_prefix_cache()
    want = _run(smol_llm, texts, params)
    got = _run(async_llm, texts, params)
    assert got == want
    # Requests finished by length do not run an extra step's worth of tokens.
    assert [len(c[0]) for c in got[2]] == [17]
    lp_want = _logprobs(smol_llm, texts[2:5], params[2:5])
    lp_got = _logprobs(async_llm, texts[2:5], params[2:5])
    for w_req, g_req in zip(lp_want, lp_got):
        for w, g in zip(w_req, g_req):
            if w is None:
                assert g is None
                continue
            assert [sorted(d) for d in g] == [sorted(d) for d in w]
            for dw, dg in zip(w, g):
                for tok, lw in dw.items():
                    assert abs(dg[tok].logprob - lw.logprob) < 1e-4
                    assert dg[tok].rank == lw.rank


def test_batch_of_24_greedy_matches_sync(smol_llm, async_llm):
    prompts = [{"prompt_token_ids": p} for p in _prompts(24)]
    params = [SamplingParams(temperature=0, max_tokens=int(k), ignore_eos=True)
              for k in np.random.default_rng(1).integers(1, 24, 24)]  # fmt: skip
    smol_llm.reset_prefix_cache()
    async_llm.reset_prefix_cache()
    assert _run(async_llm, prompts, params) == _run(smol_llm, prompts, params)
    core = async_llm.llm_engine.engine_core
    assert core.scheduler.kv_cache_manager.usage == 0.0
    assert not core.scheduler.running and not core.scheduler.waiting


def test_chunked_prefill_prefix_hits_and_preemption_match_sync(smol_llm):
    rng = np.random.default_rng(3)
    shared = rng.integers(200, 40000, size=48).tolist()
    prompts = [shared + rng.integers(200, 40000, size=int(k)).tolist() for k in (3, 9, 20, 5)]
    prompts += [rng.integers(200, 40000, size=int(n)).tolist() for n in rng.integers(4, 14, 8)]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    # The reference: one synchronous batch with the default budget and cache (no chunks, no
    # preemption; batched == alone is test_engine_invariance's claim).
    smol_llm.reset_prefix_cache()
    preempted_before = smol_llm.llm_engine.total_num_preemptions
    alone = _run(smol_llm, [{"prompt_token_ids": p} for p in prompts], params)
    assert smol_llm.llm_engine.total_num_preemptions == preempted_before
    # 24-token budget: prompts split into chunks; 20 blocks of 16: running requests grow
    # past the cache and get preempted and recomputed; the shared prefix is hit.
    llm = _llm(max_num_batched_tokens=24, max_num_seqs=8, num_gpu_blocks_override=20)
    got = _run(llm, [{"prompt_token_ids": p} for p in prompts], params)
    assert got == alone
    engine = llm.llm_engine
    assert engine.total_num_preemptions > 0 and engine.total_prefix_cache_hits >= 48
    assert engine.engine_core.scheduler.kv_cache_manager.usage == 0.0


def test_abort_while_steps_are_in_flight(async_llm):
    engine = async_llm.llm_engine
    prompts = _prompts(6, seed=5)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    async_llm.reset_prefix_cache()
    want = _run(async_llm, [{"prompt_token_ids": p} for p in prompts[3:]], params)
    for i, p in enumerate(prompts):
        engine.add_request(f"abort-{i}", {"prompt_token_ids": p}, params)
    finished = {}
    for step in range(200):
        if step == 3:
            engine.abort_request(["abort-0", "abort-1", "abort-2"])
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        if not engine.has_unfinished_requests():
            break
    assert sorted(finished) == ["abort-3", "abort-4", "abort-5"]
    got = [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in finished[r].outputs]
           for r in ("abort-3", "abort-4", "abort-5")]  # fmt: skip
    assert got == want
    core = engine.engine_core
    while core.has_unfinished_requests():  # the step in flight for finished requests
        core.step()
    assert core.scheduler.kv_cache_manager.usage == 0.0
    runner = core.executor.worker.model_runner
    core.executor.execute_model(core.scheduler.schedule())  # hands the worker the finished ids
    assert runner.requests == {}
