"""Pipeline parallelism with the batch queue (two micro-batches in flight across two gloo
stages) through the whole engine, on a tiny random Llama: the same greedy tokens as one
process for 16 requests of mixed lengths and finish times, with aborts while steps are in
flight, and with preemption; the engine really had two steps in flight at once. The PP=2
engine starts once for the module."""

from __future__ import annotations

import numpy as np
import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.model_executor.loader.testing import build_random_hf_model_dir
from tests.model_executor.conftest import tiny_config

KV_GIB = 0.02


def _prompts(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"prompt_token_ids": rng.integers(3, 250, size=int(k)).tolist()}
            for k in rng.integers(3, 70, n)]  # fmt: skip


def _params(n: int, seed: int) -> list[SamplingParams]:
    rng = np.random.default_rng(seed)
    return [SamplingParams(temperature=0, max_tokens=int(k), ignore_eos=True)
            for k in rng.integers(1, 28, n)]  # fmt: skip


def _tokens(llm: LLM, prompts, params) -> list[list[int]]:
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert all(o.finished for o in outs)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("ppmb-model")
    return build_random_hf_model_dir(str(root / "llama"),
                                     tiny_config("LlamaForCausalLM", num_hidden_layers=4))


@pytest.fixture(scope="module")
def one_process(model):
    llm = LLM(model, skip_tokenizer_init=True, kv_cache_space=KV_GIB)
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def pp2(model):
    llm = LLM(model, skip_tokenizer_init=True, kv_cache_space=KV_GIB, pipeline_parallel_size=2)
    core = llm.llm_engine.engine_core
    assert core.max_concurrent_batches == 2
    yield llm
    core.shutdown()


def _assert_drained(llm: LLM) -> None:
    core = llm.llm_engine.engine_core
    for _ in range(4):  # a step in flight that only drops finished requests' states
        if core.has_unfinished_requests():
            assert core.step().outputs == []
    assert not core.has_unfinished_requests()
    assert not core.scheduler.in_flight
    assert core.scheduler.kv_cache_manager.usage == 0.0


def test_sixteen_mixed_requests_match_one_process(one_process, pp2):
    prompts, params = _prompts(16, seed=0), _params(16, seed=1)
    want = _tokens(one_process, prompts, params)
    core = pp2.llm_engine.engine_core
    overlapped = core.num_overlapped_steps
    got = _tokens(pp2, prompts, params)
    assert got == want
    assert [len(t) for t in got] == [p.max_tokens for p in params]  # mixed finish times
    assert core.peak_batches_in_flight == 2
    assert core.num_overlapped_steps - overlapped >= 10
    _assert_drained(pp2)


def test_aborts_while_micro_batches_are_in_flight(one_process, pp2):
    prompts = _prompts(8, seed=4)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    kept = [2, 3, 6, 7]
    want = _tokens(one_process, [prompts[i] for i in kept], params)
    engine = pp2.llm_engine
    for i, p in enumerate(prompts):
        engine.add_request(f"abort-{i}", p, params)
    finished = {}
    # Two from each micro-batch (0-3 and 4-7): one half in the step in flight at the abort.
    aborted = {"abort-0", "abort-1", "abort-4", "abort-5"}
    for step in range(400):
        if step == 4:
            assert len(engine.engine_core._in_flight) == 1
            assert len(engine.engine_core.scheduler.in_flight & aborted) == 2
            engine.abort_request(sorted(aborted))
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        if not engine.has_unfinished_requests():
            break
    assert sorted(finished) == [f"abort-{i}" for i in kept]
    got = [list(finished[f"abort-{i}"].outputs[0].token_ids) for i in kept]
    assert got == want
    _assert_drained(pp2)


def test_preemption_under_micro_batches_matches_one_process(model, one_process):
    """12 blocks of 16 tokens for 10 growing requests and a 32-token budget: chunked
    prefills, preemption and recompute while two micro-batches alternate."""
    prompts, params = _prompts(10, seed=7), _params(10, seed=8)
    params = [SamplingParams(temperature=0, max_tokens=p.max_tokens + 10, ignore_eos=True)
              for p in params]  # fmt: skip
    want = [_tokens(one_process, [p], [sp])[0] for p, sp in zip(prompts, params)]
    llm = LLM(model, skip_tokenizer_init=True, pipeline_parallel_size=2,
              num_gpu_blocks_override=12, max_num_batched_tokens=32, max_num_seqs=8)  # fmt: skip
    try:
        got = _tokens(llm, prompts, params)
        engine = llm.llm_engine
        assert engine.total_num_preemptions > 0
        assert engine.engine_core.peak_batches_in_flight == 2
        _assert_drained(llm)
    finally:
        llm.llm_engine.engine_core.shutdown()
    assert got == want
