"""Packed integer weights: bit-level pack/unpack and the exact torch dequantization.

The source of truth for every integer format (GPTQ, AWQ) and the reference of the Triton
GEMM. Packing is a little-endian bit stream: along the packed dimension, value j of a run
occupies bits [j*bits, (j+1)*bits) of the concatenated int32 words, so 2/4/8-bit values sit
whole in one word (32/bits per word) and 3-bit values run 32 to every 3 words, two of them
straddling a word boundary (GPTQ's 3-bit layout).

The canonical form that methods convert their checkpoints to after loading:
  qweight [K * bits / 32, N] int32, packed along K (input features) as above;
  zeros   [G, N] float, the true zero points (any format offsets already undone);
  scales  [G, N] float;
  g_idx   [K] int or None (None: row k is in group k // group_size).
w[k, n] = (q[k, n] - zeros[g(k), n]) * scales[g(k), n], computed in float32.
"""

from __future__ import annotations

from fractions import Fraction

import torch

SUPPORTED_BITS: tuple[int, ...] = (2, 3, 4, 8)


def pack_factor(bits: int) -> Fraction:
    """Logical values per stored int32 (32/3 for 3-bit)."""
    return Fraction(32, bits)


def packed_size(n: int, bits: int) -> int:
    """int32 words that hold `n` values; ValueError when they do not fill whole words."""
    words = Fraction(n * bits, 32)
    if words.denominator != 1:
        run = 32 // bits if 32 % bits == 0 else 32
        raise ValueError(f"{n} {bits}-bit values do not fill whole int32 words "
                         f"(need a multiple of {run})")
    return int(words)


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit patterns -> the same bits as int32."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def _positions(n: int, bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    bit = torch.arange(n, dtype=torch.int64, device=device) * bits
    return bit // 32, bit % 32  # word index, shift within it


def pack_int32(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Packs unsigned `bits`-bit integers along `dim` into int32 words."""
    values = values.to(torch.int64).movedim(dim, 0)
    n = values.shape[0]
    words = packed_size(n, bits)
    if values.numel() and (values.min() < 0 or values.max() >= 2**bits):
        raise ValueError(f"values outside the unsigned {bits}-bit range")
    word, shift = _positions(n, bits, values.device)
    view = (-1,) + (1,) * (values.dim() - 1)
    low = (values << shift.view(view)) & 0xFFFFFFFF
    out = torch.zeros((words + 1,) + values.shape[1:], dtype=torch.int64, device=values.device)
    out.index_add_(0, word, low)
    # The high bits of values that straddle into the next word.
    high = values >> (32 - shift).view(view)
    out.index_add_(0, word + 1, torch.where((shift + bits > 32).view(view), high, 0))
    return _to_int32(out[:words]).movedim(0, dim).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, dim: int, n: int | None = None) -> torch.Tensor:
    """Inverse of `pack_int32`: [.., words, ..] int32 -> [.., n, ..] int32 values."""
    packed = packed.movedim(dim, 0).to(torch.int64) & 0xFFFFFFFF
    words = packed.shape[0]
    n = n if n is not None else int(Fraction(words * 32, bits))
    if packed_size(n, bits) != words:
        raise ValueError(f"{words} packed words do not hold {n} {bits}-bit values")
    word, shift = _positions(n, bits, packed.device)
    nxt = torch.cat([packed[1:], torch.zeros_like(packed[:1])])
    pair = packed.index_select(0, word) | (nxt.index_select(0, word) << 32)
    view = (-1,) + (1,) * (packed.dim() - 1)
    vals = (pair >> shift.view(view)) & (2**bits - 1)
    return vals.to(torch.int32).movedim(0, dim).contiguous()


def column_chunks(n: int, size: int = 4096) -> list[slice]:
    """Column ranges for load-time repacks, bounding their int64 temporaries (a 70B
    gate_up projection unpacked whole would need gigabytes)."""
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def group_index(g_idx: torch.Tensor | None, k: int, group_size: int) -> torch.Tensor:
    """[K] group of each input row."""
    if g_idx is not None:
        return g_idx.to(torch.int64)
    return torch.arange(k, dtype=torch.int64) // group_size


def dequantize(
    qweight: torch.Tensor,  # [K * bits / 32, N] int32
    zeros: torch.Tensor,  # [G, N]
    scales: torch.Tensor,  # [G, N]
    bits: int,
    group_size: int,
    g_idx: torch.Tensor | None = None,  # [K]
) -> torch.Tensor:
    """The exact [K, N] float32 weight of the canonical form (see the module docstring)."""
    k = int(Fraction(qweight.shape[0] * 32, bits))
    q = unpack_int32(qweight, bits, 0, k)
    g = group_index(g_idx, k, group_size).to(qweight.device)
    return (q.float() - zeros.float()[g]) * scales.float()[g]


def int_linear_ref(
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,  # [K * bits / 32, N] int32
    zeros: torch.Tensor,  # [G, N]
    scales: torch.Tensor,  # [G, N]
    bits: int,
    group_size: int,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference of the Triton GEMM: x @ w with w dequantized to float32, then cast to x's
    dtype (the kernel rounds the dequantized weight to x's dtype before its dot)."""
    w = dequantize(qweight, zeros, scales, bits, group_size, g_idx).to(x.dtype)
    return (x.float() @ w.float()).to(x.dtype)
