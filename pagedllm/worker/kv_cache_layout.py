"""How the worker's KV cache tensors map onto layers and KV cache groups
(`core/kv_cache_groups.py`): one tensor per layer (one group), or one per slot shared by layer j
of every group; what a block id costs; the per-group attention metadata of a step.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from torch import nn

from pagedllm.attention.backend import AttentionMetadata, kv_cache_shape
from pagedllm.core.kv_cache_groups import KVCacheSpec


class KVCacheLayout:
    """The worker side of a `KVCacheSpec` (the same spec the scheduler builds)."""

    def __init__(self, spec: KVCacheSpec, block_size: int, max_num_tokens: int) -> None:
        self.spec = spec
        self.block_size = block_size
        self.max_num_tokens = max_num_tokens
        # Several groups: each local layer's cache slot (tensor index); None: one per layer.
        self.layer_slots: list[int] | None = None

    @property
    def num_groups(self) -> int:
        return self.spec.num_groups

    @property
    def group_windows(self) -> tuple[int | None, ...]:
        return tuple(g.sliding_window for g in self.spec.groups)

    def place_layers(self, model: nn.Module, max_model_len: int) -> None:
        """Tells each attention layer (of this pipeline stage) its KV cache group and records
        its cache slot; checks that the layers' windows are the ones the groups were built
        from. Nothing to do with one group."""
        if self.num_groups == 1:
            return
        from pagedllm.model_executor.layers.attention import Attention

        layers = [mod for mod in model.modules() if isinstance(mod, Attention)]
        if len(layers) != model.num_layers:
            raise RuntimeError(f"{len(layers)} attention layers, {model.num_layers} KV "
                               "caches: the model's layers cannot be mapped to KV cache groups")
        inner = getattr(model, "model", model)
        first = int(getattr(inner, "start_layer", 0))
        placement = self.spec.layer_placement()
        self.layer_slots = []
        for i, attn in enumerate(layers):
            g, slot = placement[first + i]
            want = self.spec.groups[g].sliding_window
            have = attn.sliding_window
            if have is not None and have >= max_model_len:
                have = None
            if have != want:
                raise RuntimeError(f"layer {first + i}: window {attn.sliding_window}, its KV "
                                   f"cache group was built for {want}")
            attn.kv_cache_group = g
            self.layer_slots.append(slot)

    def bytes_per_block(self, model: nn.Module, cache_dtype: torch.dtype) -> int:
        """A block id stands for one block in every cache tensor: one per layer, or, with
        several KV cache groups, one per slot the groups share."""
        elem = torch.tensor([], dtype=cache_dtype).element_size()
        num_tensors = (model.num_layers if self.layer_slots is None
                       else len(set(self.layer_slots)))
        return 2 * self.block_size * model.num_kv_heads * model.head_dim * elem * num_tensors

    def allocate(self, model: nn.Module, num_blocks: int, cache_dtype: torch.dtype,
                 device: torch.device) -> list[torch.Tensor]:
        """One cache tensor per local layer (aliases where layers share a slot)."""
        shape = kv_cache_shape(num_blocks, self.block_size, model.num_kv_heads, model.head_dim)
        if self.layer_slots is None:
            return [zeroed_cache(shape, cache_dtype, device) for _ in range(model.num_layers)]
        # Layer j of every group shares slot j's tensor (their block ids never overlap).
        slots = {s: zeroed_cache(shape, cache_dtype, device)
                 for s in sorted(set(self.layer_slots))}
        return [slots[s] for s in self.layer_slots]

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks (all groups, null block included) one request of `num_tokens` tokens holds
        at most."""
        chunk = min(self.max_num_tokens, num_tokens) or 1
        spec = self.spec
        return spec.max_blocks(num_tokens, self.block_size, chunk) + spec.num_reserved_blocks

    def max_concurrency(self, num_blocks: int, num_tokens: int) -> float:
        """Requests of `num_tokens` tokens the blocks hold at once (freed blocks counted)."""
        reserved = self.spec.num_reserved_blocks
        return max(0, num_blocks - reserved) / max(1, self.blocks_for(num_tokens) - reserved)

    def with_groups(self, md: AttentionMetadata, extra_slot_mappings: list[torch.Tensor],
                    extra_block_tables: list[torch.Tensor], num_tokens: int, num_reqs: int,
                    ) -> AttentionMetadata:  # fmt: skip
        """Several groups: `md` (group 0) plus one metadata per further group, with that
        group's block table and slot mapping (views of the step buffers)."""
        if self.num_groups == 1:
            return md
        md.group_metadata = [md] + [
            dataclasses.replace(md, slot_mapping=sm[:num_tokens], block_table=bt[:num_reqs])
            for sm, bt in zip(extra_slot_mappings, extra_block_tables)
        ]
        return md


def zeroed_cache(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled KV cache tensor.

    Zeros, not `empty`: attention may read slots a request never wrote (the rest of its last
    block, or padding blocks of a batched gather) and masks them only after multiplying, and
    0 x NaN is NaN. Reused host memory can hold NaN or -inf bit patterns (a freed attention
    mask, say), which once turned a greedy completion into "\n" plus skipped special tokens.
    Stale but finite values from an earlier request are harmless. On the CPU the zeros come
    from calloc (fresh pages), so memory is still only touched when a block is first written.
    """
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)
