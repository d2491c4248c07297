"""Split-KV (flash-decoding) paged attention for decode-only batches, its scratch, its policy.

For batches where every request has one query token: each request's context is cut into
`num_splits` partitions processed by separate programs that write partial outputs and
log2-sum-exps (`_split_kv_decode_kernel`); a second kernel merges them
(`_split_kv_combine_kernel`). It pays when the unified grid (num_reqs * num_kv_heads programs)
leaves SMs idle on long contexts, or when one long context would hold up the launch
(`choose_num_splits`).

The partials live in a `SplitKVWorkspace` reserved once, before CUDA graph capture, so a step
allocates nothing and captured graphs keep reading the same addresses.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from pagedllm import envs
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
def _load_decode_query(
    q_ptr, token, kv_head, stride_q_t, stride_q_h,
    QUERIES_PER_KV: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    HD_PAD: tl.constexpr,
):
    """Rows = the query heads of one KV head for one token: the [BLOCK_M, HD_PAD] tile, each
    row's head and whether the row is a real head."""
    rows = tl.arange(0, BLOCK_M)
    head = kv_head * QUERIES_PER_KV + rows
    row_valid = rows < QUERIES_PER_KV
    dims = tl.arange(0, HD_PAD)
    q = tl.load(
        q_ptr + token * stride_q_t + head[:, None] * stride_q_h + dims[None, :],
        mask=row_valid[:, None] & (dims[None, :] < HEAD_DIM),
        other=0.0,
    )
    return q, head, row_valid


@triton.jit
def _split_range(
    seq_len, split, num_splits, window, min_partition_len,
    BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr,
):
    """Keys [kv_start, kv_end) of `split`. Each request's context is cut into num_splits
    equal parts (at least min_partition_len keys each): a long request among short ones
    spreads over many programs, a short one uses its first split only, and nothing depends on
    a max_seq_len frozen in a CUDA graph. An empty range (start >= end) is a split unused."""
    partition_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    partition_len = tl.maximum(partition_len, min_partition_len)
    kv_start = split * partition_len
    kv_end = tl.minimum(kv_start + partition_len, seq_len)
    if USE_WINDOW:
        q_pos = seq_len - 1
        lowest = tl.maximum(q_pos - window + 1, 0) // BLOCK_N * BLOCK_N
        kv_start = tl.maximum(kv_start, lowest)
    return kv_start, kv_end


@triton.jit
def _store_split_partial(
    part_out_ptr, part_lse_ptr, acc, m_i, l_i, v_scale, part_row, row_valid,
    HD_PAD: tl.constexpr, KV_FP8: tl.constexpr,
):
    """Epilogue: the split's normalised output and log2-sum-exp (-inf for a split that saw
    no key, so the combine gives it weight 0)."""
    empty = l_i == 0.0
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if KV_FP8:
        out = out * v_scale
    dims = tl.arange(0, HD_PAD)
    tl.store(part_lse_ptr + part_row, lse, mask=row_valid)
    tl.store(
        part_out_ptr + part_row[:, None] * HD_PAD + dims[None, :],
        out,
        mask=row_valid[:, None],
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
    num_splits = tl.num_programs(2)  # a grid size, not a constexpr: one compile for all counts
    token = tl.load(query_start_loc_ptr + req).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + req)
    q, head, row_valid = _load_decode_query(
        q_ptr, token, kv_head, stride_q_t, stride_q_h, QUERIES_PER_KV, BLOCK_M, HEAD_DIM, HD_PAD
    )
    q_pos = tl.zeros([BLOCK_M], dtype=tl.int32) + (seq_len - 1)
    kv_start, kv_end = _split_range(
        seq_len, split, num_splits, window, min_partition_len, BLOCK_N, USE_WINDOW
    )
    acc, m_i, l_i = _attend_range(
        q, q_pos, k_cache_ptr, v_cache_ptr,
        block_table_ptr + req.to(tl.int64) * stride_bt, kv_head, kv_start, kv_end,
        qk_scale, window, stride_c_b, stride_c_t, stride_c_h,
        BLOCK_M, HEAD_DIM, HD_PAD, BLOCK_N, BLOCK_SIZE, True, USE_WINDOW, DOT_PRECISION,
        DOT_UPCAST, SOFT_CAP, KV_FP8,
    )  # fmt: skip
    part_row = (
        req.to(tl.int64) * (QUERIES_PER_KV * tl.num_programs(1)) + head
    ) * num_splits + split
    _store_split_partial(
        part_out_ptr, part_lse_ptr, acc, m_i, l_i, v_scale, part_row, row_valid, HD_PAD, KV_FP8
    )


@triton.jit(do_not_specialize=["num_splits"])
def _split_kv_combine_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    part_out_ptr,  # [num_reqs, num_heads, num_splits, HD_PAD] fp32
    part_lse_ptr,  # [num_reqs, num_heads, num_splits] fp32
    query_start_loc_ptr,
    stride_o_t,
    stride_o_h,
    num_splits,  # runtime (graph variants use several counts): one compile per SPLITS_PAD
    SPLITS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HD_PAD: tl.constexpr,
):
    req = tl.program_id(0)
    head = tl.program_id(1)
    token = tl.load(query_start_loc_ptr + req).to(tl.int64)
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, HD_PAD)
    part_row = (req.to(tl.int64) * tl.num_programs(1) + head) * num_splits + splits
    lse = tl.load(part_lse_ptr + part_row, mask=splits < num_splits, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    weight = tl.exp2(lse - lse_max)  # empty splits: exp2(-inf) = 0
    parts = tl.load(
        part_out_ptr + part_row[:, None] * HD_PAD + dims[None, :],
        mask=(splits < num_splits)[:, None],
        other=0.0,
    )
    out = tl.sum(parts * weight[:, None], axis=0) / tl.sum(weight, axis=0)
    tl.store(
        out_ptr + token * stride_o_t + head * stride_o_h + dims,
        out.to(out_ptr.dtype.element_ty),
        mask=dims < HEAD_DIM,
    )


class SplitKVWorkspace:
    """The split-KV decode's scratch: partial outputs [num_reqs, num_heads, num_splits,
    hd_pad] and log2-sum-exps [num_reqs, num_heads, num_splits], fp32, carved from two flat
    buffers allocated once.

    Invariants: the buffers are allocated at construction (before any CUDA graph capture)
    and never replaced, so captured graphs keep valid addresses. Every launch that uses them
    (each layer of a forward, each step, each graph replay) runs on one stream, so a layer's
    combine has read the partials before the next launch overwrites them. A launch needing
    more than `max_rows` rows (request x head x split) gets fresh tensors instead
    (`num_overflows` counts them; sized from the backend's own split policy, none should).
    """

    def __init__(self, max_rows: int, head_dim_pad: int, device: torch.device | str) -> None:
        self.max_rows = max_rows
        self.head_dim_pad = head_dim_pad
        self.device = torch.device(device)
        self.part_out = torch.empty(max_rows * head_dim_pad, dtype=torch.float32,
                                    device=self.device)  # fmt: skip
        self.part_lse = torch.empty(max_rows, dtype=torch.float32, device=self.device)
        self.num_overflows = 0

    def nbytes(self) -> int:
        return 4 * (self.part_out.numel() + self.part_lse.numel())

    def buffers(
        self, num_reqs: int, num_heads: int, num_splits: int, hd_pad: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Views for one launch: ([num_reqs, num_heads, num_splits, hd_pad],
        [num_reqs, num_heads, num_splits])."""
        rows = num_reqs * num_heads * num_splits
        if rows * hd_pad > self.part_out.numel() or rows > self.max_rows:
            self.num_overflows += 1
            return _fresh_buffers(num_reqs, num_heads, num_splits, hd_pad, self.device)
        part_out = self.part_out[: rows * hd_pad].view(num_reqs, num_heads, num_splits, hd_pad)
        part_lse = self.part_lse[:rows].view(num_reqs, num_heads, num_splits)
        return part_out, part_lse


def _fresh_buffers(
    num_reqs: int, num_heads: int, num_splits: int, hd_pad: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (num_reqs, num_heads, num_splits)
    part_out = torch.empty((*shape, hd_pad), dtype=torch.float32, device=device)
    return part_out, torch.empty(shape, dtype=torch.float32, device=device)


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
    workspace: SplitKVWorkspace | None = None,
) -> torch.Tensor:
    """Flash-decoding for batches where every request has query_len == 1 (causal); each
    request's context is split by its own length (see `_split_range`). Without a workspace
    the partials are allocated for this call."""
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
    min_keys = cfg.min_split_keys or envs.split_kv_min_keys() or MIN_PARTITION_KEYS
    min_partition_len = triton.cdiv(min_keys, block_n) * block_n
    if workspace is not None:
        part_out, part_lse = workspace.buffers(num_reqs, num_heads, num_splits, hd_pad)
    else:
        part_out, part_lse = _fresh_buffers(num_reqs, num_heads, num_splits, hd_pad,
                                            query.device)  # fmt: skip
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    use_window = sliding_window is not None and sliding_window > 0
    _split_kv_decode_kernel[(num_reqs, num_kv_heads, num_splits)](
        part_out, part_lse, query, k_cache, v_cache, block_table, query_start_loc, seq_lens,
        *kv_scales(kv_cache, scale, k_scale, v_scale), sliding_window if use_window else 0,
        min_partition_len,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
        QUERIES_PER_KV=group, BLOCK_M=block_m, HEAD_DIM=head_dim,
        HD_PAD=hd_pad, BLOCK_N=block_n, BLOCK_SIZE=block_size, USE_WINDOW=use_window,
        DOT_PRECISION=dot_precision(query.dtype), DOT_UPCAST=interpreted(),
        SOFT_CAP=soft_cap_constant(logits_soft_cap),
        KV_FP8=is_fp8_kv(kv_cache), num_warps=cfg.num_warps or 4,
        num_stages=cfg.num_stages or 2,
    )  # fmt: skip
    _split_kv_combine_kernel[(num_reqs, num_heads)](
        out, part_out, part_lse, query_start_loc, out.stride(0), out.stride(1),
        num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits),
        HEAD_DIM=head_dim, HD_PAD=hd_pad, num_warps=4,
    )  # fmt: skip
    return out


MIN_KEYS_PER_SPLIT = 256  # the policy's unit: splits by length = max_seq_len // this
# The fewest keys one split's program walks at run time (a partition is a request's own
# length / NUM_SPLITS, at least this). Short contexts in graphs captured with many splits
# then spread over more programs: at one request of 768 keys (16 splits captured) 64-key
# partitions took 7.2 us a layer against 12.4 with 256 (benchmarks/gpu_decode_attn.py, H200;
# 6.1 vs 12.1 at 512 keys, 10.3 vs 14.4 at four requests, 12.7 vs 16.1 at eight).
MIN_PARTITION_KEYS = 64
MAX_SPLITS = 64
# Case (2) of choose_num_splits, fitted on the H200 (benchmarks/gpu_kernels.py, skewed_* and
# uniform_* cases): a lone program reads ~10-15 GB/s against an SM's ~26 GB/s share, the
# combine launch costs ~8 us, and 8 splits beat 4 and 16 on one to three long contexts.
_CTA_SLOWDOWN = 2.25
_COMBINE_KEYS = 420
IMBALANCE_SPLITS = 8


def _occupancy_splits(programs: int, num_sms: int, by_length: int) -> int:
    return max(1, min(math.ceil(4 * num_sms / programs), by_length, MAX_SPLITS))


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
    by_length = max_seq_len // MIN_KEYS_PER_SPLIT
    programs = num_reqs * num_kv_heads
    if programs < num_sms:
        return _occupancy_splits(programs, num_sms, by_length)
    if not total_seq_len or by_length < 2:
        return 1
    share = total_seq_len * num_kv_heads / num_sms
    unified = max(share, _CTA_SLOWDOWN * max_seq_len)
    split = max(share, _CTA_SLOWDOWN * max_seq_len / IMBALANCE_SPLITS) + _COMBINE_KEYS
    return min(IMBALANCE_SPLITS, by_length) if split < 0.9 * unified else 1


def max_num_splits(num_reqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """The most splits `choose_num_splits` gives a decode batch of `num_reqs` requests whose
    contexts reach at most `max_seq_len`, whatever their total (it sizes the workspace)."""
    by_length = max_seq_len // MIN_KEYS_PER_SPLIT
    programs = num_reqs * num_kv_heads
    if num_reqs == 0:
        return 1
    if programs < num_sms:
        return _occupancy_splits(programs, num_sms, by_length)
    return min(IMBALANCE_SPLITS, by_length) if by_length >= 2 else 1
