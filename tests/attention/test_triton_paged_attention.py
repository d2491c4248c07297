"""Triton paged attention (unified + split-KV) and reshape_and_cache against torch references.

Runs on CPU under TRITON_INTERPRET=1 (set below when no GPU is present) at tiny sizes.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed: Triton kernels are not tested")

from pagedllm.attention.ops.paged_attention import (  # noqa: E402
    AttentionLaunchConfig,
    choose_num_splits,
    paged_attention,
    paged_attention_ref,
)
from pagedllm.attention.ops.reshape_and_cache import (  # noqa: E402
    reshape_and_cache,
    reshape_and_cache_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK_SIZE = 16


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite values in the output"
    return ((out - ref).norm() / ref.norm()).item()


def _make_batch(
    reqs: list[tuple[int, int]],  # (cached tokens before this step, query_len)
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    gen: torch.Generator,
    num_pad_tokens: int = 3,
):
    """Random queries, a random cache, and shuffled block tables for the given requests."""
    seq_lens = [c + q for c, q in reqs]
    blocks_per_req = [math.ceil(s / BLOCK_SIZE) for s in seq_lens]
    max_blocks = max(blocks_per_req) + 1
    num_blocks = sum(blocks_per_req) + 5
    perm = torch.randperm(num_blocks, generator=gen)
    block_table = torch.zeros(len(reqs), max_blocks, dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks_per_req):
        block_table[i, :n] = perm[used : used + n].to(torch.int32)
        used += n
    qsl = [0]
    for _, q in reqs:
        qsl.append(qsl[-1] + q)
    num_tokens = qsl[-1] + num_pad_tokens
    query = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(dtype)
    kv_cache = torch.randn(2, num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, generator=gen).to(
        dtype
    )
    meta = dict(
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_table=block_table.to(DEVICE),
        num_reqs=len(reqs),
        max_query_len=max(q for _, q in reqs),
    )
    return query.to(DEVICE), kv_cache.to(DEVICE), meta, qsl[-1]


def _check(reqs, num_heads, num_kv_heads, head_dim, dtype, tol, seed, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    query, kv_cache, meta, num_actual = _make_batch(
        reqs, num_heads, num_kv_heads, head_dim, dtype, gen
    )
    scale = head_dim**-0.5
    out = torch.full_like(query, float("nan"))
    paged_attention(query, kv_cache, scale=scale, out=out, **meta, **kwargs)
    ref_keys = ("sliding_window", "causal", "logits_soft_cap")
    ref_kwargs = {k: v for k, v in kwargs.items() if k in ref_keys}
    ref = paged_attention_ref(
        query, kv_cache, meta["query_start_loc"], meta["seq_lens"], meta["block_table"],
        scale, compute_dtype=torch.float64, **ref_kwargs,
    )  # fmt: skip
    err = _rel_err(out[:num_actual], ref[:num_actual])
    assert err < tol, f"relative error {err:.2e} >= {tol:.0e}"
    assert torch.isnan(out[num_actual:]).all(), "padding rows were written"


# (cached, query_len): fresh prefill, chunk after a cached prefix, decodes, a prefix hit that
# leaves one token, a chunk ending exactly on a block boundary.
MIXED = [(0, 19), (21, 6), (40, 1), (0, 1), (31, 1), (16, 16)]


def test_mixed_batch_gqa_fp32():
    _check(MIXED, num_heads=4, num_kv_heads=2, head_dim=64, dtype=torch.float32, tol=1e-4, seed=0)


def test_mixed_batch_small_tiles_many_q_blocks():
    # BLOCK_M 16 with group 2 -> 8 query tokens per program: several q-blocks per request.
    cfg = AttentionLaunchConfig(block_m=16, block_n=16)
    _check(MIXED, 4, 2, 64, torch.float32, 1e-4, seed=1, config=cfg)


def test_non_power_of_two_group_hd128():
    reqs = [(5, 12), (0, 1), (18, 3)]
    _check(reqs, num_heads=6, num_kv_heads=2, head_dim=128, dtype=torch.float32, tol=1e-4, seed=2)


def test_mha_no_gqa():
    _check([(7, 9), (30, 1)], 2, 2, 64, torch.float32, 1e-4, seed=3)


def test_sliding_window():
    reqs = [(0, 30), (25, 7), (50, 1)]
    _check(reqs, 4, 2, 64, torch.float32, 1e-4, seed=4, sliding_window=8)
    cfg = AttentionLaunchConfig(block_m=16, block_n=16)
    _check(reqs, 4, 1, 64, torch.float32, 1e-4, seed=5, sliding_window=20, config=cfg)


def test_non_causal_encoder():
    reqs = [(0, 9), (0, 20)]
    _check(reqs, 2, 2, 64, torch.float32, 1e-4, seed=6, causal=False)


def test_bf16():
    _check(MIXED, 4, 2, 64, torch.bfloat16, 1e-2, seed=7)


# Small splits, so these short contexts really are cut: each request's context is divided
# into num_splits parts of its own length (130 keys / 5 -> 32 per split, 3 keys -> one split
# used and four empty ones).
SMALL_SPLITS = AttentionLaunchConfig(block_n=16, min_split_keys=16)


@pytest.mark.parametrize("num_splits", [2, 5])
@pytest.mark.parametrize("config", [None, SMALL_SPLITS])
def test_split_kv_decode(num_splits, config):
    reqs = [(130, 1), (3, 1), (70, 1)]
    _check(reqs, 4, 2, 64, torch.float32, 1e-4, seed=8 + num_splits, num_splits=num_splits,
           config=config)  # fmt: skip


def test_split_kv_min_keys_from_the_environment(monkeypatch):
    # PAGEDLLM_SPLIT_KV_MIN_KEYS (A/B runs) sizes the splits when the config does not.
    monkeypatch.setenv("PAGEDLLM_SPLIT_KV_MIN_KEYS", "16")
    _check([(130, 1), (3, 1), (70, 1)], 4, 2, 64, torch.float32, 1e-4, seed=21, num_splits=5,
           config=AttentionLaunchConfig(block_n=16))
    monkeypatch.setenv("PAGEDLLM_SPLIT_KV_MIN_KEYS", "-3")
    with pytest.raises(ValueError, match="PAGEDLLM_SPLIT_KV_MIN_KEYS"):
        _check([(30, 1)], 4, 2, 64, torch.float32, 1e-4, seed=22, num_splits=2)


def test_split_kv_decode_window_and_bf16():
    reqs = [(150, 1), (40, 1)]
    _check(reqs, 8, 2, 64, torch.bfloat16, 1e-2, seed=11, num_splits=4, sliding_window=33)
    _check(reqs, 8, 2, 64, torch.bfloat16, 1e-2, seed=12, num_splits=4, sliding_window=33,
           config=SMALL_SPLITS)  # fmt: skip


def test_choose_num_splits():
    # 1 request at 32k on 8 KV heads leaves a 132-SM GPU idle: split.
    assert choose_num_splits(1, 8, 1, 32768, 132) > 16
    # Enough programs already, or a prefill in the batch, or a short context: no split.
    assert choose_num_splits(64, 8, 1, 4096, 132) == 1
    assert choose_num_splits(1, 8, 7, 32768, 132) == 1
    assert choose_num_splits(1, 8, 1, 200, 132) == 1
    # Programs enough, but a few long contexts among short ones (the H200 kernel sweep's
    # skewed cases, where 8 splits ran 1.3-2.6x faster): split; equal contexts (where splitting
    # ran 15-30% slower), or no total known: not.
    assert choose_num_splits(21, 8, 1, 3000, 132, 19 * 600 + 2 * 3000) == 8
    assert choose_num_splits(96, 8, 1, 2500, 132, 93 * 500 + 3 * 2500) == 8
    assert choose_num_splits(21, 8, 1, 3000, 132) == 1
    assert choose_num_splits(32, 8, 1, 430, 132, 32 * 430) == 1
    assert choose_num_splits(160, 8, 1, 600, 132, 160 * 450) == 1


def test_logits_soft_cap_unified_and_split():
    # A cap of 0.5 on scores of spread ~1 changes every softmax row (Gemma 2 uses 50 on
    # larger logits); windows and GQA on top, as Gemma 2's sliding layers run them.
    _check(MIXED, 4, 2, 64, torch.float32, 1e-4, seed=14, logits_soft_cap=0.5)
    _check(MIXED, 4, 2, 64, torch.float32, 1e-4, seed=15, logits_soft_cap=0.5, sliding_window=9)
    _check([(130, 1), (3, 1)], 4, 2, 64, torch.float32, 1e-4, seed=16, num_splits=3,
           logits_soft_cap=0.5, config=SMALL_SPLITS)  # fmt: skip


def test_head_dim_256_soft_cap():
    # Gemma 2 shapes: 256-wide heads (smaller default tiles), capped scores, a window.
    _check([(20, 5), (33, 1)], 4, 2, 256, torch.float32, 1e-4, seed=18, logits_soft_cap=0.5,
           sliding_window=16)  # fmt: skip


def test_reference_soft_cap_changes_output():
    gen = torch.Generator().manual_seed(17)
    query, kv_cache, meta, n = _make_batch([(5, 6)], 2, 2, 16, torch.float64, gen)
    args = (query, kv_cache, meta["query_start_loc"], meta["seq_lens"], meta["block_table"], 1.0)
    plain = paged_attention_ref(*args, compute_dtype=torch.float64)
    capped = paged_attention_ref(*args, compute_dtype=torch.float64, logits_soft_cap=0.3)
    huge = paged_attention_ref(*args, compute_dtype=torch.float64, logits_soft_cap=1e6)
    torch.testing.assert_close(huge[:n], plain[:n])
    assert (capped[:n] - plain[:n]).abs().max() > 1e-2
    # Capped at 0.3, all scores lie in (-0.3, 0.3): weights within exp(0.6) of each other.
    q_row = query[0, 0]
    k = kv_cache[0, meta["block_table"][0, 0], :6, 0]
    w = torch.softmax(0.3 * torch.tanh(k @ q_row / 0.3), 0)
    expect = (w[:, None] * kv_cache[1, meta["block_table"][0, 0], :6, 0]).sum(0)
    torch.testing.assert_close(capped[0, 0], expect)


def test_reference_matches_naive_loop():
    gen = torch.Generator().manual_seed(12)
    reqs = [(3, 4), (0, 2)]
    query, kv_cache, meta, _ = _make_batch(reqs, 4, 2, 16, torch.float64, gen, num_pad_tokens=0)
    ref = paged_attention_ref(
        query, kv_cache, meta["query_start_loc"], meta["seq_lens"], meta["block_table"], 0.3,
        compute_dtype=torch.float64,
    )  # fmt: skip
    qsl, lens = meta["query_start_loc"].tolist(), meta["seq_lens"].tolist()
    for i, seq_len in enumerate(lens):
        q_len = qsl[i + 1] - qsl[i]
        for t in range(q_len):
            pos = seq_len - q_len + t
            for h in range(4):
                keys, vals = [], []
                for p in range(pos + 1):
                    blk = meta["block_table"][i, p // BLOCK_SIZE]
                    keys.append(kv_cache[0, blk, p % BLOCK_SIZE, h // 2])
                    vals.append(kv_cache[1, blk, p % BLOCK_SIZE, h // 2])
                w = torch.softmax(torch.stack(keys) @ query[qsl[i] + t, h] * 0.3, dim=0)
                expect = (w[:, None] * torch.stack(vals)).sum(0)
                torch.testing.assert_close(ref[qsl[i] + t, h], expect)


@pytest.mark.parametrize("src_dtype", [torch.bfloat16, torch.float32])
def test_reshape_and_cache_matches_reference(src_dtype):
    gen = torch.Generator().manual_seed(13)
    num_tokens, num_kv_heads, head_dim, num_blocks = 21, 3, 64, 6
    # K/V as strided views of a fused buffer, like slices of a QKV projection.
    fused = torch.randn(num_tokens, 2 * num_kv_heads + 1, head_dim, generator=gen)
    fused = fused.to(src_dtype).to(DEVICE)
    key, value = fused[:, :num_kv_heads], fused[:, num_kv_heads : 2 * num_kv_heads]
    slots = torch.randperm(num_blocks * BLOCK_SIZE, generator=gen)[:num_tokens]
    slots[[2, 7, 20]] = -1
    slots = slots.to(DEVICE)
    base = torch.randn(2, num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, generator=gen)
    orig = base.to(torch.bfloat16).to(DEVICE)
    cache, expect = orig.clone(), orig.clone()
    reshape_and_cache(key, value, cache, slots)
    reshape_and_cache_ref(key, value, expect, slots)
    if src_dtype == torch.bfloat16:
        assert torch.equal(cache, expect)
    else:
        # The interpreter rounds fp32 -> bf16 toward zero, the GPU to nearest: 1 ulp apart.
        torch.testing.assert_close(cache, expect, rtol=1e-2, atol=1e-2)
    flat = cache.view(2, -1, num_kv_heads, head_dim)
    kept = slots >= 0
    written = flat[:, slots[kept]].float()
    torch.testing.assert_close(written[0], key[kept].float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(written[1], value[kept].float(), rtol=1e-2, atol=1e-2)
    untouched = torch.ones(num_blocks * BLOCK_SIZE, dtype=torch.bool, device=DEVICE)
    untouched[slots[kept]] = False
    orig_flat = orig.view(2, -1, num_kv_heads, head_dim)
    assert torch.equal(flat[:, untouched], orig_flat[:, untouched])
