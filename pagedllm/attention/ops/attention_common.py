"""What the unified and the split-KV paged-attention kernels share.

- `_attend_range`: the online-softmax walk of one tile of query rows over a range of a
  request's paged keys, built from three per-tile steps (`_load_kv_tile`, `_tile_scores`,
  `_online_softmax_step`). Softmax is in fp32 and base 2 (log2(e) is folded into the scale);
  Gemma 2's logit soft-capping (scores -> cap * tanh(scores / cap), before masking) is a
  compile-time constant; an fp8 (e4m3) cache (KV_FP8) has its tiles converted to the query
  dtype after loading, its scales applied by the callers.
- Launch-side helpers: `AttentionLaunchConfig` (tile sizes), the scale / soft-cap / dot
  precision arguments every launch computes the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagedllm import envs
from pagedllm.attention.fp8_kv import is_fp8_kv

LOG2E = 1.4426950408889634


@triton.jit
def _load_kv_tile(
    k_cache_ptr,
    v_cache_ptr,
    block_table_row_ptr,  # block_table + req * stride
    kv_head,
    keys,  # [BLOCK_N] key positions of the tile
    key_valid,  # [BLOCK_N]
    stride_c_b,
    stride_c_t,
    stride_c_h,
    HEAD_DIM: tl.constexpr,
    HD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """The [BLOCK_N, HD_PAD] K and V tiles of `keys`, read through the block table (cache
    dtype; masked keys and padded dims are 0)."""
    dims = tl.arange(0, HD_PAD)
    block = tl.load(block_table_row_ptr + keys // BLOCK_SIZE, mask=key_valid, other=0)
    base = block.to(tl.int64) * stride_c_b + (keys % BLOCK_SIZE) * stride_c_t + kv_head * stride_c_h
    kv_mask = key_valid[:, None] & (dims[None, :] < HEAD_DIM)
    k = tl.load(k_cache_ptr + base[:, None] + dims[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_cache_ptr + base[:, None] + dims[None, :], mask=kv_mask, other=0.0)
    return k, v


@triton.jit
def _tile_scores(
    q,  # [BLOCK_M, HD_PAD]
    k,  # [BLOCK_N, HD_PAD], the query dtype
    q_pos,  # [BLOCK_M]
    keys,  # [BLOCK_N]
    key_valid,  # [BLOCK_N]
    qk_scale,
    window,
    CAUSAL: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    SOFT_CAP: tl.constexpr,
):
    """[BLOCK_M, BLOCK_N] scores in the log2 domain, soft-capped, -inf where masked."""
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
    return tl.where(allowed, s, float("-inf"))


@triton.jit
def _online_softmax_step(
    s,  # [BLOCK_M, BLOCK_N] masked scores (log2 domain)
    v,  # [BLOCK_N, HD_PAD]
    acc,  # [BLOCK_M, HD_PAD] fp32
    m_i,  # [BLOCK_M] fp32 running max
    l_i,  # [BLOCK_M] fp32 running sum
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    """Folds one tile into the running (acc, max, sum): rescale by the new max, add P @ V."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if DOT_UPCAST:
        pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


@triton.jit
def _attend_range(
    q,  # [BLOCK_M, HD_PAD] query tile (model dtype)
    q_pos,  # [BLOCK_M] position of each row
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
    BLOCK_M: tl.constexpr,
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
    """(acc [BLOCK_M, HD_PAD], running max, running sum) of the rows over the range, from a
    fresh state; a row that saw no key keeps sum 0. The running max starts at a finite
    "minus infinity" so that exp2(-inf - max) is 0, never NaN."""
    acc = tl.zeros([BLOCK_M, HD_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in tl.range(kv_start, kv_end, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        key_valid = keys < kv_end
        k, v = _load_kv_tile(
            k_cache_ptr, v_cache_ptr, block_table_row_ptr, kv_head, keys, key_valid,
            stride_c_b, stride_c_t, stride_c_h, HEAD_DIM, HD_PAD, BLOCK_SIZE,
        )  # fmt: skip
        if KV_FP8:  # e4m3 -> the query dtype is exact; the scales are applied outside
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        s = _tile_scores(
            q, k, q_pos, keys, key_valid, qk_scale, window,
            CAUSAL, USE_WINDOW, DOT_PRECISION, DOT_UPCAST, SOFT_CAP,
        )  # fmt: skip
        acc, m_i, l_i = _online_softmax_step(s, v, acc, m_i, l_i, DOT_PRECISION, DOT_UPCAST)
    return acc, m_i, l_i


@dataclass(frozen=True, slots=True)
class AttentionLaunchConfig:
    """Tile sizes for one launch; None fields are chosen by the launchers' heuristics."""

    block_m: int | None = None
    block_n: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    min_split_keys: int | None = None  # split-KV: fewest keys a split covers


def interpreted() -> bool:
    # The Triton interpreter (3.9) multiplies the raw uint16 bits of bfloat16 dot operands, so
    # under TRITON_INTERPRET the kernels feed tl.dot fp32 copies; compiled kernels never do.
    return envs.triton_interpret()


def soft_cap_constant(logits_soft_cap: float | None) -> float:
    """The kernels' SOFT_CAP constexpr: 0.0 compiles the capping out (every model without
    one keeps its kernel), else the cap in the log2 domain the kernels' scores live in."""
    if not logits_soft_cap:
        return 0.0
    return float(logits_soft_cap) * LOG2E


def kv_scales(
    kv_cache: torch.Tensor, scale: float, k_scale: float, v_scale: float
) -> tuple[float, float]:
    """(qk_scale, v_scale) kernel arguments: log2(e) and, for an fp8 cache, k_scale folded
    into the softmax scale; v_scale is read only by the fp8 specialisation."""
    if is_fp8_kv(kv_cache):
        return scale * k_scale * LOG2E, v_scale
    return scale * LOG2E, 1.0


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs (CPU tests, debugging) get exact products; half types ignore the flag.
    return "ieee" if dtype == torch.float32 else "tf32"
