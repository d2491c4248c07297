"""Independent fp8 arithmetic for quantization tests: checkpoint writers and a reference model.

The reference is the transformers model of a 16-bit checkpoint holding the dequantized fp8
weights in fp32, with forward pre-hooks that round each quantized layer's input to e4m3 the
way the checkpoint says (dynamic per token, or a static per-tensor scale). Nothing here
imports pagedllm's quantization code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import torch
from safetensors.torch import load_file, save_file

FP8 = torch.float8_e4m3fn
E4M3_MAX = 448.0
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# The checkpoint modules one fused layer of the engine multiplies with one input.
FUSED_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                ("mlp.gate_proj", "mlp.up_proj"))


def linear_names(num_layers: int) -> list[str]:
    return [f"model.layers.{i}.{m}" for i in range(num_layers) for m in LINEARS]


def quant_per_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = w.abs().max().float() / E4M3_MAX
    return (w.float() / s).clamp(-E4M3_MAX, E4M3_MAX).to(FP8), s


def quant_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = w.float().abs().amax(dim=1, keepdim=True) / E4M3_MAX  # [out, 1]
    return (w.float() / s).clamp(-E4M3_MAX, E4M3_MAX).to(FP8), s


def quant_per_block(w: torch.Tensor, bn: int, bk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, [ceil(out/bn), in/bk] scales): one amax / 448 scale per block."""
    out, inp = w.shape
    rows = -(-out // bn)
    padded = torch.zeros(rows * bn, inp)
    padded[:out] = w.float()
    s = padded.view(rows, bn, inp // bk, bk).abs().amax(dim=(1, 3)) / E4M3_MAX
    full = s.repeat_interleave(bn, 0)[:out].repeat_interleave(bk, 1)
    return (w.float() / full).clamp(-E4M3_MAX, E4M3_MAX).to(FP8), s


def dequant_per_block(q: torch.Tensor, s: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    return q.float() * s.repeat_interleave(bn, 0)[:q.shape[0]].repeat_interleave(bk, 1)


def fake_quant_per_token_group(x: torch.Tensor, group: int) -> torch.Tensor:
    xg = x.reshape(*x.shape[:-1], -1, group)
    s = torch.clamp(xg.abs().amax(dim=-1, keepdim=True) / E4M3_MAX, min=1e-10)
    return ((xg / s).clamp(-E4M3_MAX, E4M3_MAX).to(FP8).float() * s).reshape(x.shape)


def fake_quant_per_token(x: torch.Tensor) -> torch.Tensor:
    s = torch.clamp(x.abs().amax(dim=-1, keepdim=True) / E4M3_MAX, min=1e-10)
    return (x / s).clamp(-E4M3_MAX, E4M3_MAX).to(FP8).float() * s


def fake_quant_static(x: torch.Tensor, s: float | torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(s, dtype=torch.float32)
    return (x / s).clamp(-E4M3_MAX, E4M3_MAX).to(FP8).float() * s


def calibrate_input_scales(hf_model, names: list[str], ids: torch.Tensor) -> dict[str, float]:
    """amax(input) / 448 of each named linear over one forward of `ids`."""
    amax: dict[str, float] = {}
    modules = dict(hf_model.named_modules())
    handles = [
        modules[n].register_forward_pre_hook(
            lambda _m, args, n=n: amax.__setitem__(n, args[0].abs().max().item()))
        for n in names
    ]
    with torch.no_grad():
        hf_model(ids[None])
    for h in handles:
        h.remove()
    return {n: a / E4M3_MAX for n, a in amax.items()}


def rewrite_checkpoint(
    src_dir: str, dst_dir: str,
    transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    quantization_config: dict | None,
) -> str:
    """Copies the HF dir `src_dir` to `dst_dir` with its tensors transformed and
    `quantization_config` written into config.json."""
    os.makedirs(dst_dir, exist_ok=True)
    for name in os.listdir(src_dir):
        if name.endswith(".safetensors"):
            continue
        with open(os.path.join(src_dir, name), "rb") as f, \
                open(os.path.join(dst_dir, name), "wb") as g:
            g.write(f.read())
    tensors = transform(load_file(os.path.join(src_dir, "model.safetensors")))
    save_file({k: v.contiguous() for k, v in tensors.items()},
              os.path.join(dst_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(dst_dir, "config.json")) as f:
        config = json.load(f)
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    with open(os.path.join(dst_dir, "config.json"), "w") as f:
        json.dump(config, f)
    return dst_dir


class ReferenceModel:
    """transformers fp32 model of `src_dir` with `weights` (dequantized) swapped in and each
    layer in `act` rounding its input: "dynamic" per token, ("group", size) per token and
    group of input features, or a static float scale."""

    def __init__(self, src_dir: str, weights: dict[str, torch.Tensor],
                 act: dict[str, str | float]) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(src_dir, dtype=torch.float32).eval()
        modules = dict(self.model.named_modules())
        with torch.no_grad():
            for name, w in weights.items():
                modules[name].weight.copy_(w)
        for name, how in act.items():
            if how == "dynamic":
                fn = fake_quant_per_token
            elif isinstance(how, tuple):
                fn = lambda x, g=how[1]: fake_quant_per_token_group(x, g)  # noqa: E731
            else:
                fn = lambda x, s=how: fake_quant_static(x, s)  # noqa: E731
            modules[name].register_forward_pre_hook(lambda _m, args, fn=fn: (fn(args[0]),))

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids[None]).logits[0]

    @torch.no_grad()
    def greedy(self, prompt: list[int], n: int) -> list[int]:
        seq = list(prompt)
        for _ in range(n):
            seq.append(int(self.logits(torch.tensor(seq))[-1].argmax()))
        return seq[len(prompt):]


def fused_max(scales: dict[str, float]) -> dict[str, float]:
    """Each fused group's members take the group's largest input scale (the engine fuses
    them into one matmul of one input)."""
    out = dict(scales)
    for name in scales:
        layer, module = name.rsplit(".", 2)[0], ".".join(name.split(".")[-2:])
        for group in FUSED_GROUPS:
            if module in group:
                out[name] = max(scales[f"{layer}.{m}"] for m in group)
    return out
