"""Decode of one request that reads its paged KV cache in place (the CPU single-stream path).

A request's blocks are split into runs of consecutive block ids (one run when the block pool
handed them out in order, the usual case for a long single stream). Each run of the cache is a
strided view — [1, num_kv_heads, run_tokens, head_dim] — that PyTorch's fused CPU attention
kernel reads without a copy; the run's first and last blocks are trimmed to the context (and
the sliding window), so no mask is needed. Runs are merged exactly by their log-sum-exp.

GQA takes no repeat of K/V: the single query token's heads are laid out as
[num_kv_heads, group, head_dim], i.e. the group becomes the query length of an unmasked
attention over that KV head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedllm.attention.fp8_kv import is_fp8_kv

_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default


@dataclass(slots=True)
class InplaceDecode:
    """One decode row and the token ranges of its KV it attends to, run by run."""

    row: int  # query row of the step
    # [start, end) flat cache slots (block_id * block_size + offset) of each run
    runs: list[tuple[int, int]]


def plan_inplace_decode(
    row: int, block_ids: list[int], seq_len: int, block_size: int, sliding_window: int | None
) -> InplaceDecode:
    """Runs of consecutive blocks covering context tokens [start, seq_len) of one request."""
    start = max(0, seq_len - sliding_window) if sliding_window is not None else 0
    first_block, last_block = start // block_size, (seq_len - 1) // block_size
    runs: list[tuple[int, int]] = []
    b = first_block
    while b <= last_block:
        e = b + 1
        while e <= last_block and block_ids[e] == block_ids[e - 1] + 1:
            e += 1
        tok0 = start - b * block_size if b == first_block else 0
        tok1 = seq_len - b * block_size if e - 1 == last_block else (e - b) * block_size
        base = block_ids[b] * block_size
        runs.append((base + tok0, base + tok1))
        b = e
    return InplaceDecode(row, runs)


def inplace_decode(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    plan: InplaceDecode,
    scale: float,
) -> torch.Tensor:  # [num_heads, head_dim]
    """Attention of the plan's query row over its KV runs (no soft cap; fp8 values are cast,
    the caller folds the scales)."""
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    num_heads = query.shape[1]
    group = num_heads // num_kv_heads
    q = query[plan.row].reshape(1, num_kv_heads, group, head_dim)
    fp8 = is_fp8_kv(kv_cache)
    # [2, 1, num_slots, num_kv_heads, head_dim]: one leading batch dim for the kernel
    flat = kv_cache.view(2, 1, num_blocks * block_size, num_kv_heads, head_dim)
    outs, lses = [], []
    for start, end in plan.runs:
        kv = flat[:, :, start:end].transpose(2, 3)  # [2, 1, num_kv_heads, run_len, head_dim]
        if fp8 or kv.dtype != q.dtype:
            kv = kv.to(q.dtype)
        o, lse = _flash_cpu(q, kv[0], kv[1], scale=scale)
        outs.append(o)  # [1, num_kv_heads, group, head_dim]
        lses.append(lse)  # [1, num_kv_heads, group] float32
    if len(outs) == 1:
        return outs[0].view(num_heads, head_dim)
    lse = torch.stack(lses)  # [runs, 1, num_kv_heads, group]
    weights = torch.softmax(lse, dim=0).unsqueeze(-1)  # [runs, 1, num_kv_heads, group, 1]
    merged = (torch.stack(outs).float() * weights).sum(dim=0)
    return merged.to(query.dtype).view(num_heads, head_dim)
