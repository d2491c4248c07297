"""Gemma 3 text: Gemma 2's layer (pre/post norms around attention and MLP) with QK-norm, local
(sliding) and global layers in the config's `layer_types` (5:1 in the released models), a RoPE
base and scaling per layer type, and no soft-capping unless the config sets it.

`Gemma3ForConditionalGeneration` checkpoints (the multimodal releases) are served as their
language model: the resolver hands the model the `text_config` (see
`ModelRegistry.served_config`) and the loader maps `model.language_model.*` (or the older
`language_model.model.*`) names onto the text model and skips the vision tower and projector.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from pagedllm.attention.backend import AttentionBackend
from pagedllm.model_executor.layers.linear import LinearMethod
from pagedllm.model_executor.layers.rotary_embedding import get_rope
from pagedllm.model_executor.models.gemma import GemmaForCausalLM, GemmaRMSNorm
from pagedllm.model_executor.models.gemma2 import Gemma2Attention, Gemma2DecoderLayer

_DEFAULT_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}


def gemma3_rope_params(config: Any, layer_type: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) of one layer type. transformers 5 nests them under
    rope_parameters[layer_type]; older configs give the global layers rope_theta and
    rope_scaling and the local ones rope_local_base_freq, unscaled."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and isinstance(params.get(layer_type), dict):
        scaling = dict(params[layer_type])
        theta = scaling.pop("rope_theta", _DEFAULT_THETA[layer_type])
        return float(theta), scaling
    if layer_type == "sliding_attention":
        return float(getattr(config, "rope_local_base_freq", None) or 10_000.0), None
    theta = getattr(config, "rope_theta", None) or _DEFAULT_THETA[layer_type]
    return float(theta), getattr(config, "rope_scaling", None)


class Gemma3Attention(Gemma2Attention):
    """Gemma 2's attention with per-head (1 + w) RMSNorm on q and k before RoPE, and the RoPE
    of its layer type."""

    def __init__(
        self,
        config: Any,
        layer_idx: int,
        attn_backend: AttentionBackend,
        dtype: torch.dtype,
        linear_method: LinearMethod | None,
    ) -> None:
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("Gemma 3 with use_bidirectional_attention (an embedding model) "
                             "is not supported")
        super().__init__(config, layer_idx, attn_backend, dtype, linear_method)

    def make_rope(self, config: Any, layer_idx: int) -> nn.Module:
        layer_types = getattr(config, "layer_types", None)
        layer_type = layer_types[layer_idx] if layer_types else "full_attention"
        theta, scaling = gemma3_rope_params(config, layer_type)
        return get_rope(
            self.head_dim, self.head_dim, int(config.max_position_embeddings), theta, scaling
        )

    def make_qk_norm(self, config: Any, dtype: torch.dtype) -> nn.Module:
        return GemmaRMSNorm(self.head_dim, float(config.rms_norm_eps))


class Gemma3DecoderLayer(Gemma2DecoderLayer):
    pass


class Gemma3ForCausalLM(GemmaForCausalLM):
    attention_cls = Gemma3Attention
    decoder_layer_cls = Gemma3DecoderLayer


# Checkpoint prefixes of the multimodal wrapper: (theirs, ours); None drops the tensor.
_WRAPPER_PREFIXES: tuple[tuple[str, str | None], ...] = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.vision_tower.", None),
    ("vision_tower.", None),
    ("model.multi_modal_projector.", None),
    ("multi_modal_projector.", None),
)


class Gemma3ForConditionalGeneration(Gemma3ForCausalLM):
    """The language model of a multimodal Gemma 3 checkpoint (images are not supported)."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        def text_only() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                for theirs, ours in _WRAPPER_PREFIXES:
                    if name.startswith(theirs):
                        name = None if ours is None else ours + name[len(theirs):]
                        break
                if name is not None:
                    yield name, tensor

        return super().load_weights(text_only())
