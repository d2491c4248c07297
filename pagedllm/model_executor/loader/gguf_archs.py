"""Per-architecture GGUF knowledge: which transformers config and HF architecture a llama.cpp
`general.architecture` becomes, the config keys beyond the common ones, tensor names that mean
something else than in Llama, and what llama.cpp's converter did to the weights.

What the converter changes and these specs undo: Gemma norms are stored as 1 + w
(`norm_shift`); MoE experts are stacked into one [num_experts, ...] tensor per projection
(split back by the loader); Phi-3's LongRoPE factors are tensors (read into the config).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pagedllm.model_executor.loader.errors import ModelLoadError

Getter = Callable[..., Any]  # get(key, default) reads "{arch}.{key}"


@dataclass(frozen=True)
class GGUFArch:
    config_cls: str  # transformers config class name
    hf_arch: str  # HF architecture name
    permuted_qk: bool = False  # llama.cpp reordered Q/K rows (llama-architecture files)
    block_names: dict[str, str] = field(default_factory=dict)  # overrides of the Llama names
    norm_shift: float = 0.0  # subtracted from every norm weight
    # HF names of one expert's (gate, up, down) matrices, for stacked ffn_*_exps tensors
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    configure: Callable[[Getter, dict[str, Any], set[str]], None] | None = None


def _query_pre_attn_scalar(get: Getter, kwargs: dict[str, Any], big_layers: int) -> None:
    # llama.cpp scales by hidden / heads for the 27B models (told apart by layer count) and by
    # 1 / sqrt(head_dim) otherwise; the HF configs say the same through query_pre_attn_scalar.
    if kwargs["num_hidden_layers"] == big_layers:
        kwargs["query_pre_attn_scalar"] = kwargs["hidden_size"] // kwargs["num_attention_heads"]
    else:
        kwargs["query_pre_attn_scalar"] = kwargs["head_dim"]


def _swa_layer_types(num_layers: int, pattern: int) -> list[str]:
    """llama.cpp's set_swa_pattern(n): layer i slides unless i % n == n - 1."""
    return ["sliding_attention" if i % pattern < pattern - 1 else "full_attention"
            for i in range(num_layers)]  # fmt: skip


def _configure_gemma2(get: Getter, kwargs: dict[str, Any], tensors: set[str]) -> None:
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if get(key) is not None:
            kwargs[key] = float(get(key))
    _query_pre_attn_scalar(get, kwargs, big_layers=46)
    kwargs["layer_types"] = _swa_layer_types(kwargs["num_hidden_layers"], 2)


def _configure_gemma3(get: Getter, kwargs: dict[str, Any], tensors: set[str]) -> None:
    _query_pre_attn_scalar(get, kwargs, big_layers=62)
    pattern = int(get("attention.sliding_window_pattern", 6) or 6)
    kwargs["layer_types"] = _swa_layer_types(kwargs["num_hidden_layers"], pattern)
    full = dict(kwargs.pop("rope_parameters"))
    kwargs.pop("rope_theta", None)
    local = {"rope_type": "default", "rope_theta": float(get("rope.freq_base_swa", 10000.0))}
    kwargs["rope_parameters"] = {"full_attention": full, "sliding_attention": local}


def _configure_moe(get: Getter, kwargs: dict[str, Any], shared: bool, norm: bool) -> None:
    kwargs["num_experts"] = int(get("expert_count"))
    kwargs["num_experts_per_tok"] = int(get("expert_used_count"))
    kwargs["moe_intermediate_size"] = int(get("expert_feed_forward_length"))
    kwargs["norm_topk_prob"] = bool(get("expert_weights_norm", norm))
    if shared:
        kwargs["shared_expert_intermediate_size"] = int(
            get("expert_shared_feed_forward_length"))


def _configure_qwen2moe(get: Getter, kwargs: dict[str, Any], tensors: set[str]) -> None:
    _configure_moe(get, kwargs, shared=True, norm=False)
    kwargs["attention_bias"] = "blk.0.attn_q.bias" in tensors


def _configure_qwen3moe(get: Getter, kwargs: dict[str, Any], tensors: set[str]) -> None:
    _configure_moe(get, kwargs, shared=False, norm=True)


def _configure_mixtral(get: Getter, kwargs: dict[str, Any], tensors: set[str]) -> None:
    kwargs["num_local_experts"] = int(get("expert_count"))
    kwargs["num_experts_per_tok"] = int(get("expert_used_count"))


_GEMMA2_NAMES = {"ffn_norm": "pre_feedforward_layernorm",
                 "post_attention_norm": "post_attention_layernorm",
                 "post_ffw_norm": "post_feedforward_layernorm"}  # fmt: skip

GGUF_ARCHS: dict[str, GGUFArch] = {
    "llama": GGUFArch("LlamaConfig", "LlamaForCausalLM", permuted_qk=True),
    "mistral": GGUFArch("MistralConfig", "MistralForCausalLM", permuted_qk=True),
    "qwen2": GGUFArch("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": GGUFArch("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma": GGUFArch("GemmaConfig", "GemmaForCausalLM", norm_shift=1.0),
    "gemma2": GGUFArch("Gemma2Config", "Gemma2ForCausalLM", block_names=_GEMMA2_NAMES,
                       norm_shift=1.0, configure=_configure_gemma2),
    "gemma3": GGUFArch("Gemma3TextConfig", "Gemma3ForCausalLM", block_names=_GEMMA2_NAMES,
                       norm_shift=1.0, configure=_configure_gemma3),
    "phi3": GGUFArch("Phi3Config", "Phi3ForCausalLM", block_names={"ffn_up": "mlp.gate_up_proj"}),
    "qwen2moe": GGUFArch("Qwen2MoeConfig", "Qwen2MoeForCausalLM", configure=_configure_qwen2moe),
    "qwen3moe": GGUFArch("Qwen3MoeConfig", "Qwen3MoeForCausalLM", configure=_configure_qwen3moe),
}  # fmt: skip
# Mixtral files say "llama" and carry experts.
MIXTRAL = GGUFArch("MixtralConfig", "MixtralForCausalLM", permuted_qk=True,
                   expert_names=("w1", "w3", "w2"), configure=_configure_mixtral)  # fmt: skip


def gguf_arch_spec(arch: str, get: Getter) -> GGUFArch:
    if arch == "llama" and get("expert_count"):
        return MIXTRAL
    if arch not in GGUF_ARCHS:
        raise ModelLoadError(
            f"GGUF architecture {arch!r} is not supported; supported: {sorted(GGUF_ARCHS)}"
        )
    return GGUF_ARCHS[arch]
