"""Qwen3: the Llama decoder with per-head RMSNorm on q and k before RoPE, no QKV bias."""

from __future__ import annotations

from typing import Any

import torch

from pagedllm.attention.backend import AttentionBackend
from pagedllm.model_executor.layers.layernorm import RMSNorm
from pagedllm.model_executor.layers.linear import LinearMethod
from pagedllm.model_executor.models.llama import LlamaAttention, LlamaForCausalLM


class Qwen3Attention(LlamaAttention):

    def __init__(
        self,
        config: Any,
        layer_idx: int,
        attn_backend: AttentionBackend,
        dtype: torch.dtype,
        linear_method: LinearMethod | None,
    ) -> None:
        super().__init__(config, layer_idx, attn_backend, dtype, linear_method)
        eps = float(config.rms_norm_eps)
        self.q_norm = RMSNorm(self.head_dim, eps, params_dtype=dtype)
        self.k_norm = RMSNorm(self.head_dim, eps, params_dtype=dtype)

    def _apply_qk(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        num_tokens = q.shape[0]
        # [num_tokens, num_heads, head_dim] normalised per head
        q = self.q_norm(q.reshape(num_tokens, self.num_heads, self.head_dim))
        k = self.k_norm(k.reshape(num_tokens, self.num_kv_heads, self.head_dim))
        return self.rotary_emb(
            positions, q.reshape(num_tokens, -1), k.reshape(num_tokens, -1)
        )


class Qwen3ForCausalLM(LlamaForCausalLM):
    attention_cls = Qwen3Attention
