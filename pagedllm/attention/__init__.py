"""Attention over the paged KV cache: metadata, backend interface and implementations."""

from pagedllm.attention.backend import AttentionBackend, AttentionMetadata, get_attn_backend

__all__ = ["AttentionBackend", "AttentionMetadata", "get_attn_backend"]
