"""Qwen3-MoE (Qwen3-30B-A3B, 235B-A22B): Qwen3 attention (QK-norm), sparse blocks of
`moe_intermediate_size` experts, top-k renormalised when `norm_topk_prob`, no shared expert."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagedllm.model_executor.layers.linear import LinearMethod
from pagedllm.model_executor.models.mixtral import MoEBlock
from pagedllm.model_executor.models.qwen2_moe import QwenMoeForCausalLMBase, is_sparse_layer
from pagedllm.model_executor.models.qwen3 import Qwen3Attention


class Qwen3MoeForCausalLM(QwenMoeForCausalLMBase):
    attention_cls = Qwen3Attention

    def make_moe_block(
        self, config: Any, layer_idx: int, dtype: torch.dtype, linear_method: LinearMethod | None
    ) -> nn.Module | None:
        if not is_sparse_layer(config, layer_idx):
            return None
        return MoEBlock(
            config.hidden_size, int(config.num_experts), int(config.num_experts_per_tok),
            int(config.moe_intermediate_size), bool(getattr(config, "norm_topk_prob", True)),
            dtype,
        )  # fmt: skip
