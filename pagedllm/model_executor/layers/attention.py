"""Attention layer: reshapes flat q/k/v into heads and calls the paged attention backend."""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.attention.backend import AttentionBackend, AttentionMetadata


class Attention(nn.Module):
    """Per-layer attention over a paged KV cache; holds no weights."""

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        backend: AttentionBackend | None = None,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
    ) -> None:
        super().__init__()
        if backend is None:
            raise ValueError("Attention needs an AttentionBackend")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = scale
        self.num_kv_heads = num_kv_heads or num_heads
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_heads {num_heads} not a multiple of num_kv_heads "
                             f"{self.num_kv_heads}")
        self.backend = backend
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap or None
        # fp8 KV cache scales (cache holds k / k_scale, v / v_scale): 1.0 unless the
        # checkpoint carries k_scale / v_scale (set by the loader, see loader/kv_scales.py).
        self.k_scale = 1.0
        self.v_scale = 1.0
        # KV cache group of this layer (set by the model runner; see core/kv_cache_groups.py).
        self.kv_cache_group = 0

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads * head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads * head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads * head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, num_heads * head_dim]
        num_tokens = q.shape[0]
        if attn_metadata.group_metadata is not None:
            attn_metadata = attn_metadata.group_metadata[self.kv_cache_group]
        # Passed only when set, so backends written before soft-capping keep working.
        extra = {"logits_soft_cap": self.logits_soft_cap} if self.logits_soft_cap else {}
        out = self.backend.forward(
            q.view(num_tokens, self.num_heads, self.head_size),
            k.view(num_tokens, self.num_kv_heads, self.head_size),
            v.view(num_tokens, self.num_kv_heads, self.head_size),
            kv_cache,
            attn_metadata,
            self.scale,
            self.sliding_window,
            **extra,
            k_scale=self.k_scale,
            v_scale=self.v_scale,
        )
        return out.reshape(num_tokens, self.num_heads * self.head_size)
