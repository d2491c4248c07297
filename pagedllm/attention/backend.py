"""Attention backend interface, per-step metadata, and the backend registry.

KV cache layout, one tensor per layer: [2, num_blocks, block_size, num_kv_heads, head_dim]
(index 0 holds keys, 1 values). A token at position p of a request lives in block
block_table[p // block_size] at offset p % block_size; its flat slot is
block_id * block_size + offset (`slot_mapping`).

Tokens of a step are flattened request by request: request i owns query rows
query_start_loc[i]:query_start_loc[i+1], which are its positions
seq_lens[i] - query_len_i .. seq_lens[i] - 1. Everything before that is already in the cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionMetadata:
    num_reqs: int
    num_actual_tokens: int  # rows past this (padding) are ignored
    slot_mapping: torch.Tensor  # [num_tokens] int64, -1 = do not write
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32
    seq_lens: torch.Tensor  # [num_reqs] int32: context length after this step
    block_table: torch.Tensor  # [num_reqs, max_num_blocks_per_req] int32
    max_query_len: int
    max_seq_len: int
    # Host copies, for backends that loop on the CPU.
    query_start_loc_cpu: torch.Tensor | None = None
    seq_lens_cpu: torch.Tensor | None = None
    causal: bool = True
    # Sum of seq_lens when the host knows it (lets a backend spot one long context among
    # short ones), and a split-KV count fixed by the caller (CUDA graph variants).
    total_seq_len: int | None = None
    num_splits: int | None = None
    # Per-step scratch a backend may fill on the first layer and reuse on the others
    # (index tensors, masks). Built fresh with each metadata object.
    backend_cache: dict | None = None
    # Models with several KV cache groups: one metadata per group (its own block table and
    # slot mapping, the rest shared); each attention layer reads its group's entry.
    group_metadata: list[AttentionMetadata] | None = None


class AttentionBackend:
    """Writes this step's K/V into the paged cache, then attends.

    forward(query [num_tokens, num_heads, head_dim], key/value [num_tokens, num_kv_heads,
    head_dim], kv_cache [2, num_blocks, block_size, num_kv_heads, head_dim], metadata)
    -> [num_tokens, num_heads, head_dim]. GQA: num_heads % num_kv_heads == 0.
    `sliding_window`, when set, limits each query to the last `sliding_window` keys
    (itself included). `logits_soft_cap`, when set, maps every score s (after the scale) to
    cap * tanh(s / cap) before masking and softmax (Gemma 2). `k_scale` / `v_scale` are the
    layer's fp8 KV scales: an fp8 (e4m3) kv_cache stores k / k_scale and v / v_scale; other
    caches ignore them.
    """

    name: str = "base"

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> torch.Tensor:
        raise NotImplementedError

    def reserve_workspace(
        self,
        max_num_reqs: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        max_seq_len: int,
        device: torch.device,
    ) -> None:
        """Allocates the scratch this backend's launches need, once, for steps of up to
        `max_num_reqs` requests (per-rank head counts). Called after the model is built and
        before profiling and CUDA graph capture, so the memory is counted and captured graphs
        see stable addresses. Optional: a backend that was not given one allocates per call."""

    def decode_graph_variants(
        self, num_reqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device
    ) -> tuple[int | None, ...]:
        """Split-KV counts to capture a decode graph of `num_reqs` requests with, one graph
        each (None: the backend's own choice at capture time). A backend returning two
        variants (unsplit, split) gets the split one replayed when `decode_num_splits` > 1."""
        return (None,)

    def decode_num_splits(self, num_reqs, num_kv_heads, max_seq_len, total_seq_len, device) -> int:
        """KV splits this backend would use for a decode-only step with these lengths."""
        return 1

    def pick_decode_graph_variant(
        self,
        variants: tuple[int | None, ...],
        num_reqs: int,
        num_kv_heads: int,
        max_seq_len: int,
        total_seq_len: int,
        device: torch.device,
    ) -> int | None:
        """Which captured variant a decode step with these (real) lengths should replay."""
        if len(variants) == 1:
            return variants[0]
        n = self.decode_num_splits(num_reqs, num_kv_heads, max_seq_len, total_seq_len, device)
        return variants[1] if n > 1 else variants[0]


_BACKENDS: dict[str, Callable[[], AttentionBackend]] = {}


def register_backend(name: str):
    def deco(factory):
        _BACKENDS[name] = factory
        return factory

    return deco


def get_attn_backend(name: str) -> AttentionBackend:
    """Returns a backend instance by name: "torch_ref" (CPU) or "triton" (CUDA)."""
    if name not in _BACKENDS:
        # Backends register on import.
        if name == "torch_ref":
            import pagedllm.attention.backends.torch_ref  # noqa: F401
        elif name == "triton":
            import pagedllm.attention.backends.triton  # noqa: F401
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; known: {sorted(_BACKENDS)}")
    return _BACKENDS[name]()


def kv_cache_shape(
    num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
) -> tuple[int, ...]:
    return (2, num_blocks, block_size, num_kv_heads, head_dim)
