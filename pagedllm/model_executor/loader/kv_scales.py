"""fp8 KV-cache scales from a checkpoint: taken out of the tensor stream and set on the
model's Attention layers (models never see them).

Names as checkpoints carry them, for the attention module `P` (e.g. `model.layers.0.self_attn`):
`P.k_scale` / `P.v_scale` (compressed-tensors, vLLM), `P.attn.k_scale` / `P.attn.v_scale`,
`P.k_proj.output_scale` / `P.v_proj.output_scale` (AutoFP8), `P.kv_scale` (one for both).
`P.q_scale` and `P.prob_scale` (attention-input scales for fp8 attention math) are read
past: pagedllm computes attention in 16/32 bits.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from pagedllm.model_executor.layers.attention import Attention
from pagedllm.model_executor.loader.errors import ModelLoadError

logger = logging.getLogger(__name__)

# Checkpoint suffix (after the attention module's parent name) -> which scales it sets.
_SUFFIXES: dict[str, tuple[str, ...]] = {
    "k_scale": ("k_scale",), "v_scale": ("v_scale",),
    "attn.k_scale": ("k_scale",), "attn.v_scale": ("v_scale",),
    "k_proj.output_scale": ("k_scale",), "v_proj.output_scale": ("v_scale",),
    "kv_scale": ("k_scale", "v_scale"), "attn.kv_scale": ("k_scale", "v_scale"),
    "q_scale": (), "prob_scale": (), "attn.q_scale": (), "attn.prob_scale": (),
}


class KVScaleCollector:
    """Filters a weight stream, keeping the KV scale tensors of `model`'s Attention layers."""

    def __init__(self, model: nn.Module) -> None:
        self._targets: dict[str, tuple[Attention, tuple[str, ...]]] = {}
        for name, module in model.named_modules():
            if isinstance(module, Attention):
                parent = name.rpartition(".")[0]
                for suffix, which in _SUFFIXES.items():
                    self._targets[f"{parent}.{suffix}"] = (module, which)
        self.found: dict[str, float] = {}

    def filter(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            target = self._targets.get(name) or self._targets.get("model." + name)
            if target is None:
                yield name, tensor
                continue
            module, which = target
            if which and tensor.numel() != 1:
                raise ModelLoadError(
                    f"checkpoint tensor {name} holds {tensor.numel()} KV-cache scales; "
                    "pagedllm supports one per layer (per-tensor fp8 KV scales)"
                )
            for attr in which:
                value = float(tensor.float().reshape(()))
                if not value > 0.0 or value == float("inf"):
                    raise ModelLoadError(f"checkpoint tensor {name} is not a positive scale "
                                         f"({value})")
                setattr(module, attr, value)
                self.found[name] = value

    def log(self, num_layers: int) -> None:
        if self.found:
            logger.info("fp8 KV-cache scales from the checkpoint: %d tensors for %d layers",
                        len(self.found), num_layers)
