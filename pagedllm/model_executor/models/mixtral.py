"""Mixtral: the Llama decoder with a sparse MoE block (router + `FusedMoE`) in place of the MLP.

Also the shared MoE plumbing the Qwen MoE families reuse: `MoEBlock` (router + experts),
`MoECausalLMMixin` (puts a block into every sparse layer of a built Llama-style model, and
routes per-expert checkpoint tensors to the fused expert weights before Llama's loader sees
the rest). No changes to llama.py: the blocks replace `layer.mlp` on the meta-device model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from pagedllm.attention.backend import AttentionBackend
from pagedllm.model_executor.layers.fused_moe import FusedMoE
from pagedllm.model_executor.layers.linear import LinearMethod, ReplicatedLinear
from pagedllm.model_executor.layers.utils import WeightLoadTracker
from pagedllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM

# ".experts.<e>.<name>.weight": one expert's HF matrix.
_EXPERT_TENSOR = re.compile(r"\.experts\.(\d+)\.(\w+)\.weight$")


class MoEBlock(nn.Module):
    """Router logits from `gate` (replicated, [hidden] -> [num_experts]), then the experts."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        intermediate_size: int,
        renormalize: bool,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.gate = ReplicatedLinear(hidden_size, num_experts, bias=False, params_dtype=dtype)
        self.experts = FusedMoE(
            num_experts, top_k, hidden_size, intermediate_size, renormalize, params_dtype=dtype
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [num_tokens, hidden_size]
        return self.experts(hidden, self.gate(hidden))


class MoECausalLMMixin:
    """For Llama-style causal LMs whose sparse layers hold a `MoEBlock` as `mlp`.

    Subclasses set `expert_tensor_kinds` (HF expert matrix name -> "gate" | "up" | "down"),
    `checkpoint_renames` (substring replacements on checkpoint names) and implement
    `make_moe_block(config, layer_idx, dtype, linear_method)` (None keeps the dense MLP).
    """

    expert_tensor_kinds: dict[str, str] = {}
    checkpoint_renames: tuple[tuple[str, str], ...] = ()

    def __init__(
        self,
        hf_config: Any,
        attn_backend: AttentionBackend,
        dtype: torch.dtype = torch.float32,
        linear_method: LinearMethod | None = None,
    ) -> None:
        super().__init__(hf_config, attn_backend, dtype, linear_method)  # the dense model
        self.install_moe_blocks(hf_config, dtype, linear_method)

    def make_moe_block(
        self, config: Any, layer_idx: int, dtype: torch.dtype, linear_method: LinearMethod | None
    ) -> nn.Module | None:
        raise NotImplementedError

    def install_moe_blocks(
        self, config: Any, dtype: torch.dtype, linear_method: LinearMethod | None
    ) -> None:
        for i, layer in enumerate(self.model.layers):
            # Layers of other pipeline stages (placeholders) have no MLP to replace.
            if isinstance(layer, LlamaDecoderLayer):
                block = self.make_moe_block(config, i, dtype, linear_method)
                if block is not None:
                    layer.mlp = block

    def _expert_target(self, name: str) -> tuple[str, tuple[int, str]] | None:
        match = _EXPERT_TENSOR.search(name)
        if match is None or match.group(2) not in self.expert_tensor_kinds:
            return None
        kind = self.expert_tensor_kinds[match.group(2)]
        param = "w2_weight" if kind == "down" else "w13_weight"
        target = f"{name[: match.start()]}.experts.{param}"
        if not target.startswith("model."):
            target = "model." + target
        return target, (int(match.group(1)), kind)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        tracker = WeightLoadTracker(self)
        experts: dict[str, FusedMoE] = {
            f"{name}.{p}": m for name, m in self.named_modules() if isinstance(m, FusedMoE)
            for p in ("w13_weight", "w2_weight")
        }

        def dense() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                for old, new in self.checkpoint_renames:
                    name = name.replace(old, new)
                hit = self._expert_target(name)
                if hit is None:
                    yield name, tensor
                    continue
                target, shard = hit
                moe = experts.get(target)
                expected = moe.expected_shards(target) if moe is not None else None
                tracker.load(target, tensor, shard, expected, source_name=name)

        loaded = super().load_weights(dense())
        return loaded | tracker.loaded


class MixtralForCausalLM(MoECausalLMMixin, LlamaForCausalLM):
    """Every layer sparse: `num_local_experts` experts, top `num_experts_per_tok`, weights
    renormalised over the chosen experts."""

    expert_tensor_kinds = {"w1": "gate", "w3": "up", "w2": "down"}
    checkpoint_renames = ((".block_sparse_moe.", ".mlp."),)

    def make_moe_block(
        self, config: Any, layer_idx: int, dtype: torch.dtype, linear_method: LinearMethod | None
    ) -> nn.Module:
        return MoEBlock(
            config.hidden_size, int(config.num_local_experts), int(config.num_experts_per_tok),
            int(config.intermediate_size), True, dtype,
        )  # fmt: skip
