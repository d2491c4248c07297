"""Small-M GEMV for fp8 e4m3 weights, weight-only: y = x @ (w * scale).T in x's dtype; the
same kernel multiplies 16-bit weights (`dense_gemv`, no scale) where the sweep found it faster
than cuBLAS at one or two rows.

At decode sizes (M = 1..16) the W8A8 path pays for a separate activation-quantization
launch and a `_scaled_mm` tuned for large tiles, and loses to bf16 cuBLAS (docs/benchmarks.md);
the bound is streaming the weight bytes. This kernel reads the e4m3 weight [N, K] (the
layout `Fp8LinearMethod` keeps, rows contiguous along K) once, converts it to x's dtype in
registers and multiplies the bf16/fp16 activations unquantized, then applies the per-output-
channel fp32 scale [N] to the fp32 sums. A program owns BLOCK_N rows of the weight (all M
activation rows) and one K range; split-K over programs is summed in the same launch
(`split_k.store_tile`). FMA (`use_dot=False`, M = 1..4): products on the CUDA cores into
one 2-D [BLOCK_N, BLOCK_K] fp32 accumulator per row, summed along K once after the loop
(summing a 3-D product every block ran at 0.8x bf16 on the H200); `tl.dot` above (M padded to 16; `swap_ab`: the weight is operand A).

Numerically this is the weight-only product (x is not rounded to e4m3), so at M <= the GEMV
threshold an fp8 layer is closer to its 16-bit original than the W8A8 path, not equal to it.
The reference is `fp8_gemv_ref`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from pagedllm.model_executor.layers.ops import gemv_config
from pagedllm.model_executor.layers.ops.gemv_config import GemvConfig
from pagedllm.model_executor.layers.ops.split_k import plan, stack_rows, store_tile

GEMV_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)
FMA_MAX_M = 4  # rows the FMA variant carries (one accumulator each)


@triton.jit
def _load_weight(w_rows, k0, k_end, n_ok, BLOCK_K: tl.constexpr, W_FP8: tl.constexpr):
    """[BLOCK_N, BLOCK_K] weights of the K block at k0 (zeros past k_end): e4m3 from the
    uint8 bits, or the 16-bit values as stored."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    w = tl.load(w_rows + offs_k[None, :], mask=n_ok[:, None] & (offs_k < k_end)[None, :],
                other=0)
    if W_FP8:
        w = w.to(tl.float8e4nv, bitcast=True)
    return w


@triton.jit
def _fp8_gemv_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K] e4m3, read as uint8 (masked lanes load 0, no fp8 constant); or 16-bit
    s_ptr,  # [N] fp32 (fp8 only)
    out_ptr,  # [M, N], x's dtype
    partial_ptr,  # [SPLIT_K, M, N] fp32 (split-K only)
    lock_ptr,  # [>= cdiv(N, BLOCK_N)] int32 arrival counters (split-K only)
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    K_PER_SPLIT,  # a multiple of BLOCK_K
    SPLIT_K,  # K splits (partials summed in this launch when > 1)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_SPLIT: tl.constexpr,
    USE_DOT: tl.constexpr,
    SWAP_AB: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PREFETCH: tl.constexpr,
    W_FP8: tl.constexpr,  # e4m3 weights with a per-channel scale; else 16-bit, no scale
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm  # [BLOCK_M, 1]
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn  # [BLOCK_N, 1]
    if USE_DOT and SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    elif USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:  # FMA: one 2-D [BLOCK_N, BLOCK_K] accumulator per row (up to 4), summed at the end
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc3 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    if PREFETCH:
        ahead = _load_weight(w_rows, k_start, k_end, n_ok, BLOCK_K, W_FP8)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_end
        if PREFETCH:  # the next block's load before this block's math (see int_gemv.py)
            w = ahead
            ahead = _load_weight(w_rows, k0 + BLOCK_K, k_end, n_ok, BLOCK_K, W_FP8)
        else:
            w = _load_weight(w_rows, k0, k_end, n_ok, BLOCK_K, W_FP8)
        if USE_DOT:
            x = tl.load(x_rows + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0)
            if DOT_FP32:
                # The interpreter multiplies the raw bits of 16-bit dot operands: fp32 there.
                wt = w.to(tl.float32)
                xt = x.to(tl.float32)
                if SWAP_AB:
                    acc = tl.dot(wt, tl.trans(xt), acc, input_precision="ieee")
                else:
                    acc = tl.dot(xt, tl.trans(wt), acc, input_precision="ieee")
            else:
                wt = w.to(x.dtype)
                if SWAP_AB:
                    acc = tl.dot(wt, tl.trans(x), acc)
                else:
                    acc = tl.dot(x, tl.trans(wt), acc)
        else:
            wf = w.to(tl.float32)
            acc += wf * tl.load(x_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            if BLOCK_M > 1:
                m_k = tl.zeros_like(offs_k) + M  # the row count, for the row masks
                acc1 += wf * tl.load(x_ptr + stride_xm + offs_k, mask=k_ok & (m_k > 1),
                                     other=0.0).to(tl.float32)[None, :]
            if BLOCK_M > 2:
                acc2 += wf * tl.load(x_ptr + 2 * stride_xm + offs_k, mask=k_ok & (m_k > 2),
                                     other=0.0).to(tl.float32)[None, :]
                acc3 += wf * tl.load(x_ptr + 3 * stride_xm + offs_k, mask=k_ok & (m_k > 3),
                                     other=0.0).to(tl.float32)[None, :]
    if USE_DOT and SWAP_AB:
        res = tl.trans(acc)
    elif USE_DOT:
        res = acc
    elif BLOCK_M == 1:
        res = tl.sum(acc, axis=1)[None, :]
    else:
        res = stack_rows(tl.sum(acc, axis=1), tl.sum(acc1, axis=1), tl.sum(acc2, axis=1),
                         tl.sum(acc3, axis=1), offs_m, BLOCK_M)
    if W_FP8:
        scale = tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)
        res = res * scale[None, :]
    tile = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    store_tile(res, out_ptr, partial_ptr, lock_ptr + pid_n, tile,
               m_ok[:, None] & n_ok[None, :], pid_k, M, N, SPLIT_K, HAS_SPLIT)


def gemv_supported(x: torch.Tensor) -> bool:
    """Whether `fp8_gemv` takes this call (else the caller keeps the W8A8 path)."""
    return x.dim() == 2 and x.shape[0] <= 32 and x.dtype in GEMV_DTYPES


def _launch(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, kind: str,
            config: GemvConfig | None) -> torch.Tensor:
    """The kernel on x [M, K] and a row-major weight [N, K] (fp8 with its scale, or 16-bit)."""
    if not gemv_supported(x):
        raise ValueError(f"the {kind} GEMV takes bf16/fp16 x of at most 32 rows, got "
                         f"{tuple(x.shape)} {x.dtype}")
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k or weight.stride(1) != 1:
        raise ValueError(f"weight {tuple(weight.shape)} is not a row-major [N, {k}] matrix")
    x = x if x.stride(-1) == 1 else x.contiguous()
    cfg = config or gemv_config.lookup(kind, m, n, k)
    if not cfg.use_dot and m > FMA_MAX_M:  # the FMA variant carries at most 4 rows
        cfg = gemv_config.default_config(kind, m)
    block_k = max(cfg.block_k, 16)
    bm = gemv_config.block_m(m, cfg.use_dot)
    tiles = triton.cdiv(n, cfg.block_n)
    # No split once the tiles give two programs per SM (the MoE GEMV's finding on the H200).
    split = gemv_config.split_for(cfg.split_k, block_k, tiles, k, x.device, no_split_from=2)
    split, k_per_split, lock, partial = plan(split, block_k, k, tiles, m, n, x.device)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    fp8 = scale is not None
    _fp8_gemv_kernel[(tiles, split)](
        x, weight.view(torch.uint8) if fp8 else weight, scale if fp8 else out,
        out, partial if partial is not None else out, lock if lock is not None else out,
        m, n, k, x.stride(0), weight.stride(0), k_per_split, split,
        BLOCK_M=bm, BLOCK_N=cfg.block_n, BLOCK_K=block_k, HAS_SPLIT=split > 1,
        USE_DOT=cfg.use_dot, SWAP_AB=cfg.swap_ab,
        DOT_FP32=os.environ.get("TRITON_INTERPRET", "0") == "1", PREFETCH=cfg.prefetch,
        W_FP8=fp8, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def fp8_gemv(
    x: torch.Tensor,  # [M, K] bf16 / fp16, M <= 32
    weight: torch.Tensor,  # [N, K] e4m3
    weight_scale: torch.Tensor,  # [N] fp32
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """[M, N] = x @ (weight * weight_scale[:, None]).T in x's dtype."""
    return _launch(x, weight, weight_scale, "fp8", config)


def dense_gemv(
    x: torch.Tensor,  # [M, K] bf16 / fp16, M <= 32
    weight: torch.Tensor,  # [N, K] in x's dtype
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """[M, N] = x @ weight.T in x's dtype (fp32 sums, like cuBLAS's)."""
    if weight.dtype != x.dtype:
        raise ValueError(f"dense_gemv: weight {weight.dtype} is not x's {x.dtype}")
    return _launch(x, weight, None, "bf16", config)


def dense_gemv_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor | None:
    """x @ weight.T + bias through `dense_gemv` when the shape has a tuned config of kind
    "bf16" (the sweep writes one only where the GEMV beat cuBLAS) and the call is 2-D, 16-bit
    and decode-sized (the caller checks the device); None otherwise, for the caller's
    `F.linear`. Shapes only decide, so every replay of a captured graph takes the same path."""
    if not (x.dim() == 2 and 0 < x.shape[0] <= gemv_config.dense_gemv_max_m()
            and x.dtype == weight.dtype and x.dtype in GEMV_DTYPES and weight.stride(1) == 1):
        return None
    cfg = gemv_config.tuned("bf16", x.shape[0], weight.shape[0], weight.shape[1])
    if cfg is None:
        return None
    out = dense_gemv(x, weight, cfg)
    return out if bias is None else out + bias


def fp8_gemv_ref(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor
) -> torch.Tensor:
    """The exact product in fp32, rounded to x's dtype once."""
    w = weight.float() * weight_scale.float()[:, None]
    return (x.float() @ w.t()).to(x.dtype)
