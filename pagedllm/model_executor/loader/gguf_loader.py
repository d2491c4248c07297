"""GGUF files: a transformers config from the metadata, and HF-named float weights.

Tensors are memory-mapped (see gguf_file.py) and dequantized one at a time, so peak
host memory is one float32 tensor beyond the model itself. llama.cpp's converter reorders
the rows of Q and K of "llama"-architecture models for its interleaved RoPE; that is undone
here so the weights match HF's (neox-style) layout.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from pagedllm.model_executor.loader.errors import ModelLoadError
from pagedllm.model_executor.loader.gguf_archs import GGUFArch, gguf_arch_spec
from pagedllm.model_executor.loader.gguf_file import GGUFFile, open_gguf

_TOP_LEVEL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_qkv": "self_attn.qkv_proj",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}

# Stacked expert tensors [num_experts, out, in] -> index into GGUFArch.expert_names.
_EXPERT_STACKS = {"ffn_gate_exps": 0, "ffn_up_exps": 1, "ffn_down_exps": 2}
# Older Mixtral files: one tensor per expert, blk.N.ffn_gate.E.weight.
_EXPERT_RE = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight$")
_EXPERT_KIND = {"gate": 0, "up": 1, "down": 2}

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")

# Tensors that are not weights: rope_freqs becomes the config's llama3 rope_parameters.
_SKIPPED = frozenset({"rope_freqs.weight", "rope_factors_long.weight",
                      "rope_factors_short.weight"})


def gguf_to_hf_name(name: str, spec: GGUFArch | None = None) -> str | None:
    """HF checkpoint name for a GGUF tensor name; None when the tensor is not used."""
    if name in _SKIPPED:
        return None
    if name in _TOP_LEVEL_NAMES:
        return _TOP_LEVEL_NAMES[name]
    expert = _EXPERT_RE.match(name)
    if expert is not None and spec is not None:
        hf = spec.expert_names[_EXPERT_KIND[expert.group(2)]]
        return f"model.layers.{expert.group(1)}.mlp.experts.{expert.group(3)}.{hf}.weight"
    m = _BLOCK_RE.match(name)
    names = {**_BLOCK_NAMES, **(spec.block_names if spec is not None else {})}
    if m is None or m.group(2) not in names:
        raise ModelLoadError(f"GGUF tensor {name!r} has no known HF equivalent")
    return f"model.layers.{m.group(1)}.{names[m.group(2)]}.{m.group(3)}"


def gguf_metadata(gguf_file: GGUFFile, key: str, default: Any = None) -> Any:
    """A metadata value (scalar, string or list), or `default` when absent."""
    return gguf_file.metadata.get(key, default)


def gguf_architecture(reader: GGUFFile) -> str:
    arch = gguf_metadata(reader, "general.architecture")
    if not arch:
        raise ModelLoadError("GGUF file has no general.architecture")
    return str(arch)


def _llama3_divisors(
    head_dim: int, theta: float, factor: float, low: float, high: float, original: int
) -> np.ndarray:
    """llama.cpp's `rope_freqs` for HF's llama3 scaling: what each frequency is divided by."""
    from pagedllm.model_executor.layers.rotary_embedding import llama3_inv_freq

    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return (inv_freq / llama3_inv_freq(inv_freq, factor, low, high, original)).numpy()


def llama3_rope_from_freq_factors(factors: np.ndarray, head_dim: int, theta: float) -> dict:
    """The HF llama3 `rope_parameters` that reproduce a GGUF's `rope_freqs` tensor.

    llama.cpp stores Llama-3.1/3.2 RoPE scaling as per-frequency divisors instead of the four
    parameters; they are recovered by matching the divisors against the parameter values the
    Llama-3 releases use. Anything else is refused rather than loaded with the wrong RoPE.
    """
    factors = np.asarray(factors, dtype=np.float64)
    if factors.shape != (head_dim // 2,):
        raise ModelLoadError(
            f"GGUF rope_freqs has shape {factors.shape}, expected ({head_dim // 2},)"
        )
    factor = float(factors.max())
    for original in (8192, 4096, 16384, 32768, 2048):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (2.0, 4.0), (1.0, 8.0)):
            want = _llama3_divisors(head_dim, theta, factor, low, high, original)
            if np.allclose(want, factors, rtol=1e-4, atol=1e-6):
                return {
                    "rope_type": "llama3", "rope_theta": theta, "factor": factor,
                    "low_freq_factor": low, "high_freq_factor": high,
                    "original_max_position_embeddings": original,
                }  # fmt: skip
    raise ModelLoadError(
        "GGUF rope_freqs does not match Llama-3 RoPE scaling with any known parameters; "
        "this RoPE variant is not supported"
    )


def _rope_parameters(
    reader: GGUFFile, get: Callable[..., Any], path: str, head_dim: int, rope_theta: float
) -> dict[str, Any]:
    """HF `rope_parameters` from llama.cpp's rope.scaling.* keys or a rope_freqs tensor."""
    rope_params: dict[str, Any] = {"rope_type": "default", "rope_theta": rope_theta}
    scaling_type = get("rope.scaling.type")
    if scaling_type == "linear":
        rope_params = {"rope_type": "linear", "rope_theta": rope_theta,
                       "factor": float(get("rope.scaling.factor", 1.0))}
    elif scaling_type == "yarn":
        if get("rope.scaling.yarn_log_multiplier"):
            raise ModelLoadError("GGUF YaRN with yarn_log_multiplier (DeepSeek's mscale) is not "
                                 "supported")
        rope_params = {
            "rope_type": "yarn", "rope_theta": rope_theta,
            "factor": float(get("rope.scaling.factor", 1.0)),
            "original_max_position_embeddings": int(
                get("rope.scaling.original_context_length", get("context_length", 2048))),
        }  # fmt: skip
        for key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if get(f"rope.scaling.{key}") is not None:
                rope_params[hf_key] = float(get(f"rope.scaling.{key}"))
    elif scaling_type not in (None, "none"):
        raise ModelLoadError(f"GGUF rope scaling {scaling_type!r} is not supported")
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        if rope_params["rope_type"] != "default":
            raise ModelLoadError(f"GGUF file {path} has both rope_freqs and {scaling_type} scaling")
        rope_params = llama3_rope_from_freq_factors(
            reader.dequantize(freqs).reshape(-1), head_dim, rope_theta
        )
    return rope_params


def build_hf_config_from_gguf(path: str) -> Any:
    """A transformers config (LlamaConfig, Qwen2Config, ...) with `architectures` set."""
    import transformers

    reader = open_gguf(path)
    arch = gguf_architecture(reader)

    def get(key: str, default: Any = None) -> Any:
        return gguf_metadata(reader, f"{arch}.{key}", default)

    spec = gguf_arch_spec(arch, get)
    config_cls_name, hf_arch = spec.config_cls, spec.hf_arch

    hidden = get("embedding_length")
    num_heads = get("attention.head_count")
    if hidden is None or num_heads is None or get("block_count") is None:
        raise ModelLoadError(f"GGUF file {path} lacks {arch}.embedding_length/head_count/"
                             "block_count metadata")
    tensor_names = {t.name for t in reader.tensors}
    vocab_size = get("vocab_size")
    if vocab_size is None:
        tokens = gguf_metadata(reader, "tokenizer.ggml.tokens")
        vocab_size = len(tokens) if tokens is not None else None
    if vocab_size is None:
        raise ModelLoadError(f"GGUF file {path} has neither {arch}.vocab_size nor a vocabulary")
    head_dim = get("attention.key_length") or hidden // num_heads
    kwargs: dict[str, Any] = dict(
        architectures=[hf_arch],
        vocab_size=int(vocab_size),
        hidden_size=int(hidden),
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")),
        num_attention_heads=int(num_heads),
        num_key_value_heads=int(get("attention.head_count_kv", num_heads)),
        head_dim=int(head_dim),
        max_position_embeddings=int(get("context_length", 2048)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        tie_word_embeddings="output.weight" not in tensor_names,
    )
    rope_theta = float(get("rope.freq_base", 10000.0))
    rope_params = _rope_parameters(reader, get, path, int(head_dim), rope_theta)
    kwargs["rope_parameters"] = rope_params
    kwargs["rope_theta"] = rope_theta
    if arch == "qwen2":
        kwargs["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    window = get("attention.sliding_window")
    if window:
        kwargs["sliding_window"] = int(window)
    if arch == "phi3":
        _phi3_longrope(reader, get, kwargs)
    if spec.configure is not None:
        spec.configure(get, kwargs, tensor_names)
    for key, attr in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("padding_token_id", "pad_token_id")):
        value = gguf_metadata(reader, f"tokenizer.ggml.{key}")
        if value is not None:
            kwargs[attr] = int(value)
    config = getattr(transformers, config_cls_name)(**kwargs)
    config.architectures = [hf_arch]
    config.gguf_path = path  # the quantization method reads the tensor types from it
    return config


def _phi3_longrope(reader: GGUFFile, get: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    """Phi-3's LongRoPE: llama.cpp keeps the factors as rope_factors_{short,long} tensors."""
    tensors = {t.name: t for t in reader.tensors}
    if "rope_factors_long.weight" not in tensors:
        return
    original = get("rope.scaling.original_context_length")
    if original is None:
        raise ModelLoadError("Phi-3 GGUF with rope factors lacks rope.scaling.original_context_length")
    rope = dict(kwargs["rope_parameters"])
    rope.update(
        rope_type="longrope", original_max_position_embeddings=int(original),
        long_factor=reader.dequantize(tensors["rope_factors_long.weight"]).reshape(-1).tolist(),
        short_factor=reader.dequantize(tensors["rope_factors_short.weight"]).reshape(-1).tolist(),
    )  # fmt: skip
    if get("rope.scaling.attn_factor") is not None:
        rope["attention_factor"] = float(get("rope.scaling.attn_factor"))
    kwargs["rope_parameters"] = rope
    kwargs["original_max_position_embeddings"] = int(original)
    kwargs["partial_rotary_factor"] = int(get("rope.dimension_count", kwargs["head_dim"])) / (
        kwargs["head_dim"])


def _unpermute_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's permute: per head, interleaved rotary halves back to blocks."""
    rows = w.shape[0]
    return (
        w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def iterate_gguf_weights(
    path: str,
    hf_config: Any,
    needed: Callable[[str], bool] | None = None,
    keep_packed: Callable[[str, int], bool] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 tensor) for every tensor in the file (those `needed` accepts),
    dequantized one at a time; a tensor `keep_packed(hf_name, qtype)` accepts comes as its
    GGUF bytes instead, [rows, row_bytes] uint8 (Q/K rows un-permuted whole)."""
    reader = open_gguf(path)
    arch = gguf_architecture(reader)
    spec = gguf_arch_spec(arch, lambda key, default=None: gguf_metadata(
        reader, f"{arch}.{key}", default))
    num_heads = int(hf_config.num_attention_heads)
    num_kv_heads = int(getattr(hf_config, "num_key_value_heads", None) or num_heads)
    for tensor in reader.tensors:
        block = _BLOCK_RE.match(tensor.name)
        if block is not None and block.group(2) in _EXPERT_STACKS:
            experts = _split_experts(reader.dequantize(tensor), int(block.group(1)),
                                     spec.expert_names[_EXPERT_STACKS[block.group(2)]])
            yield from ((n, t) for n, t in experts if needed is None or needed(n))
            continue
        hf_name = gguf_to_hf_name(tensor.name, spec)
        if hf_name is None or (needed is not None and not needed(hf_name)):
            continue
        packed = keep_packed is not None and keep_packed(hf_name, tensor.qtype)
        array = reader.raw(tensor) if packed else reader.dequantize(tensor)
        if spec.permuted_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            array = _unpermute_qk(array, num_heads)
        elif spec.permuted_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            array = _unpermute_qk(array, num_kv_heads)
        if packed:
            yield hf_name, torch.from_numpy(np.ascontiguousarray(array).copy())
            continue
        if spec.norm_shift and hf_name.endswith("norm.weight"):
            array = array - np.float32(spec.norm_shift)
        if hf_name.endswith("shared_expert_gate.weight"):
            array = array.reshape(1, -1)  # llama.cpp stores the [1, hidden] gate as [hidden]
        yield hf_name, _writable_tensor(array)


def _writable_tensor(array: np.ndarray) -> torch.Tensor:
    if not array.flags.writeable or not array.flags.c_contiguous:
        # F32 tensors come back as views of the read-only memory map.
        array = np.array(array, dtype=np.float32, order="C", copy=True)
    return torch.from_numpy(array)


def _split_experts(
    stacked: np.ndarray, layer: int, hf_name: str
) -> Iterator[tuple[str, torch.Tensor]]:
    """[num_experts, out, in] -> one HF per-expert matrix each."""
    for expert in range(stacked.shape[0]):
        name = f"model.layers.{layer}.mlp.experts.{expert}.{hf_name}.weight"
        yield name, _writable_tensor(np.ascontiguousarray(stacked[expert]))
