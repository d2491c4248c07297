"""Unified paged attention: one launch for any mix of prefill chunks, prefix hits and decodes.

A program owns BLOCK_Q query tokens of one request times the num_heads // num_kv_heads query
heads that share one KV head (GQA), so every K/V tile it loads serves all of them. Programs
find their request by binary search over query_start_loc, so the grid needs no host copy of
the metadata. Semantics of the metadata: see `paged_attention`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.attention.fp8_kv import is_fp8_kv
from pagedllm.attention.ops.attention_common import (
    AttentionLaunchConfig,
    _attend_range,
    dot_precision,
    interpreted,
    kv_scales,
    soft_cap_constant,
)


@triton.jit
def _find_request(query_start_loc_ptr, num_reqs, pid, BLOCK_Q: tl.constexpr):
    # Request i owns q-blocks from query_start_loc[i] // BLOCK_Q + i on (disjoint, increasing):
    # the largest i with that start <= pid is this program's request.
    lo = pid * 0
    hi = lo + num_reqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        start = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        take = start <= pid
        lo = tl.where(take, mid, lo)
        hi = tl.where(take, hi, mid - 1)
    return lo


@triton.jit
def _load_query_tile(
    q_ptr, q_start, q_len, q_block, context_len, kv_head, stride_q_t, stride_q_h,
    QUERIES_PER_KV: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, HD_PAD: tl.constexpr,
):
    """Rows = BLOCK_Q query tokens x the GROUP_PAD query heads of one KV head. Returns the
    [BLOCK_M, HD_PAD] tile, each row's position, token, head, and the row/dim mask."""
    rows = tl.arange(0, BLOCK_M)
    q_local = q_block * BLOCK_Q + rows // GROUP_PAD
    head_in_group = rows % GROUP_PAD
    head = kv_head * QUERIES_PER_KV + head_in_group
    row_valid = (q_local < q_len) & (head_in_group < QUERIES_PER_KV)
    token = (q_start + q_local).to(tl.int64)
    dims = tl.arange(0, HD_PAD)
    io_mask = row_valid[:, None] & (dims[None, :] < HEAD_DIM)
    q = tl.load(
        q_ptr + token[:, None] * stride_q_t + head[:, None] * stride_q_h + dims[None, :],
        mask=io_mask,
        other=0.0,
    )
    return q, context_len + q_local, token, head, io_mask


@triton.jit
def _store_output(
    out_ptr, acc, l_i, v_scale, token, head, io_mask, stride_o_t, stride_o_h,
    HD_PAD: tl.constexpr, KV_FP8: tl.constexpr,
):
    """Epilogue: acc / sum (rows that saw no key stay 0), times v_scale for fp8, in the
    output dtype."""
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    if KV_FP8:
        out = out * v_scale
    dims = tl.arange(0, HD_PAD)
    tl.store(
        out_ptr + token[:, None] * stride_o_t + head[:, None] * stride_o_h + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=io_mask,
    )


@triton.jit
def _unified_attention_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    q_ptr,  # [num_tokens, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,
    block_table_ptr,  # [num_reqs, max_blocks] int32
    query_start_loc_ptr,  # [num_reqs + 1] int32
    seq_lens_ptr,  # [num_reqs] int32
    num_reqs,
    qk_scale,
    v_scale,
    window,
    stride_q_t,
    stride_q_h,
    stride_o_t,
    stride_o_h,
    stride_c_b,
    stride_c_t,
    stride_c_h,
    stride_bt,
    QUERIES_PER_KV: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,  # BLOCK_Q * GROUP_PAD
    HEAD_DIM: tl.constexpr,
    HD_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    CAUSAL: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    SOFT_CAP: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    req = _find_request(query_start_loc_ptr, num_reqs, pid, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    q_block = pid - (q_start // BLOCK_Q + req)
    if q_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    context_len = seq_len - q_len
    q, q_pos, token, head, io_mask = _load_query_tile(
        q_ptr, q_start, q_len, q_block, context_len, kv_head, stride_q_t, stride_q_h,
        QUERIES_PER_KV, GROUP_PAD, BLOCK_Q, BLOCK_M, HEAD_DIM, HD_PAD,
    )  # fmt: skip
    # Keys this tile can see: up to its last query (causal), from the window's start. Kept
    # inline: kv_start stays the constant 0 without a window (a helper would return a tensor).
    kv_end = seq_len
    if CAUSAL:
        kv_end = tl.minimum(context_len + q_block * BLOCK_Q + BLOCK_Q, seq_len)
    kv_start = 0
    if USE_WINDOW:
        first_pos = context_len + q_block * BLOCK_Q
        kv_start = tl.maximum(first_pos - window + 1, 0) // BLOCK_N * BLOCK_N
    acc, m_i, l_i = _attend_range(
        q, q_pos, k_cache_ptr, v_cache_ptr,
        block_table_ptr + req.to(tl.int64) * stride_bt, kv_head, kv_start, kv_end,
        qk_scale, window, stride_c_b, stride_c_t, stride_c_h,
        BLOCK_M, HEAD_DIM, HD_PAD, BLOCK_N, BLOCK_SIZE, CAUSAL, USE_WINDOW, DOT_PRECISION,
        DOT_UPCAST, SOFT_CAP, KV_FP8,
    )  # fmt: skip
    _store_output(
        out_ptr, acc, l_i, v_scale, token, head, io_mask, stride_o_t, stride_o_h, HD_PAD, KV_FP8
    )


def _tile_config(
    cfg: AttentionLaunchConfig, max_query_len: int, head_dim: int, group_pad: int
) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of a unified launch: the config's values,
    else the heuristics; BLOCK_M holds at least one query token's GQA group."""
    if cfg.block_m is not None:
        block_m = cfg.block_m
    elif max_query_len <= 1:
        block_m = 16
    elif max_query_len <= 64:
        block_m = 32
    else:
        block_m = 64
    wide_heads = head_dim > 128  # Gemma (1, 2): head_dim 256
    if wide_heads and cfg.block_m is None:
        # Halved tiles keep the fp32 accumulator and the staged K/V tiles of 256-wide heads
        # within registers and shared memory (not swept on the GPU; head_dim <= 128 unchanged).
        block_m = min(block_m, 32)
    block_m = max(block_m, group_pad, 16)
    # Defaults from the H200 sweep in docs/kernels.md (Llama-3.1-8B shapes, bf16).
    block_n = cfg.block_n or (32 if wide_heads else 64)
    # 8 warps measured 1.8-2x slower than 4 at BLOCK_M 64 despite 4 warps spilling a little.
    num_warps = cfg.num_warps or 4
    num_stages = cfg.num_stages or (3 if max_query_len > 1 else 2)
    return block_m, block_n, num_warps, num_stages


def unified_attention(
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int32
    seq_lens: torch.Tensor,  # [num_reqs] int32
    block_table: torch.Tensor,  # [num_reqs, max_blocks] int32
    num_reqs: int,
    max_query_len: int,
    scale: float,
    sliding_window: int | None = None,
    causal: bool = True,
    config: AttentionLaunchConfig | None = None,
    logits_soft_cap: float | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """One launch over a mixed batch; writes rows query_start_loc[0]:query_start_loc[num_reqs]."""
    num_tokens, num_heads, head_dim = query.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    assert num_heads % num_kv_heads == 0
    cfg = config or AttentionLaunchConfig()
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    block_m, block_n, num_warps, num_stages = _tile_config(cfg, max_query_len, head_dim,
                                                           group_pad)  # fmt: skip
    block_q = block_m // group_pad
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    use_window = sliding_window is not None and sliding_window > 0 and causal
    grid = (num_tokens // block_q + num_reqs, num_kv_heads)
    if num_reqs == 0 or num_tokens == 0:
        return out
    _unified_attention_kernel[grid](
        out, query, k_cache, v_cache, block_table, query_start_loc, seq_lens,
        num_reqs, *kv_scales(kv_cache, scale, k_scale, v_scale),
        sliding_window if use_window else 0,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
        QUERIES_PER_KV=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_M=block_m,
        HEAD_DIM=head_dim, HD_PAD=triton.next_power_of_2(head_dim), BLOCK_N=block_n,
        BLOCK_SIZE=block_size, CAUSAL=causal, USE_WINDOW=use_window,
        DOT_PRECISION=dot_precision(query.dtype), DOT_UPCAST=interpreted(),
        SOFT_CAP=soft_cap_constant(logits_soft_cap),
        KV_FP8=is_fp8_kv(kv_cache), num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out
