"""Fused MoE on the GPU: (token, expert) pairs sorted and padded per expert, then two grouped
GEMM launches (Triton + the torch path in `torch_moe` as the reference).

1. `moe_align_block_size` sorts the num_tokens * top_k pairs by expert and pads each expert's
   run to a multiple of BLOCK_M, so every BLOCK_M-row tile belongs to one expert. It runs as
   torch ops on the device, sized by an upper bound: no host sync.
2. gate_up: each program multiplies one tile of pairs by one BLOCK_N slice of its expert's gate
   and up rows and writes silu(gate) * up ([num_pairs, intermediate]): SiLU-and-mul fused.
3. down: the same kernel over the intermediate rows, each row scaled by its pair's top-k weight
   in the epilogue; a sum over the top_k pairs of a token gives its output.
Experts with no tokens get no tiles; padding rows are masked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagedllm import envs


@triton.jit
def _fused_moe_kernel(
    a_ptr,  # [num_rows, K]: hidden states (gate_up) or intermediate (down)
    b_ptr,  # [num_experts, N (x2 for gate_up), K]
    c_ptr,  # [num_pairs, N]
    topk_weights_ptr,  # [num_pairs] fp32
    sorted_pair_ids_ptr,  # [max_padded] int32, num_pairs = padding
    expert_ids_ptr,  # [max_padded // BLOCK_M] int32
    num_padded_ptr,  # [1] int32: pairs after padding
    N,
    K,
    num_pairs,
    up_offset,  # rows of b from gate to up (intermediate), gate_up only
    stride_am,
    stride_be,
    stride_bn,
    stride_cm,
    A_ROW_DIV: tl.constexpr,  # pair -> row of a: pair // top_k (gate_up) or pair (down)
    FUSE_SILU_MUL: tl.constexpr,
    MUL_ROUTED_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pair_ids_ptr + offs_m)
    row_valid = pairs < num_pairs
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < N
    a_rows = (pairs // A_ROW_DIV).to(tl.int64)
    b_base = b_ptr + expert * stride_be
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_valid = offs_k < K
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + offs_k[None, :],
                    mask=row_valid[:, None] & k_valid[None, :], other=0.0)  # fmt: skip
        b_mask = k_valid[:, None] & n_valid[None, :]
        # [BLOCK_K, BLOCK_N] tile of the expert's rows offs_n, transposed by the indexing
        b = tl.load(b_base + offs_n[None, :] * stride_bn + offs_k[:, None], mask=b_mask,
                    other=0.0)  # fmt: skip
        if DOT_UPCAST:
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a, b.to(a.dtype), input_precision=DOT_PRECISION)
        if FUSE_SILU_MUL:
            b_up = tl.load(b_base + (offs_n + up_offset)[None, :] * stride_bn + offs_k[:, None],
                           mask=b_mask, other=0.0)  # fmt: skip
            if DOT_UPCAST:
                acc_up += tl.dot(a.to(tl.float32), b_up.to(tl.float32), input_precision="ieee")
            else:
                acc_up += tl.dot(a, b_up.to(a.dtype), input_precision=DOT_PRECISION)
    if FUSE_SILU_MUL:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if MUL_ROUTED_WEIGHT:
        w = tl.load(topk_weights_ptr + pairs, mask=row_valid, other=0.0)
        acc = acc * w[:, None]
    tl.store(c_ptr + pairs.to(tl.int64)[:, None] * stride_cm + offs_n[None, :],
             acc.to(c_ptr.dtype.element_ty), mask=row_valid[:, None] & n_valid[None, :])  # fmt: skip


@dataclass(frozen=True, slots=True)
class MoELaunchConfig:
    """Tile sizes; None fields follow the heuristic in `_pick_config`."""

    block_m: int | None = None
    block_n: int | None = None
    block_k: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None


def _pick_config(num_pairs: int, num_experts: int, cfg: MoELaunchConfig | None) -> MoELaunchConfig:
    cfg = cfg or MoELaunchConfig()
    # Few pairs per expert (decode): small M tiles waste less padding; many: larger tiles.
    per_expert = num_pairs / max(num_experts, 1)
    block_m = cfg.block_m or (16 if per_expert <= 16 else 32 if per_expert <= 64 else 64)
    return MoELaunchConfig(
        block_m=block_m, block_n=cfg.block_n or 64, block_k=cfg.block_k or 64,
        num_warps=cfg.num_warps or 4, num_stages=cfg.num_stages or 3,
    )  # fmt: skip


def moe_align_block_size(
    topk_ids: torch.Tensor,  # [num_tokens, top_k]
    block_m: int,
    num_experts: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted_pair_ids [max_padded] int32, expert_ids [max_padded // block_m] int32,
    num_padded [1] int32).

    Pair p = token * top_k + j. Expert e's pairs occupy one run of sorted_pair_ids, padded with
    num_pairs up to a multiple of block_m; expert_ids names the expert of each block_m tile
    (tiles past num_padded are unused). max_padded bounds num_padded from the shapes alone.
    """
    flat = topk_ids.reshape(-1).long()
    num_pairs = flat.numel()
    device = flat.device
    # scatter_add, not bincount: bincount reads the largest id on the host (a sync, and an
    # error inside CUDA graph capture).
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(
        0, flat, torch.ones_like(flat)
    )  # [num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(flat, stable=True)
    experts_sorted = flat[order]
    rank = torch.arange(num_pairs, device=device) - start[experts_sorted]
    max_padded = triton.cdiv(num_pairs + num_experts * (block_m - 1), block_m) * block_m
    sorted_ids = torch.full((max_padded,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids[padded_start[experts_sorted] + rank] = order.to(torch.int32)
    tile_starts = torch.arange(0, max_padded, block_m, device=device)
    expert_ids = torch.searchsorted(padded_end, tile_starts, right=True)
    expert_ids = expert_ids.clamp_(max=num_experts - 1).to(torch.int32)
    num_padded = padded_end[-1:].to(torch.int32)
    return sorted_ids, expert_ids, num_padded


def _launch(
    a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, topk_weights: torch.Tensor,
    align: tuple[torch.Tensor, torch.Tensor, torch.Tensor], n: int, k: int, num_pairs: int,
    up_offset: int, a_row_div: int, fuse: bool, mul: bool, cfg: MoELaunchConfig,
) -> None:  # fmt: skip
    """One grouped GEMM launch: c[pair, :n] = f(a[pair // a_row_div, :k] @ b[expert]^T)."""
    sorted_ids, expert_ids, num_padded = align
    grid = (expert_ids.shape[0] * triton.cdiv(n, cfg.block_n),)
    _fused_moe_kernel[grid](
        a, b, c, topk_weights, sorted_ids, expert_ids, num_padded, n, k, num_pairs, up_offset,
        a.stride(0), b.stride(0), b.stride(1), c.stride(0),
        A_ROW_DIV=a_row_div, FUSE_SILU_MUL=fuse, MUL_ROUTED_WEIGHT=mul,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        DOT_UPCAST=envs.triton_interpret(),  # the interpreter multiplies raw bf16 bits in tl.dot
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


def fused_experts_triton(
    hidden: torch.Tensor,  # [num_tokens, hidden]
    w13: torch.Tensor,  # [num_experts, 2 * intermediate, hidden]
    w2: torch.Tensor,  # [num_experts, hidden, intermediate]
    topk_weights: torch.Tensor,  # [num_tokens, top_k]
    topk_ids: torch.Tensor,  # [num_tokens, top_k]
    config: MoELaunchConfig | None = None,
) -> torch.Tensor:  # [num_tokens, hidden]
    """The MoE experts in two launches; same result as `grouped_experts_torch`."""
    num_tokens, hidden_size = hidden.shape
    num_experts, two_inter, _ = w13.shape
    inter = two_inter // 2
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    if num_tokens == 0:
        return torch.zeros_like(hidden)
    hidden = hidden.contiguous()
    cfg = _pick_config(num_pairs, num_experts, config)
    align = moe_align_block_size(topk_ids, cfg.block_m, num_experts)
    weights = topk_weights.reshape(-1).float().contiguous()
    act = torch.empty(num_pairs, inter, dtype=hidden.dtype, device=hidden.device)
    _launch(hidden, w13, act, weights, align, inter, hidden_size, num_pairs, inter, top_k,
            True, False, cfg)  # fmt: skip
    out = torch.empty(num_pairs, hidden_size, dtype=hidden.dtype, device=hidden.device)
    _launch(act, w2, out, weights, align, hidden_size, inter, num_pairs, 0, 1, False, True, cfg)
    return out.view(num_tokens, top_k, hidden_size).sum(dim=1)
