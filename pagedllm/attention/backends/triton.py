"""Triton attention backend for CUDA: reshape_and_cache, then one paged-attention launch.

Decode-only batches whose (request, KV head) pairs would leave most SMs idle on long contexts
take the split-KV (flash-decoding) path instead, and so do decode batches where one context is
far longer than the others; see `choose_num_splits`. The choice reads only host-side metadata
(num_reqs, max_query_len, max_seq_len, total_seq_len), so it never syncs with the device.

CUDA graphs freeze the choice at capture, so mid-sized decode graphs are captured twice (no
split, and `IMBALANCE_SPLITS` splits) and each step replays the one its lengths call for.

The split path's partial outputs live in one `SplitKVWorkspace` reserved at start-up
(`reserve_workspace`) for the most rows any step up to the max batch can ask for, so no step
allocates them and every captured graph reads the same buffers.
"""

from __future__ import annotations

import torch
import triton

from pagedllm.attention.backend import AttentionBackend, AttentionMetadata, register_backend
from pagedllm.attention.ops.paged_attention import (
    IMBALANCE_SPLITS,
    SplitKVWorkspace,
    choose_num_splits,
    max_num_splits,
    paged_attention,
)
from pagedllm.attention.ops.reshape_and_cache import reshape_and_cache

# Decode graphs of up to this many requests that would not split by occupancy also get a
# split variant, replayed when one long context would hold up the unified launch.
IMBALANCE_GRAPH_MAX_REQS = 256


@register_backend("triton")
class TritonAttentionBackend(AttentionBackend):
    name = "triton"

    def __init__(self, num_sms: int | None = None) -> None:
        # num_sms overrides the device's SM count (tests use it to force the split-KV path).
        self._num_sms = num_sms
        self.workspace: SplitKVWorkspace | None = None

    def _sm_count(self, device: torch.device) -> int:
        if self._num_sms is None:
            if device.type == "cuda":
                props = torch.cuda.get_device_properties(device)
                self._num_sms = props.multi_processor_count
            else:
                self._num_sms = 1  # the interpreter gains nothing from splitting
        return self._num_sms

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        metadata: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> torch.Tensor:
        num_actual = metadata.num_actual_tokens
        reshape_and_cache(key[:num_actual], value[:num_actual], kv_cache, metadata.slot_mapping,
                          k_scale, v_scale)
        if metadata.num_splits is None:  # decided on the first layer, kept for the others
            metadata.num_splits = 1
            if metadata.causal:
                metadata.num_splits = choose_num_splits(
                    metadata.num_reqs,
                    kv_cache.shape[3],
                    metadata.max_query_len,
                    metadata.max_seq_len,
                    self._sm_count(query.device),
                    metadata.total_seq_len,
                )
        num_splits = metadata.num_splits
        out = torch.empty_like(query)
        paged_attention(
            query,
            kv_cache,
            metadata.query_start_loc,
            metadata.seq_lens,
            metadata.block_table,
            num_reqs=metadata.num_reqs,
            max_query_len=metadata.max_query_len,
            scale=scale,
            sliding_window=sliding_window,
            causal=metadata.causal,
            num_splits=num_splits,
            out=out,
            logits_soft_cap=logits_soft_cap,
            k_scale=k_scale,
            v_scale=v_scale,
            workspace=self.workspace,
        )
        if num_actual < out.shape[0]:
            out[num_actual:].zero_()  # padding rows: defined values, like the torch backend
        return out

    def reserve_workspace(
        self,
        max_num_reqs: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        max_seq_len: int,
        device: torch.device,
    ) -> None:
        rows = num_heads * self.max_split_reqs(max_num_reqs, num_kv_heads, max_seq_len, device)
        self.workspace = SplitKVWorkspace(rows, triton.next_power_of_2(head_dim), device)

    def max_split_reqs(
        self, max_num_reqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device
    ) -> int:
        """The most (request, split) pairs of any decode step of up to `max_num_reqs`
        requests with contexts up to `max_seq_len`: eager choices and graph variants."""
        sms = self._sm_count(device)
        worst = 0
        for n in range(1, max_num_reqs + 1):
            graphs = self.decode_graph_variants(n, num_kv_heads, max_seq_len, device)
            splits = max(max_num_splits(n, num_kv_heads, max_seq_len, sms), *graphs)
            worst = max(worst, n * splits)
        return worst

    def decode_graph_variants(
        self, num_reqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device
    ) -> tuple[int | None, ...]:
        splits = choose_num_splits(num_reqs, num_kv_heads, 1, max_seq_len, self._sm_count(device))
        if splits == 1 and num_reqs <= IMBALANCE_GRAPH_MAX_REQS:
            return (1, IMBALANCE_SPLITS)
        return (splits,)

    def decode_num_splits(self, num_reqs, num_kv_heads, max_seq_len, total_seq_len, device) -> int:
        sms = self._sm_count(device)
        return choose_num_splits(num_reqs, num_kv_heads, 1, max_seq_len, sms, total_seq_len)
