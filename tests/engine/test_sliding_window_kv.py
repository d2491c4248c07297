"""Sliding-window KV freeing end to end: a tiny random Gemma 3 (5:1 local/global, window 12,
block size 8: six KV cache groups of one layer) with prompts five windows long gives HF's
greedy tokens with blocks freed, in a batch under chunked prefill and forced preemption, from
the prefix cache, and the same as with --disable-hybrid-kv-cache-manager (nothing freed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_hf_parity import _hf_greedy

from pagedllm import LLM, SamplingParams
from pagedllm.model_executor.loader.testing import build_random_hf_model_dir

VOCAB = 256
WINDOW = 12
BS = 8
NUM_TOKENS = 10
PROMPT_LENS = (40, 61, 9)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
        eos_token_id=None, bos_token_id=None, pad_token_id=0, sliding_window=WINDOW,
        query_pre_attn_scalar=16, architectures=["Gemma3ForCausalLM"],
        layer_types=["sliding_attention"] * 5 + ["full_attention"],
    )  # fmt: skip
    path = build_random_hf_model_dir(str(tmp_path_factory.mktemp("g3") / "m"), config, seed=3,
                                     std=0.2)  # fmt: skip
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rng = np.random.default_rng(5)
    prompts = [rng.integers(1, VOCAB, size=n).tolist() for n in PROMPT_LENS]
    expected = [_hf_greedy(hf, p, NUM_TOKENS)[0] for p in prompts]
    return path, prompts, expected


def _gen(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_freeing_matches_hf_batched_chunked_preempted_and_cached(gemma3):
    path, prompts, expected = gemma3
    # 40 block ids of one layer each (+ null): one 70-token request holds 9 full-layer blocks
    # and at most 5 per sliding layer (window + a 16-token chunk); three do not fit at once.
    llm = LLM(model=path, skip_tokenizer_init=True, dtype="float32", block_size=BS,
              num_gpu_blocks_override=41, max_num_batched_tokens=16, max_num_seqs=4)  # fmt: skip
    engine = llm.llm_engine
    kvm = engine.engine_core.scheduler.kv_cache_manager
    assert kvm.spec.num_groups == 6 and kvm.spec.has_sliding
    assert _gen(llm, prompts) == expected
    assert engine.total_num_preemptions > 0
    assert kvm.num_free_blocks == kvm.num_usable_blocks  # all back after the batch
    assert _gen(llm, [prompts[1]]) == [expected[1]]  # alone (hits from the batch's blocks)
    llm.reset_prefix_cache()
    assert _gen(llm, [prompts[1]]) == [expected[1]]
    hits = engine.total_prefix_cache_hits
    assert _gen(llm, [prompts[1]]) == [expected[1]]
    assert engine.total_prefix_cache_hits - hits == 56  # 7 full blocks of the 61


def test_no_freeing_path_gives_the_same_tokens(gemma3):
    path, prompts, expected = gemma3
    llm = LLM(model=path, skip_tokenizer_init=True, dtype="float32", block_size=BS,
              max_num_batched_tokens=16, disable_hybrid_kv_cache_manager=True)  # fmt: skip
    kvm = llm.llm_engine.engine_core.scheduler.kv_cache_manager
    assert kvm.spec.num_groups == 1 and not kvm.spec.has_sliding
    assert _gen(llm, prompts) == expected


def test_async_scheduling_frees_only_what_no_step_in_flight_reads(gemma3):
    """Async scheduling frees blocks against the next step's position (placeholders
    included) before the previous step's tokens are known. (On CUDA the previous step may
    still be running then: its reads of such a block come before any reuse's writes by
    stream order; on the CPU the step has run.)"""
    path, prompts, expected = gemma3
    llm = LLM(model=path, skip_tokenizer_init=True, dtype="float32", block_size=BS,
              num_gpu_blocks_override=41, max_num_batched_tokens=16, max_num_seqs=4,
              async_scheduling=True)  # fmt: skip
    assert llm.llm_engine.engine_core.async_scheduling
    assert _gen(llm, prompts) == expected
