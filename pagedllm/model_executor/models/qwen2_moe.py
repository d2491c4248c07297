"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2 attention, sparse blocks of
`moe_intermediate_size` experts (renormalised by `norm_topk_prob`) plus a shared expert whose
output is scaled by sigmoid(shared_expert_gate(x)); layers in `mlp_only_layers` or off the
`decoder_sparse_step` keep a dense MLP."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagedllm.model_executor.layers.linear import LinearMethod, ReplicatedLinear
from pagedllm.model_executor.models.llama import LlamaForCausalLM, LlamaMLP
from pagedllm.model_executor.models.mixtral import MoEBlock, MoECausalLMMixin
from pagedllm.model_executor.models.qwen2 import Qwen2Attention


def is_sparse_layer(config: Any, layer_idx: int) -> bool:
    """HF's rule for which Qwen MoE layers hold experts."""
    step = int(getattr(config, "decoder_sparse_step", 1) or 1)
    return (
        layer_idx not in (getattr(config, "mlp_only_layers", None) or [])
        and int(getattr(config, "num_experts", 0) or 0) > 0
        and (layer_idx + 1) % step == 0
    )


class Qwen2MoeSparseBlock(MoEBlock):
    def __init__(
        self, config: Any, dtype: torch.dtype, linear_method: LinearMethod | None
    ) -> None:
        super().__init__(
            config.hidden_size, int(config.num_experts), int(config.num_experts_per_tok),
            int(config.moe_intermediate_size), bool(config.norm_topk_prob), dtype,
        )  # fmt: skip
        self.shared_expert = LlamaMLP(
            config.hidden_size, int(config.shared_expert_intermediate_size), dtype, linear_method
        )
        self.shared_expert_gate = ReplicatedLinear(config.hidden_size, 1, params_dtype=dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shared = torch.sigmoid(self.shared_expert_gate(hidden)) * self.shared_expert(hidden)
        return self.experts(hidden, self.gate(hidden)) + shared


class QwenMoeForCausalLMBase(MoECausalLMMixin, LlamaForCausalLM):
    expert_tensor_kinds = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


class Qwen2MoeForCausalLM(QwenMoeForCausalLMBase):
    attention_cls = Qwen2Attention

    def make_moe_block(
        self, config: Any, layer_idx: int, dtype: torch.dtype, linear_method: LinearMethod | None
    ) -> nn.Module | None:
        if not is_sparse_layer(config, layer_idx):
            return None
        return Qwen2MoeSparseBlock(config, dtype, linear_method)
