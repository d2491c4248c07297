"""Llama family (Llama 2/3/3.1, SmolLM2, Mistral): the base decoder other families extend.

Qwen2 and Qwen3 reuse these classes and change only their attention block; see qwen2.py
and qwen3.py. Hooks for subclasses are the class attributes `attention_cls`,
`decoder_layer_cls`, `model_cls` and `tie_word_embeddings_default` (on the causal LM),
`qkv_bias_default`, `make_rope`, `make_attention` and `make_qk_norm` (on the attention) and
`LlamaModel.make_norm` / `embed` (Gemma).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from pagedllm.attention.backend import AttentionBackend, AttentionMetadata
from pagedllm.distributed.parallel_state import (
    get_pp_group,
    get_pp_layer_range,
    get_tensor_model_parallel_world_size,
)
from pagedllm.model_executor.layers.activation import SiluAndMul
from pagedllm.model_executor.layers.attention import Attention
from pagedllm.model_executor.layers.layernorm import RMSNorm
from pagedllm.model_executor.layers.linear import (
    LinearMethod,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from pagedllm.model_executor.layers.rotary_embedding import get_rope, rope_params_from_config
from pagedllm.model_executor.layers.utils import WeightLoadTracker
from pagedllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
    compute_logits,
)
from pagedllm.model_executor.models import cpu_fast_path
from pagedllm.model_executor.models.pp_utils import (
    IntermediateTensors,
    PPMissingLayer,
    empty_intermediate_tensors,
    layer_index,
)

logger = logging.getLogger(__name__)


def get_head_dim(config: Any) -> int:
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else config.hidden_size // config.num_attention_heads


def get_sliding_window(config: Any, layer_idx: int) -> int | None:
    """The layer's attention window in tokens, or None for full attention."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return int(window) if layer_types[layer_idx] == "sliding_attention" else None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


class LlamaMLP(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        dtype: torch.dtype,
        linear_method: LinearMethod | None,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size] * 2, bias=bias, params_dtype=dtype,
            linear_method=linear_method,
        )
        self.down_proj = RowParallelLinear(
            intermediate_size, hidden_size, bias=bias, params_dtype=dtype,
            linear_method=linear_method,
        )
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaAttention(nn.Module):
    """QKV projection, RoPE, paged attention, output projection."""

    qkv_bias_default: bool = False
    # Llama's `attention_bias` covers o_proj too; Qwen's q/k/v-only bias does not.
    o_bias_follows_config: bool = True

    def __init__(
        self,
        config: Any,
        layer_idx: int,
        attn_backend: AttentionBackend,
        dtype: torch.dtype,
        linear_method: LinearMethod | None,
    ) -> None:
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        self.hidden_size = config.hidden_size
        self.total_num_heads = config.num_attention_heads
        self.total_num_kv_heads = getattr(config, "num_key_value_heads", None) or (
            self.total_num_heads
        )
        self.head_dim = get_head_dim(config)
        self.num_heads = self.total_num_heads // tp_size
        self.num_kv_heads = max(1, self.total_num_kv_heads // tp_size)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        bias = bool(getattr(config, "attention_bias", False)) or self.qkv_bias_default
        self.qkv_proj = QKVParallelLinear(
            self.hidden_size, self.head_dim, self.total_num_heads, self.total_num_kv_heads,
            bias=bias, params_dtype=dtype, linear_method=linear_method,
        )
        self.o_proj = RowParallelLinear(
            self.total_num_heads * self.head_dim, self.hidden_size,
            bias=bool(getattr(config, "attention_bias", False)) and self.o_bias_follows_config,
            params_dtype=dtype, linear_method=linear_method,
        )
        self.rotary_emb = self.make_rope(config, layer_idx)
        self.attn = self.make_attention(config, layer_idx, attn_backend)
        # Per-head norms of q and k before RoPE (Qwen3, Gemma 3); None without QK-norm.
        self.q_norm = self.make_qk_norm(config, dtype)
        self.k_norm = self.make_qk_norm(config, dtype)

    def make_rope(self, config: Any, layer_idx: int) -> nn.Module:
        """This layer's rotary embedding (Gemma 3: one per layer type)."""
        rope_theta, rope_scaling = rope_params_from_config(config)
        rotary_dim = int(self.head_dim * getattr(config, "partial_rotary_factor", 1.0))
        return get_rope(
            self.head_dim, rotary_dim, int(config.max_position_embeddings), rope_theta,
            rope_scaling,
        )

    def make_attention(self, config: Any, layer_idx: int, attn_backend: AttentionBackend
                       ) -> Attention:  # fmt: skip
        """This layer's paged attention (Gemma 2: its own scale and logit soft-cap)."""
        return Attention(
            self.num_heads, self.head_dim, self.head_dim**-0.5, self.num_kv_heads,
            backend=attn_backend, sliding_window=get_sliding_window(config, layer_idx),
        )

    def make_qk_norm(self, config: Any, dtype: torch.dtype) -> nn.Module | None:
        """A norm over head_dim applied to every head of q (and, a second one, of k) before
        RoPE; None (Llama) for none."""
        return None

    def _apply_qk(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.q_norm is not None:
            num_tokens = q.shape[0]
            # [num_tokens, num_heads, head_dim] normalised per head
            q = self.q_norm(q.reshape(num_tokens, self.num_heads, self.head_dim))
            k = self.k_norm(k.reshape(num_tokens, self.num_kv_heads, self.head_dim))
            q, k = q.reshape(num_tokens, -1), k.reshape(num_tokens, -1)
        return self.rotary_emb(positions, q, k)

    def forward(
        self,
        positions: torch.Tensor,  # [num_tokens]
        hidden: torch.Tensor,  # [num_tokens, hidden_size]
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)  # [num_tokens, q_size + 2 * kv_size]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self._apply_qk(positions, q, k)
        out = self.attn(q, k, v, kv_cache, attn_metadata)  # [num_tokens, q_size]
        return self.o_proj(out)


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        config: Any,
        layer_idx: int,
        attn_backend: AttentionBackend,
        dtype: torch.dtype,
        linear_method: LinearMethod | None,
        attention_cls: type[LlamaAttention] = LlamaAttention,
    ) -> None:
        super().__init__()
        self.self_attn = attention_cls(config, layer_idx, attn_backend, dtype, linear_method)
        self.mlp = LlamaMLP(
            config.hidden_size, config.intermediate_size, dtype, linear_method,
            bias=bool(getattr(config, "mlp_bias", False)),
        )
        eps = float(config.rms_norm_eps)
        self.input_layernorm = RMSNorm(config.hidden_size, eps, params_dtype=dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, params_dtype=dtype)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, residual = self.norm_input(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, attn_metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual

    def norm_input(
        self, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised input, residual stream): the first layer starts the stream."""
        if residual is None:
            return self.input_layernorm(hidden), hidden
        return self.input_layernorm(hidden, residual)


class LlamaModel(nn.Module):
    """The decoder stack of one pipeline stage: the embedding on the first stage, layers
    [start_layer, end_layer), the final norm on the last; the rest are `PPMissingLayer`s."""

    def __init__(
        self,
        config: Any,
        attn_backend: AttentionBackend,
        dtype: torch.dtype,
        linear_method: LinearMethod | None,
        attention_cls: type[LlamaAttention],
        decoder_layer_cls: type[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        layer_cls = decoder_layer_cls or LlamaDecoderLayer
        pp = get_pp_group()
        self.is_first_stage, self.is_last_stage = pp.is_first_rank, pp.is_last_rank
        self.start_layer, self.end_layer = get_pp_layer_range(config.num_hidden_layers)
        self.embed_tokens = (
            VocabParallelEmbedding(config.vocab_size, config.hidden_size, params_dtype=dtype)
            if self.is_first_stage else PPMissingLayer()
        )  # fmt: skip
        self.layers = nn.ModuleList(
            layer_cls(config, i, attn_backend, dtype, linear_method, attention_cls)
            if self.start_layer <= i < self.end_layer else PPMissingLayer()
            for i in range(config.num_hidden_layers)
        )  # fmt: skip
        self.norm = self.make_norm(config, dtype) if self.is_last_stage else PPMissingLayer()

    def make_norm(self, config: Any, dtype: torch.dtype) -> nn.Module:
        """The final norm (a hook: Gemma's stores 1 + w)."""
        return RMSNorm(config.hidden_size, float(config.rms_norm_eps), params_dtype=dtype)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[num_tokens] -> [num_tokens, hidden_size] (a hook: Gemma scales it)."""
        return self.embed_tokens(input_ids)

    def _cpu_plan(self, layers: nn.ModuleList, hidden: torch.Tensor) -> list | None:
        """The CPU fast path's per-layer references (built on the first CPU forward, after
        loading), or None when a layer must take the module path."""
        cached = self.__dict__.get("_cpu_fast_plan")
        if cached is None or cached[0] != hidden.dtype:
            cached = (hidden.dtype, cpu_fast_path.build_plan(list(layers), hidden.dtype))
            self.__dict__["_cpu_fast_plan"] = cached
        return cached[1]

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],  # one per layer of this stage
        attn_metadata: AttentionMetadata,
        intermediate_tensors: IntermediateTensors | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        if self.is_first_stage:
            hidden = self.embed(input_ids)  # [num_tokens, hidden_size]
            residual = None
        else:
            hidden = intermediate_tensors["hidden_states"]
            residual = intermediate_tensors["residual"]
        layers = self.layers[self.start_layer : self.end_layer]
        plan = self._cpu_plan(layers, hidden) if cpu_fast_path.usable(hidden) else None
        if plan is not None:
            # CPU: the same layers without per-module dispatch (models/cpu_fast_path.py)
            for refs, kv_cache in zip(plan, kv_caches, strict=True):
                hidden, residual = cpu_fast_path.layer_forward(
                    refs, positions, hidden, residual, kv_cache, attn_metadata)
        else:
            for layer, kv_cache in zip(layers, kv_caches, strict=True):
                hidden, residual = layer(positions, hidden, residual, kv_cache, attn_metadata)
        if not self.is_last_stage:
            return {"hidden_states": hidden, "residual": residual}
        hidden, _ = self.norm(hidden, residual)
        return hidden


# HF checkpoint names fused into one of our parameters: (ours, theirs, shard id).
_STACKED_PARAMS: list[tuple[str, str, Any]] = [
    (".qkv_proj.", ".q_proj.", "q"),
    (".qkv_proj.", ".k_proj.", "k"),
    (".qkv_proj.", ".v_proj.", "v"),
    (".gate_up_proj.", ".gate_proj.", 0),
    (".gate_up_proj.", ".up_proj.", 1),
]


class LlamaForCausalLM(nn.Module):
    """Causal LM over a paged KV cache; see the module docstring for subclass hooks."""

    attention_cls: type[LlamaAttention] = LlamaAttention
    decoder_layer_cls: type[nn.Module] = LlamaDecoderLayer
    model_cls: type[LlamaModel] = LlamaModel
    tie_word_embeddings_default: bool = False

    def __init__(
        self,
        hf_config: Any,
        attn_backend: AttentionBackend,
        dtype: torch.dtype = torch.float32,
        linear_method: LinearMethod | None = None,
    ) -> None:
        super().__init__()
        self.config = hf_config
        self.dtype = dtype
        self.model = self.model_cls(
            hf_config, attn_backend, dtype, linear_method, self.attention_cls,
            self.decoder_layer_cls,
        )  # fmt: skip
        self.tie_word_embeddings = bool(
            getattr(hf_config, "tie_word_embeddings", self.tie_word_embeddings_default)
        )
        model = self.model
        if not model.is_last_stage:
            self.lm_head = PPMissingLayer()
        elif self.tie_word_embeddings and model.is_first_stage:
            # The same module, so materialisation and loading keep one shared weight.
            self.lm_head = model.embed_tokens
        else:
            self.lm_head = ParallelLMHead(
                hf_config.vocab_size, hf_config.hidden_size, params_dtype=dtype
            )
        attn0 = model.layers[model.start_layer].self_attn
        self.num_layers = model.end_layer - model.start_layer  # KV caches on this stage
        self.num_heads = attn0.num_heads  # per tensor-parallel rank
        self.num_kv_heads = attn0.num_kv_heads
        self.head_dim = attn0.head_dim
        self.hidden_size = int(hf_config.hidden_size)

    def make_empty_intermediate_tensors(
        self, num_tokens: int, device: torch.device
    ) -> IntermediateTensors:
        """Buffers for what the previous pipeline stage sends for `num_tokens` tokens."""
        return empty_intermediate_tensors(num_tokens, self.hidden_size, self.dtype, device)

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens] int64
        positions: torch.Tensor,  # [num_tokens] int64
        kv_caches: list[torch.Tensor],  # one per layer
        attn_metadata: AttentionMetadata,
        intermediate_tensors: IntermediateTensors | None = None,
    ) -> torch.Tensor | IntermediateTensors:  # [num_tokens, hidden_size] on the last stage
        return self.model(input_ids, positions, kv_caches, attn_metadata, intermediate_tensors)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden_size] -> [n, vocab_size] float32."""
        return compute_logits(self.lm_head, hidden)

    def _on_other_stage(self, name: str) -> bool:
        """Whether checkpoint tensor `name` belongs to a module another stage holds."""
        idx = layer_index(name)
        if idx is not None:
            return not self.model.start_layer <= idx < self.model.end_layer
        if name.startswith("model.norm."):
            return not self.model.is_last_stage
        if name.startswith("lm_head."):
            return isinstance(self.lm_head, PPMissingLayer)
        return False

    def weight_needed(self, name: str) -> bool:
        """False for checkpoint tensors only other pipeline stages use (left unread)."""
        if not name.startswith(("model.", "lm_head.")):
            name = "model." + name
        if name == "model.embed_tokens.weight":
            return self.model.is_first_stage or isinstance(self.lm_head, ParallelLMHead)
        return not self._on_other_stage(name)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Loads HF-named tensors; returns the names of the parameters that got loaded.
        Tensors of layers on other pipeline stages are skipped."""
        tracker = WeightLoadTracker(self)
        # A fused parameter counts as loaded once every one of its shards arrived.
        expected_shards: dict[str, set[Any]] = {}
        for ours, _, sid in _STACKED_PARAMS:
            expected_shards.setdefault(ours, set()).add(sid)
        embed = "model.embed_tokens.weight"
        # A last stage without the embedding still needs it as its output matrix when tied
        # (or when the checkpoint has no lm_head.weight).
        separate_head = isinstance(self.lm_head, ParallelLMHead)
        head_from_embed = False
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or "rotary_emb.cos_cached" in name:
                continue
            if self.tie_word_embeddings and name == "lm_head.weight":
                continue
            if not name.startswith(("model.", "lm_head.")):
                name = "model." + name
            if name == embed and separate_head and (
                self.tie_word_embeddings
                or (not self.model.is_first_stage and "lm_head.weight" not in tracker.loaded)
            ):
                tracker.load("lm_head.weight", tensor, source_name=name)
                tracker.loaded.discard("lm_head.weight")
                head_from_embed = True
            if name == embed and not self.model.is_first_stage:
                continue
            if self._on_other_stage(name):
                continue
            target, shard_id, fused = name, None, None
            for ours, theirs, sid in _STACKED_PARAMS:
                if theirs in name:
                    target, shard_id, fused = name.replace(theirs, ours), sid, ours
                    break
            tracker.load(target, tensor, shard_id, expected_shards.get(fused), source_name=name)
        params, loaded = tracker.params, tracker.loaded
        if head_from_embed and "lm_head.weight" not in loaded:
            loaded.add("lm_head.weight")
        if "lm_head.weight" in params and "lm_head.weight" not in loaded and embed in loaded:
            # Checkpoints without an output matrix reuse the input embedding.
            with torch.no_grad():
                params["lm_head.weight"].data.copy_(params[embed].data)
            loaded.add("lm_head.weight")
        return loaded


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: the Llama architecture with an optional sliding window (from the config)."""
