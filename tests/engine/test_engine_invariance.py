"""Same greedy tokens whatever the batching: batched vs alone, chunked prefill, prefix hits,
preemption. Every request finishes."""

from __future__ import annotations

import numpy as np
import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.model_executor.loader.resolve import default_model_path as smollm2_path

MAX_TOKENS = 12


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lens = rng.integers(3, 160, size=n)
    return [rng.integers(200, 40000, size=int(L)).tolist() for L in lens]


def _gen(llm, prompts, max_tokens=MAX_TOKENS):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert all(o.finished for o in outs)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def reference(smol_llm):
    prompts = _prompts(32)
    smol_llm.reset_prefix_cache()
    alone = [_gen(smol_llm, [p])[0] for p in prompts]
    return prompts, alone


def test_batch_of_32_equals_alone(smol_llm, reference):
    prompts, alone = reference
    smol_llm.reset_prefix_cache()
    assert _gen(smol_llm, prompts) == alone


def test_chunked_prefill_tiny_budget(reference):
    prompts, alone = reference
    llm = LLM(model=smollm2_path(), dtype="float32", max_num_batched_tokens=24, max_num_seqs=8,
              kv_cache_space=0.5)
    assert _gen(llm, prompts[:12]) == alone[:12]


def test_prefix_cache_hits(smol_llm):
    engine = smol_llm.llm_engine
    rng = np.random.default_rng(7)
    shared = rng.integers(200, 40000, size=80).tolist()
    prompts = [shared + rng.integers(200, 40000, size=k).tolist() for k in (3, 9, 20)]
    smol_llm.reset_prefix_cache()
    alone = []
    for p in prompts:
        smol_llm.reset_prefix_cache()
        alone.append(_gen(smol_llm, [p])[0])
    smol_llm.reset_prefix_cache()
    _gen(smol_llm, [prompts[0]])
    hits_before = engine.total_prefix_cache_hits
    got = _gen(smol_llm, prompts[1:])
    assert got == alone[1:]
    # both later prompts reuse the 80-token shared prefix (5 full blocks of 16)
    assert engine.total_prefix_cache_hits - hits_before >= 2 * 64


def test_preemption_gives_same_tokens(smol_llm):
    rng = np.random.default_rng(3)
    prompts = [rng.integers(200, 40000, size=int(n)).tolist() for n in rng.integers(4, 14, 12)]
    smol_llm.reset_prefix_cache()
    # The reference batch fits the default cache: no preemption (batched == alone is
    # test_batch_of_32_equals_alone's claim).
    preempted_before = smol_llm.llm_engine.total_num_preemptions
    alone = _gen(smol_llm, prompts, 40)
    assert smol_llm.llm_engine.total_num_preemptions == preempted_before
    # Each request admits with one block and grows to 3-4 while decoding: 12 of them cannot
    # all fit in 16 blocks, so running requests get preempted and recomputed.
    llm = LLM(model=smollm2_path(), dtype="float32", num_gpu_blocks_override=16)
    got = _gen(llm, prompts, 40)
    assert got == alone
    assert llm.llm_engine.total_num_preemptions > 0


def test_request_that_never_fits_is_rejected(smol_llm):
    with pytest.raises(ValueError, match="maximum context length|longer than"):
        smol_llm.generate(
            [{"prompt_token_ids": [300] * 10}],
            SamplingParams(max_tokens=smol_llm.llm_engine.model_config.max_model_len),
            use_tqdm=False,
        )
    # the engine still serves afterwards
    assert _gen(smol_llm, [[300, 301, 302]], 2)[0]


def test_kv_cache_starts_zeroed_and_stale_slots_never_leak():
    # Attention reads slots no request wrote (the rest of a last block, padding blocks of a
    # batched decode gather) and masks them after the product: the cache must start as
    # zeros (garbage can be NaN, and 0 x NaN = NaN), and stale finite values must not matter.
    llm = LLM(model=smollm2_path(), dtype="float32", num_gpu_blocks_override=64)
    runner = llm.llm_engine.engine_core.executor.worker.model_runner
    assert all(int(c.count_nonzero()) == 0 for c in runner.kv_caches)
    prompts = _prompts(6, seed=11)
    want = _gen(llm, prompts)
    for c in runner.kv_caches:
        c.fill_(1.0e4)  # every slot stale; each step overwrites the ones it computes
    llm.reset_prefix_cache()
    assert _gen(llm, prompts) == want
