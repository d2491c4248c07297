"""Split-K in one launch: the arrival counters and the epilogue the GEMM kernels share.

A decode-sized GEMM (M = 1..32) has too few output tiles to occupy every SM, so K is split
across programs. Each split stores its fp32 partial tile; the last split to arrive at the
tile's counter sums the partials in split order (deterministic), writes the output and
re-arms the counter, so there is no second reduction launch and no memset: inside a decode
CUDA graph of a few hundred GEMMs every launch counts. The counters are allocated once per
device (`prepare`, at load, before any graph capture) and are zero between launches; kernels
on one stream run one after another, so they can share them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOCK_COUNT = 1 << 14
_LOCKS: dict[tuple[str, int | None], torch.Tensor] = {}


def locks(device: torch.device, tiles: int) -> torch.Tensor | None:
    """The device's counters, or None when `tiles` exceeds them (the caller does not split)."""
    if tiles > LOCK_COUNT:
        return None
    key = (device.type, device.index)
    if key not in _LOCKS:
        _LOCKS[key] = torch.zeros(LOCK_COUNT, dtype=torch.int32, device=device)
    return _LOCKS[key]


def prepare(device: torch.device) -> None:
    """Allocates the device's counters now (at load), not inside a graph capture."""
    locks(device, 0)


def plan(
    split: int, block_k: int, k: int, tiles: int, m: int, n: int, device: torch.device
) -> tuple[int, int, torch.Tensor | None, torch.Tensor | None]:
    """(splits, K rows per split (whole blocks), counters, [splits, m, n] fp32 partials) for
    a launch of `tiles` output tiles asking for `split` splits; no split when the counters
    are too few. The partials come from torch.empty (a graph's pool under capture)."""
    k_per_split = triton.cdiv(triton.cdiv(k, max(split, 1)), block_k) * block_k
    split = triton.cdiv(k, k_per_split)
    counters = locks(device, tiles) if split > 1 else None
    if split > 1 and counters is None:
        split, k_per_split = 1, triton.cdiv(k, block_k) * block_k
    partial = (torch.empty((split, m, n), dtype=torch.float32, device=device)
               if split > 1 else None)
    return split, k_per_split, counters, partial


@triton.jit
def store_tile(
    acc,  # [BLOCK_M, BLOCK_N] fp32
    out_ptr,  # [M, N]
    partial_ptr,  # [SPLIT_K, M, N] fp32
    lock_ptr,  # this tile's counter
    tile,  # [BLOCK_M, BLOCK_N] int64 offsets into [M, N]
    mask,  # [BLOCK_M, BLOCK_N]
    pid_k,
    M,
    N,
    SPLIT_K,  # splits of this launch (a runtime value: one compiled kernel for any split)
    HAS_SPLIT: tl.constexpr,  # SPLIT_K > 1
):
    """Writes a tile's result: directly without split-K, else through the partials."""
    if not HAS_SPLIT:
        tl.store(out_ptr + tile, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(partial_ptr + pid_k.to(tl.int64) * M * N + tile, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is stored before the release below
        arrived = tl.atomic_add(lock_ptr, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros(acc.shape, dtype=tl.float32)
            for split in range(SPLIT_K):
                total += tl.load(partial_ptr + split * M * N + tile, mask=mask, other=0.0,
                                 cache_modifier=".cg")
            tl.store(out_ptr + tile, total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(lock_ptr, 0)


@triton.jit
def stack_rows(r0, r1, r2, r3, offs_m, BLOCK_M: tl.constexpr):
    """[BLOCK_M, BLOCK_N] from up to four [BLOCK_N] rows (BLOCK_M of them used)."""
    res = tl.where(offs_m[:, None] == 0, r0[None, :], 0.0)
    res += tl.where(offs_m[:, None] == 1, r1[None, :], 0.0)
    if BLOCK_M > 2:
        res += tl.where(offs_m[:, None] == 2, r2[None, :], 0.0)
        res += tl.where(offs_m[:, None] == 3, r3[None, :], 0.0)
    return res
