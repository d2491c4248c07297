"""Paged attention over the KV cache for a mixed batch: the entry point and the torch reference.

Semantics (same as `AttentionMetadata`): request i owns query rows
query_start_loc[i]:query_start_loc[i+1]; they are positions seq_lens[i] - query_len_i ..
seq_lens[i] - 1, and attend to the request's cached keys 0..position (causal), read through
block_table[i]. The current step's K/V must already be in the cache (see reshape_and_cache).

Two Triton paths, one module each:
- `unified_attention` (`unified_attention.py`): one launch for any mix of prefill chunks,
  prefix hits and decodes.
- `split_kv_decode_attention` (`split_kv_decode.py`, flash-decoding): decode-only batches with
  few (request, KV head) pairs and long contexts, or one context far longer than the rest;
  `choose_num_splits` decides, a `SplitKVWorkspace` holds its partials.
Both walk the keys with the online softmax of `attention_common.py` (fp32, base 2; Gemma 2's
logit soft-capping and fp8 (e4m3) caches are compile-time specialisations, so models without
them run the kernels they always did).
"""

from __future__ import annotations

import torch
import triton

from pagedllm.attention.fp8_kv import dequantize_kv
from pagedllm.attention.ops.attention_common import AttentionLaunchConfig
from pagedllm.attention.ops.split_kv_decode import (
    IMBALANCE_SPLITS,
    SplitKVWorkspace,
    choose_num_splits,
    max_num_splits,
    split_kv_decode_attention,
)
from pagedllm.attention.ops.unified_attention import unified_attention

__all__ = [
    "IMBALANCE_SPLITS",
    "AttentionLaunchConfig",
    "SplitKVWorkspace",
    "choose_num_splits",
    "max_num_splits",
    "paged_attention",
    "paged_attention_ref",
    "split_kv_decode_attention",
    "unified_attention",
]


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int32
    seq_lens: torch.Tensor,  # [num_reqs] int32
    block_table: torch.Tensor,  # [num_reqs, max_blocks] int32
    num_reqs: int,
    max_query_len: int,
    scale: float,
    sliding_window: int | None = None,
    causal: bool = True,
    num_splits: int = 1,
    out: torch.Tensor | None = None,
    config: AttentionLaunchConfig | None = None,
    logits_soft_cap: float | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    workspace: SplitKVWorkspace | None = None,
) -> torch.Tensor:
    """Attention of every query row against its request's cached keys -> [num_tokens, ...].

    num_splits > 1 selects the split-KV decode path (requires max_query_len == 1 and causal),
    with its partials in `workspace` when given. Rows past query_start_loc[num_reqs]
    (padding) are left unwritten.
    """
    if out is None:
        out = torch.empty_like(query)
    if num_splits > 1:
        assert max_query_len == 1 and causal, "split-KV is for decode-only batches"
        return split_kv_decode_attention(
            out, query, kv_cache, query_start_loc, seq_lens, block_table, num_reqs,
            scale, num_splits, sliding_window, config, logits_soft_cap, k_scale, v_scale,
            workspace,
        )  # fmt: skip
    return unified_attention(
        out, query, kv_cache, query_start_loc, seq_lens, block_table, num_reqs,
        max_query_len, scale, sliding_window, causal, config, logits_soft_cap, k_scale, v_scale,
    )  # fmt: skip


def paged_attention_ref(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    query_start_loc: torch.Tensor,  # [num_reqs + 1]
    seq_lens: torch.Tensor,  # [num_reqs]
    block_table: torch.Tensor,  # [num_reqs, max_blocks]
    scale: float,
    sliding_window: int | None = None,
    causal: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    logits_soft_cap: float | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Pure-torch reference: gathers each request's K/V and runs masked SDPA per request.
    An fp8 cache is dequantized with its scales first.

    Loops on the host (reads the metadata with .tolist()); for tests and benchmarks only.
    Padding rows of the result are zero.
    """
    num_heads = query.shape[1]
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_heads // num_kv_heads
    out = torch.zeros(query.shape, dtype=compute_dtype, device=query.device)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        q_lo, q_hi = starts[i], starts[i + 1]
        q_len = q_hi - q_lo
        if q_len == 0:
            continue
        blocks = block_table[i, : triton.cdiv(seq_len, block_size)].long()
        # [seq_len, num_kv_heads, head_dim] -> [num_heads, seq_len, head_dim]
        k = kv_cache[0, blocks].reshape(-1, num_kv_heads, kv_cache.shape[4])[:seq_len]
        v = kv_cache[1, blocks].reshape(-1, num_kv_heads, kv_cache.shape[4])[:seq_len]
        k = dequantize_kv(k, compute_dtype, k_scale).repeat_interleave(group, dim=1)
        v = dequantize_kv(v, compute_dtype, v_scale).repeat_interleave(group, dim=1)
        k, v = k.transpose(0, 1), v.transpose(0, 1)
        q = query[q_lo:q_hi].to(compute_dtype).transpose(0, 1)  # [num_heads, q_len, head_dim]
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)[:, None]
        k_pos = torch.arange(seq_len, device=query.device)[None, :]
        allowed = torch.ones(q_len, seq_len, dtype=torch.bool, device=query.device)
        if causal:
            allowed &= k_pos <= q_pos
            if sliding_window:
                allowed &= k_pos > q_pos - sliding_window
        scores = (q @ k.transpose(-1, -2)) * scale  # [num_heads, q_len, seq_len]
        if logits_soft_cap:
            scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        out[q_lo:q_hi] = (probs @ v).transpose(0, 1)
    return out
