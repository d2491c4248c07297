"""Weight-only integer GEMM (int4 / int8 / int2 x bf16 / fp16): y = x @ dequant(qweight).

Layout streamed by the kernel (what GPTQ and AWQ checkpoints are repacked into at load, see
`quantization/packed_int.py`): qweight [K * bits / 32, N] int32, word [i, n] holding input
rows i*32/bits .. (i+1)*32/bits - 1 of output column n in ascending bit order; scales and
zero points [G, N] in the activation dtype (zero points as exact integers); optional
g_idx [K] int32 (group of each row, after act-order rows were sorted at load). A program
owns a BLOCK_M x BLOCK_N tile of y and walks its K range; packed words are read as
contiguous rows of BLOCK_N int32 (coalesced along N) and dequantized in registers as
(q - z) * s in float32, then rounded to the activation dtype for `tl.dot`. Three ways to
expand the words (`PAGEDLLM_INT_GEMM_UNPACK`, for tuning on the GPU): "planes",
each word is loaded once and value j of every word (input rows word * PACK + j) makes one dot
against the matching strided columns of x, so no value changes register layout; "reshape",
each word is loaded once and its values shifted out along a new axis; "gather", each of the
BLOCK_K rows loads its word (the repeats are L1 hits). Compiled for sm_90 (Triton 3.9, no
GPU: `benchmarks/int_gemm_aot.py`) the decode tile (16 x 64 x 128, 4 warps) takes 64-124
registers a thread with "planes", 168-254 with "reshape", and 255 plus spills with "gather"
(its [BLOCK_K, BLOCK_N] int32 load is PACK times the words it needs).

Small M (decode) splits K across programs so that the weight stream, the bound at M = 1..32,
is spread over every SM; the fp32 partials are summed by the last split to finish each tile
(an arrival counter), so a split-K GEMM is one launch, which matters inside decode CUDA
graphs of a few hundred GEMMs (`PAGEDLLM_INT_GEMM_SPLIT_K` overrides the split). Large M
(prefill) goes through `int_matmul`'s dense path instead: the weight dequantized once into a
transient 16-bit [K, N] buffer, then cuBLAS.

The reference is `packed_int.int_linear_ref`.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagedllm import envs
from pagedllm.model_executor.layers.ops import gemv_config
from pagedllm.model_executor.layers.ops.split_k import plan, store_tile

KERNEL_BITS: tuple[int, ...] = (2, 4, 8)


UNPACK_MODES: dict[str, int] = {"gather": 0, "reshape": 1, "planes": 2}


@triton.jit
def _dequant(
    q,  # [R, BLOCK_N] int32 values of input rows `rows`
    rows,  # [R] input row of each
    rows_ok,  # [R]
    k0,
    s_ptr,
    z_ptr,
    g_ptr,
    offs_n,
    n_ok,
    N,
    GROUP_SIZE: tl.constexpr,
    HAS_GIDX: tl.constexpr,
    GROUP_PER_BLOCK: tl.constexpr,
):
    """(q - z) * s in float32 for rows of one K block."""
    if GROUP_PER_BLOCK:
        g = k0 // GROUP_SIZE
        s = tl.load(s_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        z = tl.load(z_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    else:
        if HAS_GIDX:
            g = tl.load(g_ptr + rows, mask=rows_ok, other=0)
        else:
            g = rows // GROUP_SIZE
        goff = g[:, None].to(tl.int64) * N + offs_n[None, :]
        wmask = rows_ok[:, None] & n_ok[None, :]
        s = tl.load(s_ptr + goff, mask=wmask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + goff, mask=wmask, other=0.0).to(tl.float32)
    # q | 0x4B000000 read as fp32 is exactly 2^23 + q (q < 2^23): no int->float convert, and
    # (2^23 + q) - (2^23 + z) = q - z exactly, so the result equals (q - z) * s.
    v = (q | 0x4B000000).to(tl.float32, bitcast=True)
    return (v - (z + 8388608.0)) * s


@triton.jit
def _mma(acc, x, w, DOT_UPCAST: tl.constexpr):
    w = w.to(x.dtype)
    if DOT_UPCAST:
        acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
    else:
        acc += tl.dot(x, w)
    return acc


@triton.jit
def _planes_block(acc, x_rows, m_ok, qw_ptr, k0, k_end, s_ptr, z_ptr, g_ptr, offs_n, n_ok, N,
                  BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_GIDX: tl.constexpr,
                  GROUP_PER_BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
                  DOT_UPCAST: tl.constexpr):
    """Bit planes: value j of every word is input row word * PACK + j; one dot per j over
    those rows, the matching x columns read strided."""
    PACK: tl.constexpr = 32 // BITS
    offs_w = k0 // PACK + tl.arange(0, BLOCK_K // PACK)
    packed = tl.load(qw_ptr + offs_w[:, None].to(tl.int64) * N + offs_n[None, :],
                     mask=(offs_w[:, None] * PACK < k_end) & n_ok[None, :], other=0)
    for j in tl.static_range(PACK):
        rows = offs_w * PACK + j
        rows_ok = rows < k_end
        x = tl.load(x_rows + rows[None, :], mask=m_ok[:, None] & rows_ok[None, :], other=0.0)
        w = _dequant((packed >> (j * BITS)) & ((1 << BITS) - 1), rows, rows_ok, k0, s_ptr,
                     z_ptr, g_ptr, offs_n, n_ok, N, GROUP_SIZE, HAS_GIDX, GROUP_PER_BLOCK)
        acc = _mma(acc, x, w, DOT_UPCAST)
    return acc


@triton.jit
def _unpacked_block(acc, x_rows, m_ok, qw_ptr, k0, k_end, s_ptr, z_ptr, g_ptr, offs_n, n_ok,
                    N, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_GIDX: tl.constexpr,
                    GROUP_PER_BLOCK: tl.constexpr, UNPACK: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """One dot over the whole K block, its [BLOCK_K, BLOCK_N] values unpacked first:
    "reshape" (UNPACK 1) shifts each word's values out along a new axis, "gather" (0) has
    each row load its word (the PACK repeats of a word are L1 hits)."""
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_ok = offs_k < k_end
    x = tl.load(x_rows + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
    if UNPACK == 1:
        # Each word once: [WORDS, BLOCK_N] -> [WORDS, PACK, BLOCK_N] -> [BLOCK_K, ..].
        offs_w = k0 // PACK + tl.arange(0, BLOCK_K // PACK)
        packed = tl.load(qw_ptr + offs_w[:, None].to(tl.int64) * N + offs_n[None, :],
                         mask=(offs_w[:, None] * PACK < k_end) & n_ok[None, :], other=0)
        shifts = tl.arange(0, PACK) * BITS
        q = (packed[:, None, :] >> shifts[None, :, None]) & MASK
        q = tl.reshape(q, (BLOCK_K, BLOCK_N))
    else:
        packed = tl.load(qw_ptr + (offs_k[:, None] // PACK).to(tl.int64) * N + offs_n[None, :],
                         mask=k_ok[:, None] & n_ok[None, :], other=0)
        q = (packed >> ((offs_k[:, None] % PACK) * BITS)) & MASK
    w = _dequant(q, offs_k, k_ok, k0, s_ptr, z_ptr, g_ptr, offs_n, n_ok, N, GROUP_SIZE,
                 HAS_GIDX, GROUP_PER_BLOCK)
    return _mma(acc, x, w, DOT_UPCAST)


@triton.jit
def _int_gemm_kernel(
    x_ptr,  # [M, K]
    qw_ptr,  # [K * BITS / 32, N] int32
    s_ptr,  # [G, N]
    z_ptr,  # [G, N]
    g_ptr,  # [K] int32 (read only when HAS_GIDX)
    out_ptr,  # [M, N], x's dtype
    partial_ptr,  # [SPLIT_K, M, N] fp32 (split-K only)
    lock_ptr,  # [tiles] int32 arrival counters, zero between launches (split-K only)
    M,
    N,
    K,
    stride_xm,
    K_PER_SPLIT,
    SPLIT_K,  # a runtime value: one compiled kernel serves every split
    HAS_SPLIT: tl.constexpr,  # SPLIT_K > 1
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    HAS_GIDX: tl.constexpr,
    GROUP_PER_BLOCK: tl.constexpr,  # BLOCK_K rows never cross a group boundary
    UNPACK: tl.constexpr,  # UNPACK_MODES
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        if UNPACK == 2:
            acc = _planes_block(acc, x_rows, m_ok, qw_ptr, k0, k_end, s_ptr, z_ptr, g_ptr,
                                offs_n, n_ok, N, BITS, GROUP_SIZE, HAS_GIDX, GROUP_PER_BLOCK,
                                BLOCK_K, DOT_UPCAST)
        else:
            acc = _unpacked_block(acc, x_rows, m_ok, qw_ptr, k0, k_end, s_ptr, z_ptr, g_ptr,
                                  offs_n, n_ok, N, BITS, GROUP_SIZE, HAS_GIDX,
                                  GROUP_PER_BLOCK, UNPACK, BLOCK_K, BLOCK_N, DOT_UPCAST)
    tile = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    store_tile(acc, out_ptr, partial_ptr, lock_ptr + pid_m * tl.num_programs(1) + pid_n, tile,
               m_ok[:, None] & n_ok[None, :], pid_k, M, N, SPLIT_K, HAS_SPLIT)


@triton.jit
def _int_dequant_kernel(
    qw_ptr,  # [K * BITS / 32, N] int32
    s_ptr,  # [G, N]
    z_ptr,  # [G, N]
    g_ptr,  # [K] int32 (read only when HAS_GIDX)
    out_ptr,  # [K, N]
    N,
    K,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    HAS_GIDX: tl.constexpr,
    GROUP_PER_BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    k0 = tl.program_id(0) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = offs_k < K
    n_ok = offs_n < N
    mask = k_ok[:, None] & n_ok[None, :]
    packed = tl.load(qw_ptr + (offs_k[:, None] // PACK).to(tl.int64) * N + offs_n[None, :],
                     mask=mask, other=0)
    q = (packed >> ((offs_k[:, None] % PACK) * BITS)) & MASK
    w = _dequant(q, offs_k, k_ok, k0, s_ptr, z_ptr, g_ptr, offs_n, n_ok, N, GROUP_SIZE,
                 HAS_GIDX, GROUP_PER_BLOCK)
    tl.store(out_ptr + offs_k[:, None].to(tl.int64) * N + offs_n[None, :],
             w.to(out_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True, slots=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int


def _interpreted() -> bool:
    # The Triton interpreter multiplies the raw bits of bfloat16 dot operands (see
    # attention/ops/paged_attention.py), so under TRITON_INTERPRET the dot runs in fp32.
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _config_file(path: str) -> dict[int, tuple[GemmConfig, str | None]]:
    """PAGEDLLM_INT_GEMM_CONFIG: {"M": {block_m, block_n, block_k, split_k (0: per shape),
    num_warps, num_stages, unpack}} per M bucket (the sweep's `--json`,
    benchmarks/gpu_int_gemm_sweep.py)."""
    with open(path) as f:
        raw = json.load(f)
    out = {}
    for key, c in raw.items():
        cfg = GemmConfig(int(c["block_m"]), int(c["block_n"]), int(c["block_k"]),
                         int(c.get("split_k", 0)), int(c["num_warps"]), int(c["num_stages"]))
        out[int(key)] = (cfg, c.get("unpack"))
    return out


def tuned_config(m: int) -> tuple[GemmConfig, str | None] | None:
    """The config file's entry for the smallest bucket >= m, None without a file or bucket."""
    path = envs.int_gemm_config_file()
    if not path:
        return None
    buckets = _config_file(path)
    fits = [b for b in buckets if b >= m]
    return buckets[min(fits)] if fits else None


def choose_config(
    m: int, n: int, k: int, device: torch.device, elem_bytes: int = 2, bits: int = 4
) -> GemmConfig:
    """Tile sizes by M: decode shapes split K until about four programs run per SM. fp32
    activations (elem_bytes 4) pipeline two stages: four of their tiles overflow the H200's
    227 KiB of shared memory (seen: 256 KiB asked). PAGEDLLM_INT_GEMM_CONFIG overrides the
    tiles per M bucket (split_k 0 there: chosen per shape as below). The swept tiles are
    4-bit ones: 2- and 8-bit weights keep the earlier tiles (the swept ones ask 2- and
    8-bit unpacks for more shared memory than the H200 has)."""
    tuned = tuned_config(m) if elem_bytes < 4 and bits == 4 else None
    if tuned is not None:
        c = tuned[0]
        bm, bn, bk, warps, stages = c.block_m, c.block_n, c.block_k, c.num_warps, c.num_stages
        if c.split_k > 0:
            return c
        return GemmConfig(bm, bn, bk, _auto_split(m, n, k, bm, bn, bk, device), warps, stages)
    if m <= 16 and bits != 4:
        bm, bn, bk, warps, stages = 16, 64, 128, 4, 4
    elif m <= 16:
        # H200 sweep (benchmarks/gpu_int_gemm_sweep.py, docs/benchmarks.md): 16 x 128 x 128
        # summed 153 us over the 8B's four projections at M = 16 against 163 for 16 x 64 x 128
        bm, bn, bk, warps, stages = 16, 128, 128, 4, 4
    elif m <= 32:
        bm, bn, bk, warps, stages = 32, 64, 128, 4, 4
    elif m <= 64 and bits != 4:
        # 8 warps: with 4 this split-K tile spills (benchmarks/int_gemm_aot.py).
        bm, bn, bk, warps, stages = 64, 128, 64, 8, 4
    elif m <= 64:
        # the same sweep at M = 64: 64 x 64 x 128, 4 warps, 3 stages 208 us against 257 for the
        # former 64 x 128 x 64 with 8 warps (and 322 for dequantize + cuBLAS)
        bm, bn, bk, warps, stages = 64, 64, 128, 4, 3
    else:
        bm, bn, bk, warps, stages = 128, 128, 64, 8, 3
    if elem_bytes >= 4:
        stages = 2
    return GemmConfig(bm, bn, bk, _auto_split(m, n, k, bm, bn, bk, device), warps, stages)


def _auto_split(m: int, n: int, k: int, bm: int, bn: int, bk: int, device: torch.device) -> int:
    forced = envs.int_gemm_split_k()
    if forced is not None:
        return forced
    if m > 64:
        return 1
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    target = 4 * gemv_config.num_sms(device)  # the planes tile is light: several per SM
    max_split = max(1, k // (4 * bk))  # each split streams at least four K blocks
    return max(1, min(max_split, triton.cdiv(target, tiles)))


def int_gemm(
    x: torch.Tensor,  # [M, K] fp16 / bf16 / fp32
    qweight: torch.Tensor,  # [K * bits / 32, N] int32
    zeros: torch.Tensor,  # [G, N], x's dtype
    scales: torch.Tensor,  # [G, N], x's dtype
    bits: int,
    group_size: int,
    g_idx: torch.Tensor | None = None,  # [K] int32
    config: GemmConfig | None = None,
    unpack: str | None = None,
) -> torch.Tensor:
    """[M, N] = x @ dequant(qweight) in x's dtype (see the module docstring)."""
    if bits not in KERNEL_BITS:
        raise ValueError(f"the int GEMM kernel supports {KERNEL_BITS}-bit weights, not {bits}")
    m, k = x.shape
    n = qweight.shape[1]
    if qweight.shape[0] * (32 // bits) != k:
        raise ValueError(f"qweight {tuple(qweight.shape)} does not hold {k} rows of {bits} bits")
    x = x if x.stride(-1) == 1 else x.contiguous()
    cfg = config or choose_config(m, n, k, x.device, x.element_size(), bits)
    tuned = tuned_config(m) if config is None and unpack is None and bits == 4 else None
    mode = unpack or (tuned[1] if tuned is not None and tuned[1] else envs.int_gemm_unpack())
    bk = cfg.block_k
    if mode == "planes":
        bk = max(bk, 16 * (32 // bits))  # each plane's dot needs K >= 16
    tiles = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n))
    split, k_per_split, locks, partial = plan(cfg.split_k, bk, k, tiles[0] * tiles[1], m, n,
                                              x.device)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    # K blocks start at multiples of BLOCK_K, so a block lies inside one group when
    # BLOCK_K divides the group size: one row of scales and zeros per block.
    group_per_block = g_idx is None and group_size % bk == 0
    _int_gemm_kernel[tiles + (split,)](
        x, qweight, scales, zeros, g_idx if g_idx is not None else qweight, out,
        partial if partial is not None else out, locks if locks is not None else qweight,
        m, n, k, x.stride(0), k_per_split, split,
        HAS_SPLIT=split > 1, BITS=bits, GROUP_SIZE=group_size, HAS_GIDX=g_idx is not None,
        GROUP_PER_BLOCK=group_per_block,
        UNPACK=UNPACK_MODES[mode],
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=bk,
        DOT_UPCAST=_interpreted() or x.dtype == torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def int_dequant(
    qweight: torch.Tensor,  # [K * bits / 32, N] int32
    zeros: torch.Tensor,  # [G, N]
    scales: torch.Tensor,  # [G, N]
    bits: int,
    group_size: int,
    g_idx: torch.Tensor | None,  # [K] int32
    dtype: torch.dtype,
) -> torch.Tensor:
    """[K, N] dense weight in `dtype` (the reference is `packed_int.dequantize`)."""
    k, n = qweight.shape[0] * (32 // bits), qweight.shape[1]
    out = torch.empty((k, n), dtype=dtype, device=qweight.device)
    bk, bn = 64, 128
    _int_dequant_kernel[(triton.cdiv(k, bk), triton.cdiv(n, bn))](
        qweight, scales, zeros, g_idx if g_idx is not None else qweight, out, n, k,
        BITS=bits, GROUP_SIZE=group_size, HAS_GIDX=g_idx is not None,
        GROUP_PER_BLOCK=g_idx is None and group_size % bk == 0, BLOCK_K=bk, BLOCK_N=bn,
    )
    return out


def int_matmul(
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,  # [K * bits / 32, N] int32
    zeros: torch.Tensor,  # [G, N]
    scales: torch.Tensor,  # [G, N]
    bits: int,
    group_size: int,
    g_idx: torch.Tensor | None = None,  # [K] int32
    dense_min_m: int | None = None,
) -> torch.Tensor:
    """x @ dequant(qweight): the GEMV (`int_gemv.py`) up to `gemv_config.INT_GEMV_MAX_M`
    rows of bf16/fp16, the fused GEMM above; from `dense_min_m` rows on (large prefills,
    compute-bound) the weight is dequantized into a transient 16-bit buffer and multiplied
    by cuBLAS, whose GEMM outruns the fused one there. Shape-based, so each captured CUDA
    graph size keeps one path."""
    from pagedllm.model_executor.layers.ops.int_gemv import gemv_supported, int_gemv

    if x.shape[0] <= gemv_config.int_gemv_max_m() and gemv_supported(x, bits, group_size):
        return int_gemv(x, qweight, zeros, scales, bits, group_size, g_idx)
    threshold = dense_min_m if dense_min_m is not None else envs.int_gemm_dense_min_m()
    if x.shape[0] >= threshold > 0:
        w = int_dequant(qweight, zeros, scales, bits, group_size, g_idx, x.dtype)
        return torch.mm(x, w)
    return int_gemm(x, qweight, zeros, scales, bits, group_size, g_idx)
