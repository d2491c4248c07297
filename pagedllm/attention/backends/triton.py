"""Triton attention backend for CUDA: reshape_and_cache, then one paged-attention launch.

Decode-only batches whose (request, KV head) pairs would leave most SMs idle on long contexts
take the split-KV (flash-decoding) path instead; see `choose_num_splits`. The choice reads only
host-side metadata (num_reqs, max_query_len, max_seq_len), so it never syncs with the device.
"""

from __future__ import annotations

import torch

from pagedllm.attention.backend import AttentionBackend, AttentionMetadata, register_backend
from pagedllm.attention.ops.paged_attention import choose_num_splits, paged_attention
from pagedllm.attention.ops.reshape_and_cache import reshape_and_cache


@register_backend("triton")
class TritonAttentionBackend(AttentionBackend):
    name = "triton"

    def __init__(self, num_sms: int | None = None) -> None:
        # num_sms overrides the device's SM count (tests use it to force the split-KV path).
        self._num_sms = num_sms

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
    ) -> torch.Tensor:
        num_actual = metadata.num_actual_tokens
        reshape_and_cache(key[:num_actual], value[:num_actual], kv_cache, metadata.slot_mapping)
        num_splits = 1
        if metadata.causal:
            num_splits = choose_num_splits(
                metadata.num_reqs,
                kv_cache.shape[3],
                metadata.max_query_len,
                metadata.max_seq_len,
                self._sm_count(query.device),
            )
        out = torch.empty_like(query)
        paged_attention(
            query,
            kv_cache,
            metadata.query_start_loc,
            metadata.seq_lens,
            metadata.block_table,
            num_reqs=metadata.num_reqs,
            max_query_len=metadata.max_query_len,
            max_seq_len=metadata.max_seq_len,
            scale=scale,
            sliding_window=sliding_window,
            causal=metadata.causal,
            num_splits=num_splits,
            out=out,
        )
        if num_actual < out.shape[0]:
            out[num_actual:].zero_()  # padding rows: defined values, like the torch backend
        return out
