"""Random int4 checkpoints of real configurations for benchmarks (`random:NAME:gptq|awq`).

The packed tensors are drawn at random in the published layouts (GPTQ: `qweight` int32
[in / 8, out] packed along the input, AutoGPTQ v1 zeros stored minus one; AutoAWQ GEMM: `qweight`
int32 [in, out / 8] packed along the output), with scales sized so activations keep a sane
magnitude. Speed does not depend on the values; nothing is quantized from a 16-bit model.
"""

from __future__ import annotations

import json
import os

# Modules of a Llama decoder layer that int4 checkpoints quantize: (name, out, in) by config.
_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _linear_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    dims = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, q), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
            "mlp.down_proj": (h, inter)}
    return {name: dims[name] for name in _LINEARS}


def _packed_tensors(method: str, out_f: int, in_f: int, group: int, gen, device) -> dict:
    import torch

    groups = in_f // group

    def rand_int32(*shape):
        return torch.randint(-(2**31), 2**31 - 1, shape, generator=gen, dtype=torch.int64,
                             device=device).to(torch.int32)

    # Symmetric int4: zero point 8 in every nibble (GPTQ v1 stores it minus one: 7).
    zero_word = 0x77777777 if method == "gptq" else -2004318072  # 0x88888888 as int32
    scale = 0.02 / 4.0  # ~N(0, 0.02)-sized weights from nibbles in [-8, 7]
    if method == "gptq":
        return {
            "qweight": rand_int32(in_f // 8, out_f),
            "qzeros": torch.full((groups, out_f // 8), zero_word, dtype=torch.int32, device=device),
            "scales": torch.full((groups, out_f), scale, dtype=torch.float16, device=device),
            "g_idx": (torch.arange(in_f, device=device) // group).to(torch.int32),
        }
    return {
        "qweight": rand_int32(in_f, out_f // 8),
        "qzeros": torch.full((groups, out_f // 8), zero_word, dtype=torch.int32, device=device),
        "scales": torch.full((groups, out_f), scale, dtype=torch.float16, device=device),
    }


def quant_config_for(method: str, group: int = 128) -> dict:
    if method == "gptq":
        return {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False,
                "sym": True, "checkpoint_format": "gptq"}
    if method == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                "version": "gemm"}
    raise ValueError(f"no random int4 checkpoint for method {method!r}; use gptq or awq")


def build_random_int4_llama(out_dir: str, config: dict, method: str, group: int = 128,
                            seed: int = 0) -> str:
    """Writes config.json (with its quantization_config) and model.safetensors; returns out_dir.
    Embedding, LM head and norms stay 16-bit (fp16), as int4 checkpoints keep them."""
    import torch
    from safetensors.torch import save_file

    path = os.path.join(out_dir, "model.safetensors")
    if os.path.exists(path) and os.path.exists(os.path.join(out_dir, "config.json")):
        return out_dir
    qc = quant_config_for(method, group)
    os.makedirs(out_dir, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(seed)
    h, v = config["hidden_size"], config["vocab_size"]
    tensors = {
        "model.embed_tokens.weight": torch.randn(v, h, generator=gen, device=device) * 0.02,
        "model.norm.weight": torch.ones(h, device=device),
    }
    if not config.get("tie_word_embeddings"):
        tensors["lm_head.weight"] = torch.randn(v, h, generator=gen, device=device) * 0.02
    tensors = {k: t.to(torch.float16) for k, t in tensors.items()}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"{p}{norm}.weight"] = torch.ones(h, dtype=torch.float16, device=device)
        for name, (out_f, in_f) in _linear_shapes(config).items():
            for key, t in _packed_tensors(method, out_f, in_f, group, gen, device).items():
                tensors[f"{p}{name}.{key}"] = t
    save_file({k: t.cpu() for k, t in tensors.items()}, path, metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump({**config, "torch_dtype": "float16", "quantization_config": qc}, f, indent=1)
    return out_dir
