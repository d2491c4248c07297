"""Qwen3: the Llama decoder with per-head RMSNorm on q and k before RoPE, no QKV bias."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagedllm.model_executor.layers.layernorm import RMSNorm
from pagedllm.model_executor.models.llama import LlamaAttention, LlamaForCausalLM


class Qwen3Attention(LlamaAttention):
    def make_qk_norm(self, config: Any, dtype: torch.dtype) -> nn.Module:
        return RMSNorm(self.head_dim, float(config.rms_norm_eps), params_dtype=dtype)


class Qwen3ForCausalLM(LlamaForCausalLM):
    attention_cls = Qwen3Attention
