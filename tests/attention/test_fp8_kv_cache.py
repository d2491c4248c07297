"""fp8 (e4m3) KV cache: the Triton cache write and attention kernels against their torch
references, the torch backend against dense attention over the dequantized cache.

Runs on CPU under TRITON_INTERPRET=1 (set below when no GPU is present) at tiny sizes.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed: Triton kernels are not tested")

from pagedllm.attention.fp8_kv import FP8_KV_DTYPE, dequantize_kv, quantize_kv  # noqa: E402
from pagedllm.attention.ops.paged_attention import (  # noqa: E402
    AttentionLaunchConfig,
    paged_attention,
    paged_attention_ref,
)
from pagedllm.attention.ops.reshape_and_cache import (  # noqa: E402
    reshape_and_cache,
    reshape_and_cache_ref,
)
from tests.attention.test_triton_paged_attention import (  # noqa: E402
    BLOCK_SIZE,
    DEVICE,
    MIXED,
    _make_batch,
    _rel_err,
)

K_SCALE, V_SCALE = 0.011, 0.0045  # small enough that some of the randn values saturate


@pytest.mark.parametrize("src_dtype", [torch.bfloat16, torch.float32])
def test_fp8_reshape_and_cache_matches_reference_bit_for_bit(src_dtype):
    gen = torch.Generator().manual_seed(21)
    num_tokens, num_kv_heads, head_dim, num_blocks = 19, 3, 40, 5
    fused = torch.randn(num_tokens, 2 * num_kv_heads + 2, head_dim, generator=gen)
    fused = fused.to(src_dtype).to(DEVICE)
    key, value = fused[:, :num_kv_heads], fused[:, num_kv_heads: 2 * num_kv_heads]
    slots = torch.randperm(num_blocks * BLOCK_SIZE, generator=gen)[:num_tokens]
    slots[[0, 11]] = -1
    slots = slots.to(DEVICE)
    cache = torch.zeros(2, num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, dtype=FP8_KV_DTYPE,
                        device=DEVICE)
    expect = cache.clone()
    reshape_and_cache(key, value, cache, slots, 1.0 / 200, 0.3)
    reshape_and_cache_ref(key, value, expect, slots, 1.0 / 200, 0.3)
    assert torch.equal(cache.view(torch.uint8), expect.view(torch.uint8))
    flat = cache.view(2, -1, num_kv_heads, head_dim)
    kept = slots >= 0
    # Stored as k / k_scale: large keys saturate at 448, the rest are within e4m3's 2^-4.
    k = flat[0, slots[kept]].float()
    assert k.abs().max().item() == 448.0
    want_v = value[kept].float() / 0.3
    torch.testing.assert_close(flat[1, slots[kept]].float(), want_v, rtol=0.07, atol=2e-2)


def _fp8_batch(reqs, num_heads, num_kv_heads, head_dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    query, kv_cache, meta, num_actual = _make_batch(
        reqs, num_heads, num_kv_heads, head_dim, dtype, gen)
    cache = torch.empty(kv_cache.shape, dtype=FP8_KV_DTYPE, device=DEVICE)
    cache[0] = quantize_kv(kv_cache[0], FP8_KV_DTYPE, K_SCALE)
    cache[1] = quantize_kv(kv_cache[1], FP8_KV_DTYPE, V_SCALE)
    return query, cache, meta, num_actual


def _check_fp8(reqs, num_heads, num_kv_heads, head_dim, dtype, tol, seed, **kwargs):
    query, cache, meta, num_actual = _fp8_batch(reqs, num_heads, num_kv_heads, head_dim, dtype,
                                                seed)
    scale = head_dim**-0.5
    out = torch.full_like(query, float("nan"))
    paged_attention(query, cache, scale=scale, out=out, k_scale=K_SCALE, v_scale=V_SCALE,
                    **meta, **kwargs)
    ref_kwargs = {k: v for k, v in kwargs.items() if k in ("sliding_window", "causal")}
    ref = paged_attention_ref(
        query, cache, meta["query_start_loc"], meta["seq_lens"], meta["block_table"], scale,
        compute_dtype=torch.float64, k_scale=K_SCALE, v_scale=V_SCALE, **ref_kwargs)
    assert _rel_err(out[:num_actual], ref[:num_actual]) < tol
    assert torch.isnan(out[num_actual:]).all(), "padding rows were written"
    # The scales matter: read as if unscaled, the output is far off.
    wrong = paged_attention_ref(
        query, cache, meta["query_start_loc"], meta["seq_lens"], meta["block_table"], scale,
        compute_dtype=torch.float64, **ref_kwargs)
    assert _rel_err(wrong[:num_actual], out[:num_actual]) > 10


def test_fp8_unified_mixed_batch_fp32_queries():
    _check_fp8(MIXED, 4, 2, 64, torch.float32, 1e-4, seed=30)


def test_fp8_unified_odd_group_window_bf16():
    _check_fp8([(5, 12), (0, 1), (40, 9)], 6, 2, 128, torch.bfloat16, 1e-2, seed=31,
               sliding_window=17)


@pytest.mark.parametrize("config", [None, AttentionLaunchConfig(block_n=16, min_split_keys=16)])
def test_fp8_split_kv_decode(config):
    _check_fp8([(130, 1), (3, 1), (70, 1)], 4, 2, 64, torch.float32, 1e-4, seed=32,
               num_splits=4, config=config)


def test_torch_backend_reads_fp8_like_dense_attention():
    """The CPU backend, fresh prefill included, attends to the dequantized cached K/V."""
    from pagedllm.attention.backend import AttentionMetadata, get_attn_backend

    gen = torch.Generator().manual_seed(33)
    reqs = [(0, 9), (7, 5), (20, 1), (3, 1)]  # (cached, new)
    nh, nkv, hd = 4, 2, 16
    query, cache, meta, num_actual = _fp8_batch(reqs, nh, nkv, hd, torch.float32, seed=34)
    query, cache = query.cpu(), cache.cpu()
    meta = {k: v.cpu() if torch.is_tensor(v) else v for k, v in meta.items()}
    # This step's K/V go through the backend's own write.
    new_k = torch.randn(num_actual, nkv, hd, generator=gen)
    new_v = torch.randn(num_actual, nkv, hd, generator=gen)
    slots = []
    for i, (cached, new) in enumerate(reqs):
        for p in range(cached, cached + new):
            slots.append(int(meta["block_table"][i, p // BLOCK_SIZE]) * BLOCK_SIZE
                         + p % BLOCK_SIZE)
    qsl, seq_lens = meta["query_start_loc"], meta["seq_lens"]
    md = AttentionMetadata(
        num_reqs=len(reqs), num_actual_tokens=num_actual,
        slot_mapping=torch.tensor(slots, dtype=torch.int64), query_start_loc=qsl,
        seq_lens=seq_lens, block_table=meta["block_table"], max_query_len=9,
        max_seq_len=int(seq_lens.max()), query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens)
    scale = hd**-0.5
    out = get_attn_backend("torch_ref").forward(
        query[:num_actual], new_k, new_v, cache, md, scale, k_scale=K_SCALE * 40,
        v_scale=V_SCALE * 40)
    ref = paged_attention_ref(query[:num_actual], cache, qsl, seq_lens, meta["block_table"],
                              scale, compute_dtype=torch.float64, k_scale=K_SCALE * 40,
                              v_scale=V_SCALE * 40)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    flat = cache.view(2, -1, nkv, hd)
    stored = dequantize_kv(flat[0, torch.tensor(slots)], torch.float32, K_SCALE * 40)
    torch.testing.assert_close(stored, new_k, rtol=0.07, atol=K_SCALE * 40 / 8)
