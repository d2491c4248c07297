"""Paged attention over the KV cache for a mixed batch (Triton kernels + torch reference).

Semantics (same as `AttentionMetadata`): request i owns query rows
query_start_loc[i]:query_start_loc[i+1]; they are positions seq_lens[i] - query_len_i ..
seq_lens[i] - 1, and attend to the request's cached keys 0..position (causal), read through
block_table[i]. The current step's K/V must already be in the cache (see reshape_and_cache).

Two paths:
- `unified`: one launch for any mix of prefill chunks, prefix hits and decodes. A program owns
  BLOCK_Q query tokens of one request times the num_heads // num_kv_heads query heads that share
  one KV head (GQA), so every K/V tile it loads serves all of them. Programs find their request
  by binary search over query_start_loc, so the grid needs no host copy of the metadata.
- `split-KV` (flash-decoding): decode-only batches with few (request, KV head) pairs and long
  contexts. Each request's context is cut into partitions processed by separate programs that
  write partial outputs and log-sum-exps; a second kernel merges them.
Softmax is online and in fp32 (base 2, with log2(e) folded into the scale). Gemma 2's
attention logit soft-capping (scores -> cap * tanh(scores / cap), before masking) is a
compile-time constant, so models without it run the kernels they always did.

fp8 (e4m3) caches are a compile-time specialisation (KV_FP8): tiles are converted to the
query dtype after loading, k_scale is folded into the softmax scale on the host and the
output is multiplied by v_scale; the 16/32-bit kernels are unchanged.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagedllm.attention.fp8_kv import dequantize_kv, is_fp8_kv

_LOG2E = 1.4426950408889634
# Finite "minus infinity" for running maxima: exp2(-inf - _NEG_BIG) is 0, never NaN.
_NEG_BIG = -1.0e30


@triton.jit
def _attend_range(
    q,  # [BLOCK_M, HD_PAD] query tile (model dtype)
    q_pos,  # [BLOCK_M] position of each row
    acc,  # [BLOCK_M, HD_PAD] fp32
    m_i,  # [BLOCK_M] fp32 running max (log2 domain)
    l_i,  # [BLOCK_M] fp32 running sum
    k_cache_ptr,
    v_cache_ptr,
    block_table_row_ptr,  # block_table + req * stride
    kv_head,
    kv_start,
    kv_end,  # keys [kv_start, kv_end) of the request are visited
    qk_scale,  # softmax scale * log2(e)
    window,
    stride_c_b,
    stride_c_t,
    stride_c_h,
    HEAD_DIM: tl.constexpr,
    HD_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    CAUSAL: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    SOFT_CAP: tl.constexpr,  # 0.0: none; else cap * log2(e), the cap in the log2 domain
    KV_FP8: tl.constexpr,
):
    dims = tl.arange(0, HD_PAD)
    dim_mask = dims < HEAD_DIM
    for start_n in tl.range(kv_start, kv_end, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        key_valid = keys < kv_end
        block = tl.load(block_table_row_ptr + keys // BLOCK_SIZE, mask=key_valid, other=0)
        base = (
            block.to(tl.int64) * stride_c_b
            + (keys % BLOCK_SIZE) * stride_c_t
            + kv_head * stride_c_h
        )
        kv_mask = key_valid[:, None] & dim_mask[None, :]
        k = tl.load(k_cache_ptr + base[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + base[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        if KV_FP8:  # e4m3 -> the query dtype is exact; the scales are applied outside
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        # [BLOCK_M, BLOCK_N]
        if DOT_UPCAST:
            s = tl.dot(q.to(tl.float32), tl.trans(k).to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k).to(q.dtype), input_precision=DOT_PRECISION)
        s = s * qk_scale
        if SOFT_CAP > 0.0:
            # cap * tanh(raw / cap) on raw = s / log2(e); tanh via exp2 (no tl.tanh in Triton).
            e = tl.exp2(s * (2.8853900817779268 / SOFT_CAP))  # 2 * log2(e) / SOFT_CAP
            s = SOFT_CAP * (1.0 - 2.0 / (e + 1.0))
        allowed = key_valid[None, :]
        if CAUSAL:
            allowed = allowed & (keys[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            allowed = allowed & (keys[None, :] > q_pos[:, None] - window)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DOT_UPCAST:
            pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return acc, m_i, l_i


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
    # Keys this tile can see: up to its last query (causal), from the window's start.
    kv_end = seq_len
    if CAUSAL:
        kv_end = tl.minimum(context_len + q_block * BLOCK_Q + BLOCK_Q, seq_len)
    kv_start = 0
    if USE_WINDOW:
        first_pos = context_len + q_block * BLOCK_Q
        kv_start = tl.maximum(first_pos - window + 1, 0) // BLOCK_N * BLOCK_N

    acc = tl.zeros([BLOCK_M, HD_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _attend_range(
        q, q_pos, acc, m_i, l_i, k_cache_ptr, v_cache_ptr,
        block_table_ptr + req.to(tl.int64) * stride_bt, kv_head, kv_start, kv_end,
        qk_scale, window, stride_c_b, stride_c_t, stride_c_h,
        HEAD_DIM, HD_PAD, BLOCK_N, BLOCK_SIZE, CAUSAL, USE_WINDOW, DOT_PRECISION, DOT_UPCAST,
        SOFT_CAP,
        KV_FP8,
    )  # fmt: skip
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
def _split_kv_decode_kernel(
    part_out_ptr,  # [num_reqs, num_heads, num_splits, HD_PAD] fp32, normalized per split
    part_lse_ptr,  # [num_reqs, num_heads, num_splits] fp32, log2-sum-exp2 of the split
    q_ptr,  # [num_tokens, num_heads, head_dim]
    k_cache_ptr,
    v_cache_ptr,
    block_table_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    qk_scale,
    v_scale,
    window,
    min_partition_len,  # fewest keys per split, a multiple of BLOCK_N
    stride_q_t,
    stride_q_h,
    stride_c_b,
    stride_c_t,
    stride_c_h,
    stride_bt,
    QUERIES_PER_KV: tl.constexpr,
    BLOCK_M: tl.constexpr,  # >= QUERIES_PER_KV, >= 16
    NUM_SPLITS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HD_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    SOFT_CAP: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    token = tl.load(query_start_loc_ptr + req).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + req)
    q_pos_scalar = seq_len - 1

    rows = tl.arange(0, BLOCK_M)
    head = kv_head * QUERIES_PER_KV + rows
    row_valid = rows < QUERIES_PER_KV
    dims = tl.arange(0, HD_PAD)
    q = tl.load(
        q_ptr + token * stride_q_t + head[:, None] * stride_q_h + dims[None, :],
        mask=row_valid[:, None] & (dims[None, :] < HEAD_DIM),
        other=0.0,
    )
    q_pos = tl.zeros([BLOCK_M], dtype=tl.int32) + q_pos_scalar

    # Each request's context is cut into NUM_SPLITS equal parts (at least min_partition_len
    # keys each): a long request among short ones spreads over many programs, a short one
    # uses its first split only, and nothing depends on a max_seq_len frozen in a CUDA graph.
    partition_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    partition_len = tl.maximum(partition_len, min_partition_len)
    kv_start = split * partition_len
    kv_end = tl.minimum(kv_start + partition_len, seq_len)
    if USE_WINDOW:
        lowest = tl.maximum(q_pos_scalar - window + 1, 0) // BLOCK_N * BLOCK_N
        kv_start = tl.maximum(kv_start, lowest)

    acc = tl.zeros([BLOCK_M, HD_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _attend_range(
        q, q_pos, acc, m_i, l_i, k_cache_ptr, v_cache_ptr,
        block_table_ptr + req.to(tl.int64) * stride_bt, kv_head, kv_start, kv_end,
        qk_scale, window, stride_c_b, stride_c_t, stride_c_h,
        HEAD_DIM, HD_PAD, BLOCK_N, BLOCK_SIZE, True, USE_WINDOW, DOT_PRECISION, DOT_UPCAST,
        SOFT_CAP,
        KV_FP8,
    )  # fmt: skip
    empty = l_i == 0.0
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if KV_FP8:
        out = out * v_scale
    part_row = (
        req.to(tl.int64) * (QUERIES_PER_KV * tl.num_programs(1)) + head
    ) * NUM_SPLITS + split
    tl.store(part_lse_ptr + part_row, lse, mask=row_valid)
    tl.store(
        part_out_ptr + part_row[:, None] * HD_PAD + dims[None, :],
        out,
        mask=row_valid[:, None],
    )


@triton.jit
def _split_kv_combine_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    part_out_ptr,  # [num_reqs, num_heads, num_splits, HD_PAD] fp32
    part_lse_ptr,  # [num_reqs, num_heads, num_splits] fp32
    query_start_loc_ptr,
    stride_o_t,
    stride_o_h,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HD_PAD: tl.constexpr,
):
    req = tl.program_id(0)
    head = tl.program_id(1)
    token = tl.load(query_start_loc_ptr + req).to(tl.int64)
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, HD_PAD)
    part_row = (req.to(tl.int64) * tl.num_programs(1) + head) * NUM_SPLITS + splits
    lse = tl.load(part_lse_ptr + part_row, mask=splits < NUM_SPLITS, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    weight = tl.exp2(lse - lse_max)  # empty splits: exp2(-inf) = 0
    parts = tl.load(
        part_out_ptr + part_row[:, None] * HD_PAD + dims[None, :],
        mask=(splits < NUM_SPLITS)[:, None],
        other=0.0,
    )
    out = tl.sum(parts * weight[:, None], axis=0) / tl.sum(weight, axis=0)
    tl.store(
        out_ptr + token * stride_o_t + head * stride_o_h + dims,
        out.to(out_ptr.dtype.element_ty),
        mask=dims < HEAD_DIM,
    )


@dataclass(frozen=True, slots=True)
class AttentionLaunchConfig:
    """Tile sizes for one launch; None fields are chosen by the heuristics below."""

    block_m: int | None = None
    block_n: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    min_split_keys: int | None = None  # split-KV: fewest keys a split covers


def _interpreted() -> bool:
    # The Triton interpreter (3.9) multiplies the raw uint16 bits of bfloat16 dot operands, so
    # under TRITON_INTERPRET the kernels feed tl.dot fp32 copies; compiled kernels never do.
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _soft_cap_constant(logits_soft_cap: float | None) -> float:
    """The kernels' SOFT_CAP constexpr: 0.0 compiles the capping out (every model without
    one keeps its kernel), else the cap in the log2 domain the kernels' scores live in."""
    if not logits_soft_cap:
        return 0.0
    return float(logits_soft_cap) * _LOG2E


def _kv_scales(
    kv_cache: torch.Tensor, scale: float, k_scale: float, v_scale: float
) -> tuple[float, float]:
    """(qk_scale, v_scale) kernel arguments: log2(e) and, for an fp8 cache, k_scale folded
    into the softmax scale; v_scale is read only by the fp8 specialisation."""
    if is_fp8_kv(kv_cache):
        return scale * k_scale * _LOG2E, v_scale
    return scale * _LOG2E, 1.0


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs (CPU tests, debugging) get exact products; half types ignore the flag.
    return "ieee" if dtype == torch.float32 else "tf32"


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
    block_q = block_m // group_pad
    # Defaults from the H200 sweep in docs/kernels.md (Llama-3.1-8B shapes, bf16).
    block_n = cfg.block_n or (32 if wide_heads else 64)
    # 8 warps measured 1.8-2x slower than 4 at BLOCK_M 64 despite 4 warps spilling a little.
    num_warps = cfg.num_warps or 4
    num_stages = cfg.num_stages or (3 if max_query_len > 1 else 2)
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    use_window = sliding_window is not None and sliding_window > 0 and causal
    grid = (num_tokens // block_q + num_reqs, num_kv_heads)
    if num_reqs == 0 or num_tokens == 0:
        return out
    _unified_attention_kernel[grid](
        out, query, k_cache, v_cache, block_table, query_start_loc, seq_lens,
        num_reqs, *_kv_scales(kv_cache, scale, k_scale, v_scale),
        sliding_window if use_window else 0,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
        QUERIES_PER_KV=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_M=block_m,
        HEAD_DIM=head_dim, HD_PAD=triton.next_power_of_2(head_dim), BLOCK_N=block_n,
        BLOCK_SIZE=block_size, CAUSAL=causal, USE_WINDOW=use_window,
        DOT_PRECISION=_dot_precision(query.dtype), DOT_UPCAST=_interpreted(),
        SOFT_CAP=_soft_cap_constant(logits_soft_cap),
        KV_FP8=is_fp8_kv(kv_cache), num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


def split_kv_decode_attention(
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim], one row per request
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int32
    seq_lens: torch.Tensor,  # [num_reqs] int32
    block_table: torch.Tensor,  # [num_reqs, max_blocks] int32
    num_reqs: int,
    scale: float,
    num_splits: int,
    sliding_window: int | None = None,
    config: AttentionLaunchConfig | None = None,
    logits_soft_cap: float | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Flash-decoding for batches where every request has query_len == 1 (causal); each
    request's context is split by its own length (see `_split_kv_decode_kernel`)."""
    _, num_heads, head_dim = query.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    assert num_heads % num_kv_heads == 0
    if num_reqs == 0:
        return out
    cfg = config or AttentionLaunchConfig()
    group = num_heads // num_kv_heads
    block_m = max(cfg.block_m or 16, triton.next_power_of_2(group))
    block_n = cfg.block_n or 64
    hd_pad = triton.next_power_of_2(head_dim)
    min_partition_len = triton.cdiv(cfg.min_split_keys or _MIN_KEYS_PER_SPLIT, block_n) * block_n
    part_out = torch.empty(
        (num_reqs, num_heads, num_splits, hd_pad), dtype=torch.float32, device=query.device
    )
    part_lse = torch.empty((num_reqs, num_heads, num_splits), dtype=torch.float32,
                           device=query.device)  # fmt: skip
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    use_window = sliding_window is not None and sliding_window > 0
    _split_kv_decode_kernel[(num_reqs, num_kv_heads, num_splits)](
        part_out, part_lse, query, k_cache, v_cache, block_table, query_start_loc, seq_lens,
        *_kv_scales(kv_cache, scale, k_scale, v_scale), sliding_window if use_window else 0,
        min_partition_len,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
        QUERIES_PER_KV=group, BLOCK_M=block_m, NUM_SPLITS=num_splits, HEAD_DIM=head_dim,
        HD_PAD=hd_pad, BLOCK_N=block_n, BLOCK_SIZE=block_size, USE_WINDOW=use_window,
        DOT_PRECISION=_dot_precision(query.dtype), DOT_UPCAST=_interpreted(),
        SOFT_CAP=_soft_cap_constant(logits_soft_cap),
        KV_FP8=is_fp8_kv(kv_cache), num_warps=cfg.num_warps or 4,
        num_stages=cfg.num_stages or 2,
    )  # fmt: skip
    _split_kv_combine_kernel[(num_reqs, num_heads)](
        out, part_out, part_lse, query_start_loc, out.stride(0), out.stride(1),
        NUM_SPLITS=num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits),
        HEAD_DIM=head_dim, HD_PAD=hd_pad, num_warps=4,
    )  # fmt: skip
    return out


_MIN_KEYS_PER_SPLIT = 256
_MAX_SPLITS = 64
# Case (2) of choose_num_splits, fitted on the H200 (benchmarks/gpu_kernels.py, skewed_* and
# uniform_* cases): a lone program reads ~10-15 GB/s against an SM's ~26 GB/s share, the
# combine launch costs ~8 us, and 8 splits beat 4 and 16 on one to three long contexts.
_CTA_SLOWDOWN = 2.25
_COMBINE_KEYS = 420
IMBALANCE_SPLITS = 8


def choose_num_splits(
    num_reqs: int,
    num_kv_heads: int,
    max_query_len: int,
    max_seq_len: int,
    num_sms: int,
    total_seq_len: int | None = None,
) -> int:
    """Number of KV partitions for decode; 1 means the unified kernel is the better choice.

    Splitting pays in two cases. (1) The unified grid (num_reqs * num_kv_heads programs)
    leaves most SMs idle while each program walks a long context: aim at ~4 programs per SM
    (on the H200 sweep, 64 splits beat 33 for 1 request and 16 beat 9 for 4). (2) There are
    programs enough, but one context is so long that its single program, walking keys alone
    at one CTA's pace, outlasts the rest of the launch (a long request among short ones,
    `total_seq_len` known). Times below are in keys one SM reads at its share of the
    bandwidth: the launch takes at least `share`, one lone program `_CTA_SLOWDOWN` per key,
    and a split launch adds the combine kernel (`_COMBINE_KEYS`).
    """
    if max_query_len != 1 or num_reqs == 0:
        return 1
    by_length = max_seq_len // _MIN_KEYS_PER_SPLIT
    programs = num_reqs * num_kv_heads
    if programs < num_sms:
        by_occupancy = math.ceil(4 * num_sms / programs)
        return max(1, min(by_occupancy, by_length, _MAX_SPLITS))
    if not total_seq_len or by_length < 2:
        return 1
    share = total_seq_len * num_kv_heads / num_sms
    unified = max(share, _CTA_SLOWDOWN * max_seq_len)
    split = max(share, _CTA_SLOWDOWN * max_seq_len / IMBALANCE_SPLITS) + _COMBINE_KEYS
    return min(IMBALANCE_SPLITS, by_length) if split < 0.9 * unified else 1


def paged_attention(
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
    num_splits: int = 1,
    out: torch.Tensor | None = None,
    config: AttentionLaunchConfig | None = None,
    logits_soft_cap: float | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Attention of every query row against its request's cached keys -> [num_tokens, ...].

    num_splits > 1 selects the split-KV decode path (requires max_query_len == 1 and causal).
    Rows past query_start_loc[num_reqs] (padding) are left unwritten.
    """
    if out is None:
        out = torch.empty_like(query)
    if num_splits > 1:
        assert max_query_len == 1 and causal, "split-KV is for decode-only batches"
        return split_kv_decode_attention(
            out, query, kv_cache, query_start_loc, seq_lens, block_table, num_reqs,
            scale, num_splits, sliding_window, config, logits_soft_cap, k_scale, v_scale,
        )  # fmt: skip
    return unified_attention(
        out, query, kv_cache, query_start_loc, seq_lens, block_table, num_reqs,
        max_query_len, scale, sliding_window, causal, config, logits_soft_cap, k_scale, v_scale,
    )  # fmt: skip


def paged_attention_ref(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    query_start_loc: torch.Tensor,  # [num_reqs + 1]
    seq_lens: torch.Tensor,  # [num_reqs]
    block_table: torch.Tensor,  # [num_reqs, max_blocks]
    scale: float,
    sliding_window: int | None = None,
    causal: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    logits_soft_cap: float | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Pure-torch reference: gathers each request's K/V and runs masked SDPA per request.
    An fp8 cache is dequantized with its scales first.

    Loops on the host (reads the metadata with .tolist()); for tests and benchmarks only.
    Padding rows of the result are zero.
    """
    num_heads = query.shape[1]
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_heads // num_kv_heads
    out = torch.zeros(query.shape, dtype=compute_dtype, device=query.device)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        q_lo, q_hi = starts[i], starts[i + 1]
        q_len = q_hi - q_lo
        if q_len == 0:
            continue
        blocks = block_table[i, : triton.cdiv(seq_len, block_size)].long()
        # [seq_len, num_kv_heads, head_dim] -> [num_heads, seq_len, head_dim]
        k = kv_cache[0, blocks].reshape(-1, num_kv_heads, kv_cache.shape[4])[:seq_len]
        v = kv_cache[1, blocks].reshape(-1, num_kv_heads, kv_cache.shape[4])[:seq_len]
        k = dequantize_kv(k, compute_dtype, k_scale).repeat_interleave(group, dim=1)
        v = dequantize_kv(v, compute_dtype, v_scale).repeat_interleave(group, dim=1)
        k, v = k.transpose(0, 1), v.transpose(0, 1)
        q = query[q_lo:q_hi].to(compute_dtype).transpose(0, 1)  # [num_heads, q_len, head_dim]
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)[:, None]
        k_pos = torch.arange(seq_len, device=query.device)[None, :]
        allowed = torch.ones(q_len, seq_len, dtype=torch.bool, device=query.device)
        if causal:
            allowed &= k_pos <= q_pos
            if sliding_window:
                allowed &= k_pos > q_pos - sliding_window
        scores = (q @ k.transpose(-1, -2)) * scale  # [num_heads, q_len, seq_len]
        if logits_soft_cap:
            scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        out[q_lo:q_hi] = (probs @ v).transpose(0, 1)
    return out
