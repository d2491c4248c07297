"""Fused MoE for a few tokens (decode at small batch): one program per (pair, BLOCK_N rows).

At one to a few tokens the grouped GEMM of `triton_moe` pays for what decode does not need:
the sort-and-pad of the pairs (a dozen small torch launches per layer), 16-row tensor-core
tiles of which one row is real, and a grid of padded tiles. Here each (token, expert) pair
reads its expert id straight from the router's top-k ids and streams that expert's rows once,
multiplying them by the pair's activation row with FMAs in fp32 (a matrix-vector product is
bound by the weight bytes, not by the multiplier). gate_up fuses SiLU-and-mul; down scales by
the pair's top-k weight. Pairs that share an expert read its rows once each, so the path pays
only while pairs rarely collide: `MOE_GEMV_MAX_TOKENS` bounds it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Up to this many tokens the matrix-vector path runs (set from the H200 sweep in
# benchmarks/moe_kernel.py; docs/benchmarks.md).
MOE_GEMV_MAX_TOKENS = 4


@dataclass(frozen=True, slots=True)
class GemvConfig:
    block_n: int = 32
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3


# Per launch kind, the best of `benchmarks/moe_kernel.py --sweep` on the H200 (Mixtral-8x7B
# shapes, 2026-12-02: one token 0.189 ms a layer, 3.7 TB/s of expert weights, 0.67x the
# grouped GEMM; 2 tokens 0.77x, 4 tokens 0.95x, 8 tokens 1.26x, hence MOE_GEMV_MAX_TOKENS).
GATE_UP_CONFIG = GemvConfig(block_n=16, block_k=64, num_warps=8, num_stages=2)
DOWN_CONFIG = GemvConfig(block_n=16, block_k=128, num_warps=8, num_stages=4)


@triton.jit
def _row_dot_tile(a_row_ptr, b_rows_ptr, offs_n, n_valid, stride_bn, k0, K, BLOCK_K: tl.constexpr):
    """[BLOCK_N, BLOCK_K] fp32 products of rows offs_n of b with one K-slice of the a row."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_valid = offs_k < K
    a = tl.load(a_row_ptr + offs_k, mask=k_valid, other=0.0).to(tl.float32)
    b = tl.load(b_rows_ptr + offs_n[:, None] * stride_bn + offs_k[None, :],
                mask=n_valid[:, None] & k_valid[None, :], other=0.0)  # fmt: skip
    return b.to(tl.float32) * a[None, :]


@triton.jit
def _moe_gemv_kernel(
    a_ptr,  # [num_rows, K]: hidden states (gate_up) or intermediate per pair (down)
    b_ptr,  # [num_experts, N (x2 for gate_up), K]
    c_ptr,  # [num_pairs, N]
    topk_ids_ptr,  # [num_pairs]
    topk_weights_ptr,  # [num_pairs] fp32
    N,
    K,
    up_offset,  # rows of b from gate to up (intermediate), gate_up only
    stride_am,
    stride_be,
    stride_bn,
    stride_cm,
    A_ROW_DIV: tl.constexpr,  # pair -> row of a: pair // top_k (gate_up) or pair (down)
    FUSE_SILU_MUL: tl.constexpr,
    MUL_ROUTED_WEIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pair = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < N
    expert = tl.load(topk_ids_ptr + pair).to(tl.int64)
    a_row_ptr = a_ptr + (pair // A_ROW_DIV).to(tl.int64) * stride_am
    b_rows_ptr = b_ptr + expert * stride_be
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        acc += _row_dot_tile(a_row_ptr, b_rows_ptr, offs_n, n_valid, stride_bn, k0, K, BLOCK_K)
        if FUSE_SILU_MUL:
            acc_up += _row_dot_tile(a_row_ptr, b_rows_ptr + up_offset * stride_bn, offs_n,
                                    n_valid, stride_bn, k0, K, BLOCK_K)  # fmt: skip
    out = tl.sum(acc, axis=1)  # [BLOCK_N]
    if FUSE_SILU_MUL:
        out = out / (1.0 + tl.exp(-out)) * tl.sum(acc_up, axis=1)
    if MUL_ROUTED_WEIGHT:
        out = out * tl.load(topk_weights_ptr + pair)
    tl.store(c_ptr + pair.to(tl.int64) * stride_cm + offs_n, out.to(c_ptr.dtype.element_ty),
             mask=n_valid)  # fmt: skip


def _launch(
    a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
    n: int, k: int, up_offset: int, a_row_div: int, fuse: bool, mul: bool, cfg: GemvConfig,
) -> None:  # fmt: skip
    grid = (ids.shape[0], triton.cdiv(n, cfg.block_n))
    _moe_gemv_kernel[grid](
        a, b, c, ids, weights, n, k, up_offset, a.stride(0), b.stride(0), b.stride(1),
        c.stride(0), A_ROW_DIV=a_row_div, FUSE_SILU_MUL=fuse, MUL_ROUTED_WEIGHT=mul,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip


def fused_experts_gemv(
    hidden: torch.Tensor,  # [num_tokens, hidden]
    w13: torch.Tensor,  # [num_experts, 2 * intermediate, hidden]
    w2: torch.Tensor,  # [num_experts, hidden, intermediate]
    topk_weights: torch.Tensor,  # [num_tokens, top_k]
    topk_ids: torch.Tensor,  # [num_tokens, top_k]
    gate_up: GemvConfig | None = None,
    down: GemvConfig | None = None,
) -> torch.Tensor:  # [num_tokens, hidden]
    """The MoE experts in two matrix-vector launches; same result as `grouped_experts_torch`."""
    num_tokens, hidden_size = hidden.shape
    inter = w13.shape[1] // 2
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    if num_tokens == 0:
        return torch.zeros_like(hidden)
    hidden = hidden.contiguous()
    ids = topk_ids.reshape(-1).contiguous()
    weights = topk_weights.reshape(-1).float().contiguous()
    act = torch.empty(num_pairs, inter, dtype=hidden.dtype, device=hidden.device)
    _launch(hidden, w13, act, ids, weights, inter, hidden_size, inter, top_k, True, False,
            gate_up or GATE_UP_CONFIG)  # fmt: skip
    out = torch.empty(num_pairs, hidden_size, dtype=hidden.dtype, device=hidden.device)
    _launch(act, w2, out, ids, weights, hidden_size, inter, 0, 1, False, True, down or DOWN_CONFIG)
    return out.view(num_tokens, top_k, hidden_size).sum(dim=1)
