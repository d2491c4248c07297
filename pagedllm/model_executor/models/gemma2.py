"""Gemma 2: Gemma with sliding-window and global layers alternating (from `layer_types`),
attention logit soft-capping, a `query_pre_attn_scalar`-based softmax scale, norms after the
attention and around the MLP, and soft-capped final logits.
"""

from __future__ import annotations

from typing import Any

import torch

from pagedllm.attention.backend import AttentionBackend, AttentionMetadata
from pagedllm.model_executor.layers.attention import Attention
from pagedllm.model_executor.layers.linear import LinearMethod
from pagedllm.model_executor.models.gemma import (
    GemmaDecoderLayer,
    GemmaForCausalLM,
    GemmaRMSNorm,
)
from pagedllm.model_executor.models.llama import LlamaAttention, get_sliding_window


def gemma2_attention_scale(config: Any, head_dim: int) -> float:
    scalar = getattr(config, "query_pre_attn_scalar", None)
    return float(scalar) ** -0.5 if scalar else head_dim**-0.5


class Gemma2Attention(LlamaAttention):
    """Llama's attention with Gemma 2's scale and score soft-capping."""

    def make_attention(
        self, config: Any, layer_idx: int, attn_backend: AttentionBackend
    ) -> Attention:
        return Attention(
            self.num_heads, self.head_dim, gemma2_attention_scale(config, self.head_dim),
            self.num_kv_heads, backend=attn_backend,
            sliding_window=get_sliding_window(config, layer_idx),
            logits_soft_cap=getattr(config, "attn_logit_softcapping", None),
        )  # fmt: skip


class Gemma2DecoderLayer(GemmaDecoderLayer):
    """x + post_attn_norm(attn(input_norm(x))), then h + post_ff_norm(mlp(pre_ff_norm(h)))."""

    def __init__(
        self,
        config: Any,
        layer_idx: int,
        attn_backend: AttentionBackend,
        dtype: torch.dtype,
        linear_method: LinearMethod | None,
        attention_cls: type[LlamaAttention] = Gemma2Attention,
    ) -> None:
        super().__init__(config, layer_idx, attn_backend, dtype, linear_method, attention_cls)
        eps = float(config.rms_norm_eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,  # [num_tokens, hidden_size]
        residual: torch.Tensor | None,  # the stream before this layer's input norm
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, residual = self.norm_input(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, attn_metadata)
        hidden = self.post_attention_layernorm(hidden)
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        hidden = self.post_feedforward_layernorm(self.mlp(hidden))
        return hidden, residual


class Gemma2ForCausalLM(GemmaForCausalLM):
    attention_cls = Gemma2Attention
    decoder_layer_cls = Gemma2DecoderLayer
