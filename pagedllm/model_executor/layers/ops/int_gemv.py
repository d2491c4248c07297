"""Small-M GEMV for packed integer weights (GPTQ / AWQ, 4 and 8 bit): y = x @ dequant(qweight).

Decode (M = 1..16) is bound by streaming the packed weights, so this kernel reads each
int32 word exactly once and keeps all M activation rows in one program: a program owns
BLOCK_N output columns and one K range (split-K over programs, `split_k.store_tile` sums the
splits in the same launch). Layout: the one `int_gemm.py` streams (`packed_int`'s canonical
form as `int_linear.kernel_layout` leaves it, so GEMV, fused GEMM and dense path share one
copy of the weight): qweight [K / PACK, N] int32 with word [i, n] holding input rows
i * PACK .. i * PACK + PACK - 1 of column n, scales and zero points [G, N] fp16, optional
g_idx [K] int32 (ragged groups left after the act-order sort). A [WORDS, BLOCK_N] tile of
words is loaded coalesced along N (16-byte vectors) and taken apart in bit planes: plane j
(value j of every word, input rows word * PACK + j) keeps the tile's register layout, so
unpacking is a shift and a mask per value and never moves data between threads.

Two multiplies (`gemv_config.GemvConfig.use_dot`):
- FMA (the default at M = 1): each plane is dequantized in fp32 with the exponent trick
  (q | 0x4B000000 read as fp32 is 2^23 + q, minus 2^23 + z gives q - z exactly) and
  multiplied into a 2-D [WORDS, BLOCK_N] accumulator, the group scale applied once per K
  block, the WORDS axis summed once at the end; 2..4 rows keep one such accumulator each
  (the scale folded into the shared dequantized value). A 3-D [M, WORDS, BLOCK_N] form took
  ~250 registers a thread at M = 2.
- `tl.dot` (M up to 32, padded to 16 rows): when a K block lies inside one group the plane
  goes to the tensor cores as raw 16-bit integers (q | 0x4300 read as bf16 is 128 + q,
  q | 0x6400 read as fp16 is 1024 + q) and the zero point and scale are applied per block
  to the [BLOCK_M, BLOCK_N] partial: s * (x . (q + c) - (z + c) * sum(x)). Otherwise (ragged
  groups, groups smaller than a block) each value is dequantized to x's dtype first.

The reference is `packed_int.int_linear_ref`; configs come from `gemv_config.lookup`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from pagedllm.model_executor.layers.ops import gemv_config
from pagedllm.model_executor.layers.ops.gemv_config import GemvConfig
from pagedllm.model_executor.layers.ops.split_k import plan, stack_rows, store_tile

GEMV_BITS: tuple[int, ...] = (4, 8)
GEMV_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)
# GROUP_MODE: where a K block's scales and zero points come from.
BLOCK_GROUP, WORD_GROUP, ROW_GROUP = 0, 1, 2


@triton.jit
def _word_groups(s_ptr, z_ptr, k0, offs_w, w_ok, offs_n, n_ok, N,
                 PACK: tl.constexpr, GROUP_SIZE: tl.constexpr, GROUP_MODE: tl.constexpr):
    """fp32 scales and zero points of a K block: [1, BLOCK_N] when it lies inside one group
    (BLOCK_GROUP), [WORDS, BLOCK_N] with one group per word otherwise (WORD_GROUP)."""
    if GROUP_MODE == 0:
        off = (k0 // GROUP_SIZE) * N + offs_n
        s = tl.load(s_ptr + off, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        z = tl.load(z_ptr + off, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    else:
        g = (offs_w * PACK) // GROUP_SIZE
        off = g[:, None].to(tl.int64) * N + offs_n[None, :]
        ok = w_ok[:, None] & n_ok[None, :]
        s = tl.load(s_ptr + off, mask=ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + off, mask=ok, other=0.0).to(tl.float32)
    return s, z


@triton.jit
def _row_groups(s_ptr, z_ptr, g_ptr, rows, w_ok, offs_n, n_ok, N):
    """[WORDS, BLOCK_N] fp32 scales and zero points of one plane's rows through g_idx."""
    g = tl.load(g_ptr + rows, mask=w_ok, other=0)
    off = g[:, None].to(tl.int64) * N + offs_n[None, :]
    ok = w_ok[:, None] & n_ok[None, :]
    s = tl.load(s_ptr + off, mask=ok, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + off, mask=ok, other=0.0).to(tl.float32)
    return s, z


@triton.jit
def _load_words(qw_ptr, k0, k_end, offs_n, n_ok, N, PACK: tl.constexpr, WORDS: tl.constexpr):
    """[WORDS, BLOCK_N] int32 words of the K block at k0 (zeros past k_end)."""
    offs_w = k0 // PACK + tl.arange(0, WORDS)
    ok = (offs_w[:, None] * PACK < k_end) & n_ok[None, :]
    return tl.load(qw_ptr + offs_w[:, None].to(tl.int64) * N + offs_n[None, :], mask=ok,
                   other=0)


@triton.jit
def _plane(packed, j: tl.constexpr, BITS: tl.constexpr):
    """Value j of every word as int32."""
    return (packed >> (j * BITS)) & ((1 << BITS) - 1)


@triton.jit
def _plane_f32(packed, j: tl.constexpr, BITS: tl.constexpr):
    """Value j of every word as 2^23 + q in fp32 (an OR, no int -> float convert)."""
    return (_plane(packed, j, BITS) | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _plane_inplace(packed, hi, j: tl.constexpr, BITS: tl.constexpr):
    """Value j of every word as q in fp32, with no shift for the first LOW = 23 // BITS
    planes: their bits (from SH = (j % LOW) * BITS) already lie inside fp32's mantissa, so
    one AND-OR with the exponent of 2^(23 - SH), whose mantissa step is 2^-SH, makes
    2^(23 - SH) + q, and subtracting the constant leaves q exactly. The other planes come
    from `hi`, the words shifted down by LOW planes once for all of them (PACK <= 2 * LOW
    for 4 and 8 bits)."""
    LOW: tl.constexpr = 23 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    SH: tl.constexpr = (j % LOW) * BITS
    MAGIC: tl.constexpr = 0x4B000000 - (SH << 23)
    if j < LOW:
        bits = packed & (MASK << SH)
    else:
        bits = hi & (MASK << SH)
    return (bits | MAGIC).to(tl.float32, bitcast=True) - (1 << (23 - SH))


@triton.jit
def _fma_block_1(acc, packed, x_ptr, offs_w, w_ok, k0, offs_n, n_ok, s_ptr, z_ptr, g_ptr, N,
                 BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, GROUP_MODE: tl.constexpr,
                 WORDS: tl.constexpr, BLOCK_N: tl.constexpr, INPLACE: tl.constexpr):
    """`_fma_block` for one activation row: acc [WORDS, BLOCK_N], every tensor 2-D (the
    3-D form costs registers the single-stream case needs for loads in flight)."""
    PACK: tl.constexpr = 32 // BITS
    LOW: tl.constexpr = 23 // BITS
    blk = tl.zeros((WORDS, BLOCK_N), dtype=tl.float32)
    if GROUP_MODE != 2:
        s, z = _word_groups(s_ptr, z_ptr, k0, offs_w, w_ok, offs_n, n_ok, N, PACK,
                            GROUP_SIZE, GROUP_MODE)
        zo = z + 8388608.0
    if INPLACE:
        hi = packed >> (LOW * BITS)
        xs = tl.zeros((WORDS,), dtype=tl.float32)
    for j in tl.static_range(PACK):
        rows = offs_w * PACK + j
        if GROUP_MODE == 2:
            xj = tl.load(x_ptr + rows, mask=w_ok, other=0.0).to(tl.float32)[:, None]
            v = _plane_f32(packed, j, BITS)
            s, z = _row_groups(s_ptr, z_ptr, g_ptr, rows, w_ok, offs_n, n_ok, N)
            blk += xj * ((v - (z + 8388608.0)) * s)
        elif INPLACE:
            # The zero point once per word below: sum_j x_j (q_j - z) = sum_j x_j q_j -
            # z sum_j x_j (a word's values share one group).
            xv = tl.load(x_ptr + rows, mask=w_ok, other=0.0).to(tl.float32)
            xs += xv
            blk += xv[:, None] * _plane_inplace(packed, hi, j, BITS)
        else:
            xj = tl.load(x_ptr + rows, mask=w_ok, other=0.0).to(tl.float32)[:, None]
            v = _plane_f32(packed, j, BITS)
            blk += xj * (v - zo)
    if GROUP_MODE == 2:
        acc += blk
    elif INPLACE:
        acc += (blk - z * xs[:, None]) * s
    else:
        acc += blk * s
    return acc


@triton.jit
def _fma_rows(a0, a1, a2, a3, packed, x_ptr, stride_xm, M, offs_w, w_ok, k0, offs_n, n_ok,
              s_ptr, z_ptr, g_ptr, N, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
              GROUP_MODE: tl.constexpr, BLOCK_M: tl.constexpr):
    """`_fma_block_1` for 2..4 activation rows, one 2-D [WORDS, BLOCK_N] accumulator each
    (a0..a3; those past BLOCK_M stay zero): each value is dequantized once, scale included,
    and multiplied into every row."""
    PACK: tl.constexpr = 32 // BITS
    if GROUP_MODE != 2:
        s, z = _word_groups(s_ptr, z_ptr, k0, offs_w, w_ok, offs_n, n_ok, N, PACK,
                            GROUP_SIZE, GROUP_MODE)
        zo = z + 8388608.0
    m_rows = tl.zeros_like(offs_w) + M  # [WORDS]: the row count, for the row masks
    for j in tl.static_range(PACK):
        rows = offs_w * PACK + j
        v = _plane_f32(packed, j, BITS)
        if GROUP_MODE == 2:
            s, z = _row_groups(s_ptr, z_ptr, g_ptr, rows, w_ok, offs_n, n_ok, N)
            d = (v - (z + 8388608.0)) * s
        else:
            d = (v - zo) * s
        a0 += tl.load(x_ptr + rows, mask=w_ok, other=0.0).to(tl.float32)[:, None] * d
        a1 += tl.load(x_ptr + stride_xm + rows, mask=w_ok & (m_rows > 1),
                      other=0.0).to(tl.float32)[:, None] * d
        if BLOCK_M > 2:
            a2 += tl.load(x_ptr + 2 * stride_xm + rows, mask=w_ok & (m_rows > 2),
                          other=0.0).to(tl.float32)[:, None] * d
            a3 += tl.load(x_ptr + 3 * stride_xm + rows, mask=w_ok & (m_rows > 3),
                          other=0.0).to(tl.float32)[:, None] * d
    return a0, a1, a2, a3


@triton.jit
def _dot_into(acc, x, w, SWAP_AB: tl.constexpr, DOT_FP32: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] (SWAP_AB: [BLOCK_N, BLOCK_M]) += x [BLOCK_M, WORDS] @ w."""
    if DOT_FP32:
        # The interpreter multiplies the raw bits of 16-bit dot operands: fp32 there.
        if SWAP_AB:
            acc = tl.dot(tl.trans(w.to(tl.float32)), tl.trans(x.to(tl.float32)), acc,
                         input_precision="ieee")
        else:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    elif SWAP_AB:
        acc = tl.dot(tl.trans(w), tl.trans(x), acc)
    else:
        acc = tl.dot(x, w, acc)
    return acc


@triton.jit
def _dot_block(acc, packed, x_rows, offs_w, w_ok, m_ok, k0, offs_n, n_ok, s_ptr, z_ptr,
               g_ptr, N, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
               GROUP_MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               SWAP_AB: tl.constexpr, DOT_FP32: tl.constexpr, MAGIC: tl.constexpr,
               MAGIC_OFFSET: tl.constexpr):
    """acc += x @ dequant(block) on the tensor cores (see the module docstring)."""
    PACK: tl.constexpr = 32 // BITS
    if SWAP_AB:
        blk = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        blk = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if GROUP_MODE != 2:
        s, z = _word_groups(s_ptr, z_ptr, k0, offs_w, w_ok, offs_n, n_ok, N, PACK,
                            GROUP_SIZE, GROUP_MODE)
    for j in tl.static_range(PACK):
        rows = offs_w * PACK + j
        xj = tl.load(x_rows + rows[None, :], mask=m_ok[:, None] & w_ok[None, :], other=0.0)
        q = _plane(packed, j, BITS)
        if GROUP_MODE == 0:
            # Raw integers; zero point and scale once per block below.
            if DOT_FP32:
                w = q.to(tl.float32)
            elif MAGIC != 0:  # MAGIC | q read as x's 16-bit type is MAGIC_OFFSET + q
                w = (q | MAGIC).to(tl.int16).to(xj.dtype, bitcast=True)
            else:  # 8-bit values in bf16 (7 mantissa bits): converted
                w = q.to(xj.dtype)
            xsum += tl.sum(xj.to(tl.float32), axis=1)
        else:
            if GROUP_MODE == 2:
                s, z = _row_groups(s_ptr, z_ptr, g_ptr, rows, w_ok, offs_n, n_ok, N)
            v = (q | 0x4B000000).to(tl.float32, bitcast=True)
            w = ((v - (z + 8388608.0)) * s).to(xj.dtype)
        blk = _dot_into(blk, xj, w, SWAP_AB, DOT_FP32)
    if GROUP_MODE == 0:
        if DOT_FP32:
            zo = z
        else:
            zo = z + MAGIC_OFFSET
        if SWAP_AB:
            acc += (blk - tl.trans(zo) * xsum[None, :]) * tl.trans(s)
        else:
            acc += (blk - zo * xsum[:, None]) * s
    else:
        acc += blk
    return acc


@triton.jit
def _int_gemv_kernel(
    x_ptr,  # [M, K]
    qw_ptr,  # [K / PACK, N] int32
    s_ptr,  # [G, N]
    z_ptr,  # [G, N]
    g_ptr,  # [K] int32 (read only with ROW_GROUP)
    out_ptr,  # [M, N], x's dtype
    partial_ptr,  # [SPLIT_K, M, N] fp32 (split-K only)
    lock_ptr,  # [>= cdiv(N, BLOCK_N)] int32 arrival counters (split-K only)
    M,
    N,
    K,
    stride_xm,
    K_PER_SPLIT,  # a multiple of BLOCK_K
    SPLIT_K,  # K splits (partials summed in this launch when > 1)
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    GROUP_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WORDS: tl.constexpr,  # int32 words per column per K block (BLOCK_K / PACK)
    HAS_SPLIT: tl.constexpr,
    USE_DOT: tl.constexpr,
    SWAP_AB: tl.constexpr,
    DOT_FP32: tl.constexpr,
    MAGIC: tl.constexpr,
    MAGIC_OFFSET: tl.constexpr,
    PREFETCH: tl.constexpr,
    INPLACE: tl.constexpr,  # FMA at one row: `_plane_inplace` (no shift for most planes)
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    PACK: tl.constexpr = 32 // BITS
    BLOCK_K: tl.constexpr = WORDS * PACK
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm  # [BLOCK_M, 1]
    if USE_DOT:
        if SWAP_AB:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    elif BLOCK_M == 1:
        acc = tl.zeros((WORDS, BLOCK_N), dtype=tl.float32)
    else:  # 2..4 rows, one accumulator each
        acc = tl.zeros((WORDS, BLOCK_N), dtype=tl.float32)
        acc1 = tl.zeros((WORDS, BLOCK_N), dtype=tl.float32)
        acc2 = tl.zeros((WORDS, BLOCK_N), dtype=tl.float32)
        acc3 = tl.zeros((WORDS, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    if PREFETCH:
        ahead = _load_words(qw_ptr, k_start, k_end, offs_n, n_ok, N, PACK, WORDS)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_w = k0 // PACK + tl.arange(0, WORDS)
        w_ok = offs_w * PACK < k_end
        if PREFETCH:
            # The next block's load is issued before this block's math (registers double
            # buffered; past k_end it is fully masked and reads nothing).
            packed = ahead
            ahead = _load_words(qw_ptr, k0 + BLOCK_K, k_end, offs_n, n_ok, N, PACK, WORDS)
        else:
            packed = _load_words(qw_ptr, k0, k_end, offs_n, n_ok, N, PACK, WORDS)
        if USE_DOT:
            acc = _dot_block(acc, packed, x_rows, offs_w, w_ok, m_ok, k0, offs_n, n_ok,
                             s_ptr, z_ptr, g_ptr, N, BITS, GROUP_SIZE, GROUP_MODE, BLOCK_M,
                             BLOCK_N, SWAP_AB, DOT_FP32, MAGIC, MAGIC_OFFSET)
        elif BLOCK_M == 1:
            acc = _fma_block_1(acc, packed, x_ptr, offs_w, w_ok, k0, offs_n, n_ok, s_ptr,
                               z_ptr, g_ptr, N, BITS, GROUP_SIZE, GROUP_MODE, WORDS, BLOCK_N,
                               INPLACE)
        else:
            acc, acc1, acc2, acc3 = _fma_rows(acc, acc1, acc2, acc3, packed, x_ptr,
                                              stride_xm, M, offs_w, w_ok, k0, offs_n, n_ok,
                                              s_ptr, z_ptr, g_ptr, N, BITS, GROUP_SIZE,
                                              GROUP_MODE, BLOCK_M)
    if USE_DOT:
        if SWAP_AB:
            res = tl.trans(acc)
        else:
            res = acc
    elif BLOCK_M == 1:
        res = tl.sum(acc, axis=0)[None, :]
    else:
        res = stack_rows(tl.sum(acc, axis=0), tl.sum(acc1, axis=0), tl.sum(acc2, axis=0),
                         tl.sum(acc3, axis=0), offs_m, BLOCK_M)
    tile = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    store_tile(res, out_ptr, partial_ptr, lock_ptr + pid_n, tile,
               m_ok[:, None] & n_ok[None, :], pid_k, M, N, SPLIT_K, HAS_SPLIT)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _magic(dtype: torch.dtype, bits: int) -> tuple[int, float]:
    """(OR mask, value of the mask alone) that make a 16-bit float of a small integer."""
    if dtype == torch.float16:
        return 0x6400, 1024.0
    if bits <= 7:  # bf16: 7 mantissa bits
        return 0x4300, 128.0
    return 0, 0.0


FMA_MAX_M = 4  # rows the FMA variant carries (one accumulator each)


def gemv_supported(x: torch.Tensor, bits: int, group_size: int) -> bool:
    """Whether `int_gemv` takes this call (else the caller keeps the int GEMM)."""
    return (x.dim() == 2 and x.shape[0] <= 32 and x.dtype in GEMV_DTYPES and bits in GEMV_BITS
            and group_size % (32 // bits) == 0)


def _group_mode(g_idx: torch.Tensor | None, group_size: int, block_k: int) -> int:
    if g_idx is not None:
        return ROW_GROUP
    return BLOCK_GROUP if group_size % block_k == 0 else WORD_GROUP


def int_gemv(
    x: torch.Tensor,  # [M, K] bf16 / fp16, M <= 32
    qweight: torch.Tensor,  # [K / PACK, N] int32
    zeros: torch.Tensor,  # [G, N]
    scales: torch.Tensor,  # [G, N]
    bits: int,
    group_size: int,
    g_idx: torch.Tensor | None = None,  # [K] int32
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """[M, N] = x @ dequant(qweight) in x's dtype (see the module docstring)."""
    if not gemv_supported(x, bits, group_size):
        raise ValueError(f"int_gemv takes bf16/fp16 x of at most 32 rows and {GEMV_BITS}-bit "
                         f"weights in groups of whole words; got {tuple(x.shape)} {x.dtype}, "
                         f"{bits}-bit, group {group_size}")
    m, k = x.shape
    n = qweight.shape[1]
    pack = 32 // bits
    if qweight.shape[0] * pack != k:
        raise ValueError(f"qweight {tuple(qweight.shape)} does not hold {k} rows of {bits} bits")
    x = x if x.stride(-1) == 1 else x.contiguous()
    cfg = config or gemv_config.lookup(f"int{bits}", m, n, k)
    if not cfg.use_dot and m > FMA_MAX_M:  # the FMA variant carries at most 4 rows
        cfg = gemv_config.default_config(f"int{bits}", m)
    # A dot needs 16 words per plane.
    block_k = max(cfg.block_k, 16 * pack) if cfg.use_dot else max(cfg.block_k, pack)
    bm = gemv_config.block_m(m, cfg.use_dot)
    tiles = triton.cdiv(n, cfg.block_n)
    split = gemv_config.split_for(cfg.split_k, block_k, tiles, k, x.device)
    split, k_per_split, lock, partial = plan(split, block_k, k, tiles, m, n, x.device)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    interp = _interpreted()
    magic, offset = _magic(x.dtype, bits)
    _int_gemv_kernel[(tiles, split)](
        x, qweight, scales, zeros, g_idx if g_idx is not None else qweight, out,
        partial if partial is not None else out, lock if lock is not None else qweight,
        m, n, k, x.stride(0), k_per_split, split,
        BITS=bits, GROUP_SIZE=group_size, GROUP_MODE=_group_mode(g_idx, group_size, block_k),
        BLOCK_M=bm, BLOCK_N=cfg.block_n, WORDS=block_k // pack, HAS_SPLIT=split > 1,
        USE_DOT=cfg.use_dot, SWAP_AB=cfg.swap_ab, DOT_FP32=interp, MAGIC=magic,
        MAGIC_OFFSET=offset, PREFETCH=cfg.prefetch, INPLACE=cfg.inplace,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
