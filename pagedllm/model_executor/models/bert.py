"""BERT-family encoders (BERT, MiniLM, RoBERTa/XLM-R): bidirectional attention for embeddings.

The model returns the final hidden state of every token, [num_tokens, hidden_size]; pooling
into one vector per request happens in the worker (`pagedllm.worker.pooling`). Attention runs
through the paged attention backend with `causal=False`, which the model runner sets for any
model whose `is_causal` is False. Token type ids are all zero (single-segment inputs).

Positions come from the runner (0 .. len - 1 for each request, the whole prompt in one step);
RoBERTa shifts them by `padding_idx + 1`, as its checkpoints expect.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.attention.backend import AttentionBackend, AttentionMetadata
from pagedllm.distributed.parallel_state import get_tensor_model_parallel_world_size
from pagedllm.model_executor.layers.attention import Attention
from pagedllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    LinearMethod,
    QKVParallelLinear,
    RowParallelLinear,
)
from pagedllm.model_executor.layers.utils import WeightLoadTracker
from pagedllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

logger = logging.getLogger(__name__)

# HF `hidden_act` -> elementwise activation.
_ACTIVATIONS: dict[str, Any] = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def _layer_norm(hidden_size: int, eps: float, dtype: torch.dtype) -> nn.LayerNorm:
    norm = nn.LayerNorm(hidden_size, eps=eps, dtype=dtype)
    for p in norm.parameters():
        p.requires_grad_(False)
    return norm


def _check_config(config: Any) -> None:
    kind = getattr(config, "position_embedding_type", "absolute") or "absolute"
    if kind != "absolute":
        raise ValueError(
            f"position_embedding_type={kind!r} is not supported; only 'absolute' is"
        )
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise ValueError("BERT configured as a decoder (is_decoder/add_cross_attention) is not "
                         "supported; pagedllm runs BERT models as encoders for embeddings")
    act = getattr(config, "hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"hidden_act={act!r} is not supported; known: {sorted(_ACTIVATIONS)}")


class BertEmbeddings(nn.Module):
    """word + absolute position + token type (0) embeddings, then LayerNorm."""

    def __init__(self, config: Any, dtype: torch.dtype, position_offset: int = 0) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.position_offset = position_offset
        self.word_embeddings = VocabParallelEmbedding(config.vocab_size, hidden, params_dtype=dtype)
        self.position_embeddings = nn.Parameter(
            torch.empty(config.max_position_embeddings, hidden, dtype=dtype), requires_grad=False
        )
        self.token_type_embeddings = nn.Parameter(
            torch.empty(max(1, int(getattr(config, "type_vocab_size", 1) or 1)), hidden,
                        dtype=dtype),
            requires_grad=False,
        )
        self.LayerNorm = _layer_norm(hidden, float(config.layer_norm_eps), dtype)

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
    ) -> torch.Tensor:  # [num_tokens, hidden_size]
        hidden = self.word_embeddings(input_ids)
        hidden = hidden + F.embedding(positions + self.position_offset, self.position_embeddings)
        hidden = hidden + self.token_type_embeddings[0]
        return self.LayerNorm(hidden)


class BertAttention(nn.Module):
    """Fused QKV, bidirectional paged attention, output dense, residual + LayerNorm."""

    def __init__(
        self,
        config: Any,
        attn_backend: AttentionBackend,
        dtype: torch.dtype,
        linear_method: LinearMethod | None,
    ) -> None:
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        hidden = config.hidden_size
        self.total_num_heads = config.num_attention_heads
        self.head_dim = hidden // self.total_num_heads
        self.num_heads = self.total_num_heads // tp_size
        self.num_kv_heads = self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(
            hidden, self.head_dim, self.total_num_heads, self.total_num_heads, bias=True,
            params_dtype=dtype, linear_method=linear_method,
        )
        self.attn = Attention(
            self.num_heads, self.head_dim, self.head_dim**-0.5, self.num_heads,
            backend=attn_backend,
        )
        self.dense = RowParallelLinear(
            hidden, hidden, bias=True, params_dtype=dtype, linear_method=linear_method
        )
        self.LayerNorm = _layer_norm(hidden, float(config.layer_norm_eps), dtype)

    def forward(
        self,
        hidden: torch.Tensor,  # [num_tokens, hidden_size]
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)  # [num_tokens, 3 * q_size]
        q, k, v = qkv.split([self.q_size] * 3, dim=-1)
        out = self.attn(q, k, v, kv_cache, attn_metadata)  # [num_tokens, q_size]
        return self.LayerNorm(self.dense(out) + hidden)


class BertLayer(nn.Module):
    """Post-norm encoder layer: attention block, then MLP with residual + LayerNorm."""

    def __init__(
        self,
        config: Any,
        attn_backend: AttentionBackend,
        dtype: torch.dtype,
        linear_method: LinearMethod | None,
    ) -> None:
        super().__init__()
        hidden, inter = config.hidden_size, config.intermediate_size
        self.attention = BertAttention(config, attn_backend, dtype, linear_method)
        self.intermediate = ColumnParallelLinear(
            hidden, inter, bias=True, params_dtype=dtype, linear_method=linear_method
        )
        self.act = _ACTIVATIONS[getattr(config, "hidden_act", "gelu")]
        self.output = RowParallelLinear(
            inter, hidden, bias=True, params_dtype=dtype, linear_method=linear_method
        )
        self.LayerNorm = _layer_norm(hidden, float(config.layer_norm_eps), dtype)

    def forward(
        self, hidden: torch.Tensor, kv_cache: torch.Tensor, attn_metadata: AttentionMetadata
    ) -> torch.Tensor:
        hidden = self.attention(hidden, kv_cache, attn_metadata)
        mlp = self.output(self.act(self.intermediate(hidden)))
        return self.LayerNorm(mlp + hidden)


# HF name fragment -> (our name fragment, QKV shard id or None). Applied after the prefix strip.
_RENAMES: list[tuple[str, str, Any]] = [
    (".attention.self.query.", ".attention.qkv_proj.", "q"),
    (".attention.self.key.", ".attention.qkv_proj.", "k"),
    (".attention.self.value.", ".attention.qkv_proj.", "v"),
    (".attention.output.dense.", ".attention.dense.", None),
    (".attention.output.LayerNorm.", ".attention.LayerNorm.", None),
    (".intermediate.dense.", ".intermediate.", None),
    (".output.dense.", ".output.", None),
    (".output.LayerNorm.", ".LayerNorm.", None),
]
# Checkpoint tensors an encoder for embeddings does not use (heads, buffers).
_SKIP_PREFIXES = ("pooler.", "cls.", "lm_head.", "classifier.", "qa_outputs.")


class BertModel(nn.Module):
    """BERT encoder returning per-token hidden states; `is_causal = False` for the runner."""

    is_causal: bool = False
    default_pooling_type: str = "CLS"  # when no sentence-transformers config says otherwise
    position_offset_from_padding: bool = False
    weight_prefixes: tuple[str, ...] = ("bert.", "model.")

    def __init__(
        self,
        hf_config: Any,
        attn_backend: AttentionBackend,
        dtype: torch.dtype = torch.float32,
        linear_method: LinearMethod | None = None,
    ) -> None:
        super().__init__()
        _check_config(hf_config)
        self.config = hf_config
        self.dtype = dtype
        offset = self._position_offset(hf_config)
        self.embeddings = BertEmbeddings(hf_config, dtype, position_offset=offset)
        self.layers = nn.ModuleList(
            BertLayer(hf_config, attn_backend, dtype, linear_method)
            for _ in range(hf_config.num_hidden_layers)
        )
        attn0 = self.layers[0].attention
        self.num_layers = int(hf_config.num_hidden_layers)
        self.num_kv_heads = attn0.num_kv_heads  # per tensor-parallel rank
        self.head_dim = attn0.head_dim
        self.hidden_size = int(hf_config.hidden_size)

    @classmethod
    def _position_offset(cls, config: Any) -> int:
        if not cls.position_offset_from_padding:
            return 0
        return int(getattr(config, "pad_token_id", 1) or 0) + 1

    @classmethod
    def max_model_len_cap(cls, config: Any) -> int:
        """The longest prompt the position table covers (the loader caps max_model_len)."""
        return int(config.max_position_embeddings) - cls._position_offset(config)

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens] int64
        positions: torch.Tensor,  # [num_tokens] int64
        kv_caches: list[torch.Tensor],  # one per layer
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, hidden_size]
        hidden = self.embeddings(input_ids, positions)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden = layer(hidden, kv_cache, attn_metadata)
        return hidden

    def _our_name(self, name: str) -> tuple[str | None, Any]:
        """(our parameter name, QKV shard id) for a checkpoint name; None to skip it."""
        for prefix in self.weight_prefixes:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        if name.startswith(_SKIP_PREFIXES) or name.endswith("position_ids"):
            return None, None
        name = name.replace(".gamma", ".weight").replace(".beta", ".bias")
        name = name.replace("encoder.layer.", "layers.")
        if name.startswith("embeddings.") and name.endswith("_embeddings.weight"):
            if not name.startswith("embeddings.word_"):
                name = name[: -len(".weight")]
        for theirs, ours, sid in _RENAMES:
            if theirs in name:
                return name.replace(theirs, ours), sid
        return name, None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Loads HF-named tensors; returns the names of the parameters that got loaded."""
        tracker = WeightLoadTracker(self)
        for hf_name, tensor in weights:
            name, shard_id = self._our_name(hf_name)
            if name is None:
                continue
            tracker.load(name, tensor, shard_id, {"q", "k", "v"}, source_name=hf_name)
        return tracker.loaded


class RobertaModel(BertModel):
    """RoBERTa / XLM-RoBERTa: BERT with positions starting at padding_idx + 1."""

    position_offset_from_padding = True
    weight_prefixes = ("roberta.", "model.")


class XLMRobertaModel(RobertaModel):
    pass
