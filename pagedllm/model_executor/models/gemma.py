"""Gemma (1): the Llama decoder with Gemma's RMSNorm (scale 1 + w), a gated GELU MLP,
embeddings scaled by sqrt(hidden_size) and a tied LM head.

The pieces here (`GemmaRMSNorm`, `GemmaMLP`, `GemmaModel`, `GemmaForCausalLM`) are what Gemma 2
and Gemma 3 build on; they reuse Llama's attention, weight loading and logits through
subclassing, without changes to llama.py. Hooks: `decoder_layer_cls` and `attention_cls` on
the causal LM, `final_logit_softcapping` read from the config.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagedllm.attention.backend import AttentionBackend
from pagedllm.model_executor.layers.activation import GeluAndMul
from pagedllm.model_executor.layers.layernorm import RMSNorm
from pagedllm.model_executor.layers.linear import LinearMethod
from pagedllm.model_executor.layers.vocab_parallel_embedding import (
    compute_logits,
)
from pagedllm.model_executor.models.llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
)


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: y = x / rms(x) * (1 + w), the checkpoint holding w.

    The parameter stores 1 + w in float32 (added once at load), so the plain RMSNorm paths,
    the Triton kernel included, apply it unchanged; float32 because 1 + w in bf16 would round
    away most of w (its resolution near 1 is 2^-7).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__(hidden_size, eps, params_dtype=torch.float32)

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None
    ) -> None:
        if tuple(param.shape) != tuple(loaded_weight.shape):
            raise ValueError(f"shape mismatch: RMSNorm {tuple(param.shape)} vs checkpoint "
                             f"{tuple(loaded_weight.shape)}")
        param.data.copy_(loaded_weight.float() + 1.0)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # HF Gemma multiplies in float32 and rounds once at the end.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (x32 * self.weight).to(x.dtype)


def gemma_activation_name(config: Any) -> str:
    """The MLP activation: Gemma 2/3 name it `hidden_activation`, Gemma 1 `hidden_act`."""
    return getattr(config, "hidden_activation", None) or getattr(
        config, "hidden_act", "gelu_pytorch_tanh"
    )


class GemmaMLP(LlamaMLP):
    """Llama's gate/up/down MLP with gelu(gate) * up."""

    def __init__(
        self, config: Any, dtype: torch.dtype, linear_method: LinearMethod | None
    ) -> None:
        super().__init__(config.hidden_size, config.intermediate_size, dtype, linear_method)
        self.act_fn = GeluAndMul.from_hf_name(gemma_activation_name(config))


class GemmaDecoderLayer(LlamaDecoderLayer):
    """Llama's pre-norm layer with Gemma's norms and MLP."""

    def __init__(
        self,
        config: Any,
        layer_idx: int,
        attn_backend: AttentionBackend,
        dtype: torch.dtype,
        linear_method: LinearMethod | None,
        attention_cls: type[LlamaAttention] = LlamaAttention,
    ) -> None:
        super().__init__(config, layer_idx, attn_backend, dtype, linear_method, attention_cls)
        # Built on the meta device, so replacing Llama's modules costs nothing.
        self.mlp = GemmaMLP(config, dtype, linear_method)
        eps = float(config.rms_norm_eps)
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps)


class GemmaModel(LlamaModel):
    """Llama's pipeline-stage decoder stack with scaled embeddings and Gemma's final norm."""

    def make_norm(self, config: Any, dtype: torch.dtype) -> nn.Module:
        return GemmaRMSNorm(config.hidden_size, float(config.rms_norm_eps))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        # HF rounds sqrt(hidden_size) to the activation dtype before multiplying.
        return hidden * torch.tensor(self.hidden_size**0.5, dtype=hidden.dtype)

    @property
    def hidden_size(self) -> int:
        return int(self.embed_tokens.embedding_dim)


class GemmaForCausalLM(LlamaForCausalLM):
    """Gemma causal LM; Llama's forward, stages and weight loading, Gemma's model and logits."""

    attention_cls: type[LlamaAttention] = LlamaAttention
    decoder_layer_cls: type[nn.Module] = GemmaDecoderLayer
    model_cls = GemmaModel
    tie_word_embeddings_default = True

    def __init__(
        self,
        hf_config: Any,
        attn_backend: AttentionBackend,
        dtype: torch.dtype = torch.float32,
        linear_method: LinearMethod | None = None,
    ) -> None:
        super().__init__(hf_config, attn_backend, dtype, linear_method)
        self.final_logit_softcapping = getattr(hf_config, "final_logit_softcapping", None)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden_size] -> [n, vocab_size] float32, soft-capped where the config says."""
        logits = compute_logits(self.lm_head, hidden)
        cap = self.final_logit_softcapping
        if cap:
            logits = cap * torch.tanh(logits / cap)
        return logits
