"""KV cache groups: layers grouped by attention type, one block table per group.

A model whose layers all attend the same way (all full, or all with one window) has ONE group of
every layer: today's layout, one block id = one block in every layer's cache tensor.

A hybrid model (Gemma 2 alternating sliding/global, Gemma 3 5:1 local/global) gets one group per
attention type, each split into groups of `layers_per_block` layers (the smallest type's layer
count), so that every group has the same number of layers. The cache then holds
`layers_per_block` tensors ("slots"), and slot j is shared by layer j of every group: a block id
owned by group g stands for block b of each slot tensor, read and written only by g's layers.
All groups allocate ids from one BlockPool, and a block costs `layers_per_block` layers of KV
whichever group owns it, so the pool splits itself between the groups as requests need.

A sliding group with window W frees, per request, the blocks wholly before position
`num_computed_tokens - W + 1` (no query of this step or later sees them) and puts the null
block (id 0, reserved, never written, zero-filled) in their place, so block-table positions stay
aligned and stale reads return zeros that the window mask discards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# The null block (reserved when a sliding group exists): freed table entries point at it.
NULL_BLOCK_ID = 0


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, slots=True)
class KVCacheGroup:
    """Layers (global indices) that share one block table; `sliding_window` None = full."""

    sliding_window: int | None
    layers: tuple[int, ...]

    def num_dead_blocks(self, num_computed_tokens: int, block_size: int) -> int:
        """Leading blocks no query at or after `num_computed_tokens` can see (0 when full)."""
        return num_dead_blocks(num_computed_tokens, self.sliding_window, block_size)

    def max_blocks(self, num_tokens: int, block_size: int, max_chunk: int) -> int:
        """Most blocks this group holds at once for a request of `num_tokens` tokens of KV,
        computed in chunks of at most `max_chunk` tokens."""
        full = _cdiv(num_tokens, block_size)
        w = self.sliding_window
        if w is None:
            return full
        # A chunk starting at p needs [p - W + 1, p + chunk): W - 1 + chunk tokens, plus one
        # block for misalignment.
        return min(full, _cdiv(w - 1 + min(max_chunk, num_tokens), block_size) + 1)


def num_dead_blocks(num_computed_tokens: int, sliding_window: int | None, block_size: int) -> int:
    """Blocks wholly before `num_computed_tokens - sliding_window + 1`: the first query of the
    next step (position num_computed_tokens) sees keys from there on, later ones even less."""
    if sliding_window is None:
        return 0
    return max(0, (num_computed_tokens - sliding_window + 1) // block_size)


@dataclass(frozen=True, slots=True)
class KVCacheSpec:
    """The groups of one model and how their layers map onto cache tensors."""

    groups: tuple[KVCacheGroup, ...]
    layers_per_block: int  # cache tensors ("slots"); a block id stands for one block of each

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def has_sliding(self) -> bool:
        return any(g.sliding_window is not None for g in self.groups)

    @property
    def num_reserved_blocks(self) -> int:
        """Block ids the pool never hands out (the null block, with sliding groups)."""
        return 1 if self.has_sliding else 0

    def layer_placement(self) -> dict[int, tuple[int, int]]:
        """Global layer index -> (group index, slot index)."""
        return {layer: (g, slot) for g, group in enumerate(self.groups)
                for slot, layer in enumerate(group.layers)}

    def max_blocks(self, num_tokens: int, block_size: int, max_chunk: int) -> int:
        """Most block ids a request of `num_tokens` tokens of KV holds at once, all groups."""
        return sum(g.max_blocks(num_tokens, block_size, max_chunk) for g in self.groups)


def build_kv_cache_spec(
    windows: Sequence[int | None], max_model_len: int | None = None, hybrid: bool = True
) -> KVCacheSpec:
    """Groups for layers with these windows (None = full attention).

    A window of at least `max_model_len` frees nothing and counts as full. `hybrid=False`
    (--disable-hybrid-kv-cache-manager) keeps one group of every layer: windows are then only
    masked, no block is freed.
    """
    if not windows:
        raise ValueError("a model needs at least one attention layer for a KV cache")
    eff = [None if (w is None or (max_model_len is not None and w >= max_model_len)) else int(w)
           for w in windows]
    if not hybrid:
        return KVCacheSpec((KVCacheGroup(None, tuple(range(len(eff)))),), len(eff))
    kinds = sorted(set(eff), key=lambda w: (w is not None, w or 0))  # full first
    by_kind = {k: [i for i, w in enumerate(eff) if w == k] for k in kinds}
    per_block = min(len(v) for v in by_kind.values())
    groups = []
    for k in kinds:
        layers = by_kind[k]
        for start in range(0, len(layers), per_block):
            groups.append(KVCacheGroup(k, tuple(layers[start : start + per_block])))
    return KVCacheSpec(tuple(groups), per_block)


def layer_windows(hf_config: Any) -> list[int | None]:
    """Each decoder layer's attention window as the models build it (None = full)."""
    from pagedllm.model_executor.models.llama import get_sliding_window

    n = int(getattr(hf_config, "num_hidden_layers", 0) or 0)
    return [get_sliding_window(hf_config, i) for i in range(n)]


def kv_cache_spec_for(model_config: Any, cache_config: Any) -> KVCacheSpec:
    """The engine's spec: from the model's config (generation models; others: one group)."""
    hybrid = not getattr(cache_config, "disable_hybrid_kv_cache_manager", False)
    windows: list[int | None] = []
    if model_config.task == "generate":
        windows = layer_windows(model_config.hf_config)
    if not windows:
        windows = [None]
        hybrid = False
    return build_kv_cache_spec(windows, model_config.max_model_len, hybrid)
