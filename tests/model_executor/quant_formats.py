"""Test-side writers of GPTQ and AWQ checkpoints, from the published formats.

Written independently of pagedllm's `packed_int`: per-value loops over numpy words as
AutoGPTQ/AutoAWQ describe their packing, and a bit-by-bit reader used to cross-check them.
`write_quantized_checkpoint` turns a random fp32 HF checkpoint into a quantized one plus a
reference checkpoint holding exactly the dequantized weights in fp32.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.torch import load_file, save_file

AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column ORDER[i] of 8
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --- packers (published layouts) -------------------------------------------------------

def gptq_pack(values: np.ndarray, bits: int) -> np.ndarray:
    """[rows, cols] unsigned values -> [rows * bits / 32, cols] int32, packed along rows."""
    rows, cols = values.shape
    v = values.astype(np.uint64)
    out = np.zeros((rows * bits // 32, cols), dtype=np.uint64)
    if bits in (2, 4, 8):
        per = 32 // bits
        for w in range(rows // per):
            for j in range(per):
                out[w] |= v[w * per + j] << np.uint64(bits * j)
    elif bits == 3:
        # Runs of 32 values in 3 words: 10 values, one split 2|1 bits, 10, one split 1|2, 10.
        for run in range(rows // 32):
            src, w = run * 32, run * 3
            for j in range(10):
                out[w] |= v[src + j] << np.uint64(3 * j)
            out[w] |= (v[src + 10] & np.uint64(0b11)) << np.uint64(30)
            out[w + 1] |= v[src + 10] >> np.uint64(2)
            for j in range(10):
                out[w + 1] |= v[src + 11 + j] << np.uint64(3 * j + 1)
            out[w + 1] |= (v[src + 21] & np.uint64(1)) << np.uint64(31)
            out[w + 2] |= v[src + 21] >> np.uint64(1)
            for j in range(10):
                out[w + 2] |= v[src + 22 + j] << np.uint64(3 * j + 2)
    else:
        raise ValueError(bits)
    return (out & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.int32)


def awq_pack(values: np.ndarray) -> np.ndarray:
    """[rows, cols] 4-bit values -> [rows, cols / 8] int32 in AutoAWQ's interleaved order."""
    rows, cols = values.shape
    v = values.astype(np.uint64)
    out = np.zeros((rows, cols // 8), dtype=np.uint64)
    for c in range(cols // 8):
        for i, col in enumerate(AWQ_PACK_ORDER):
            out[:, c] |= v[:, c * 8 + col] << np.uint64(4 * i)
    return out.astype(np.uint32).view(np.int32)


# --- independent bit-level readers ---------------------------------------------------------

def bit_stream_unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Reads `count` values along axis 0 one bit at a time from the little-endian stream."""
    words = packed.view(np.uint32).astype(np.int64)
    out = np.zeros((count,) + words.shape[1:], dtype=np.int64)
    for i in range(count):
        for b in range(bits):
            pos = i * bits + b
            out[i] |= ((words[pos // 32] >> (pos % 32)) & 1) << b
    return out


def awq_bit_unpack(packed: np.ndarray, cols: int) -> np.ndarray:
    words = packed.view(np.uint32).astype(np.int64)
    out = np.zeros((words.shape[0], cols), dtype=np.int64)
    for col in range(cols):
        nibble = AWQ_PACK_ORDER.index(col % 8)
        for b in range(4):
            out[:, col] |= ((words[:, col // 8] >> (4 * nibble + b)) & 1) << b
    return out


# --- quantization of a weight ----------------------------------------------------------------

@dataclass
class QuantizedWeight:
    """W^T [K, N] ~ (q - zeros[g]) * scales[g]: q [K, N], zeros/scales [G, N], g [K]."""

    q: np.ndarray
    zeros: np.ndarray
    scales: torch.Tensor  # fp16
    g_idx: np.ndarray
    dequant: torch.Tensor = field(init=False)  # [N, K] fp32, the HF weight it stands for

    def __post_init__(self) -> None:
        s = self.scales.float().numpy()[self.g_idx]
        w = (self.q.astype(np.float64) - self.zeros[self.g_idx]) * s
        self.dequant = torch.from_numpy(w.astype(np.float32)).t().contiguous()


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int, sym: bool,
                    perm: np.ndarray | None, min_zero: int = 0) -> QuantizedWeight:
    """Min/max quantization of an HF weight [N, K] in groups of input rows; `perm` puts rows
    perm[i] in group i // group_size (GPTQ act order)."""
    wt = weight.t().double().numpy()  # [K, N]
    k = wt.shape[0]
    gs = k if group_size == -1 else group_size
    order = perm if perm is not None else np.arange(k)
    g_idx = np.empty(k, dtype=np.int64)
    g_idx[order] = np.arange(k) // gs
    maxq = 2**bits - 1
    groups = k // gs
    scales = np.zeros((groups, wt.shape[1]))
    zeros = np.zeros((groups, wt.shape[1]), dtype=np.int64)
    for g in range(groups):
        rows = wt[g_idx == g]
        if sym:
            scales[g] = np.maximum(np.abs(rows).max(0), 1e-6) * 2 / maxq
            zeros[g] = (maxq + 1) // 2
        else:
            lo, hi = np.minimum(rows.min(0), 0), np.maximum(rows.max(0), 0)
            scales[g] = np.maximum(hi - lo, 1e-6) / maxq
            zeros[g] = np.clip(np.round(-lo / scales[g]), min_zero, maxq)
    scales16 = torch.from_numpy(scales).to(torch.float16)
    s = scales16.double().numpy()[g_idx]
    q = np.clip(np.round(wt / s) + zeros[g_idx], 0, maxq).astype(np.int64)
    return QuantizedWeight(q, zeros, scales16, g_idx)


# --- checkpoints ------------------------------------------------------------------------------

@dataclass
class QuantSpec:
    method: str  # "gptq" | "awq"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    checkpoint_format: str = "gptq"
    zero_point: bool = True
    skip: tuple[str, ...] = ()  # modules written unquantized
    extra_config: dict = field(default_factory=dict)

    def quantization_config(self) -> dict:
        if self.method == "gptq":
            qc = {"quant_method": "gptq", "bits": self.bits, "group_size": self.group_size,
                  "desc_act": self.desc_act, "sym": self.sym,
                  "checkpoint_format": self.checkpoint_format}
        else:
            qc = {"quant_method": "awq", "bits": 4, "group_size": self.group_size,
                  "zero_point": self.zero_point, "version": "gemm",
                  "modules_to_not_convert": list(self.skip) or None}
        qc.update(self.extra_config)
        return qc


def _gptq_tensors(qw: QuantizedWeight, spec: QuantSpec) -> dict[str, torch.Tensor]:
    zeros = qw.zeros - 1 if spec.checkpoint_format == "gptq" else qw.zeros
    return {
        "qweight": torch.from_numpy(gptq_pack(qw.q, spec.bits)),
        "qzeros": torch.from_numpy(gptq_pack(zeros.T.copy(), spec.bits).T.copy()),
        "scales": qw.scales,
        "g_idx": torch.from_numpy(qw.g_idx.astype(np.int32)),
    }


def _awq_tensors(qw: QuantizedWeight, spec: QuantSpec) -> dict[str, torch.Tensor]:
    out = {"qweight": torch.from_numpy(awq_pack(qw.q)), "scales": qw.scales}
    if spec.zero_point:
        out["qzeros"] = torch.from_numpy(awq_pack(qw.zeros))
    return out


def write_quantized_checkpoint(src_dir: str, quant_dir: str, ref_dir: str, spec: QuantSpec,
                               seed: int = 0) -> None:
    """Quantizes every linear module of the fp32 checkpoint `src_dir` (except `spec.skip`):
    `quant_dir` gets the packed format, `ref_dir` the dequantized weights in fp32."""
    rng = np.random.default_rng(seed)
    state = load_file(os.path.join(src_dir, "model.safetensors"))
    quant, ref = {}, {}
    perms: dict[tuple[str, int], np.ndarray] = {}
    for name, tensor in state.items():
        module = name.rsplit(".", 2)[-2] if name.endswith(".weight") else ""
        if module not in LINEAR_MODULES or module in spec.skip:
            quant[name] = ref[name] = tensor
            continue
        perm = None
        if spec.desc_act:
            # Modules that read the same input share one act-order permutation, as GPTQ's
            # Hessian (the input's) is theirs in common.
            layer = name.rsplit(".", 3)[0]
            shared = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gu",
                      "up_proj": "gu"}.get(module, module)
            key = (f"{layer}.{shared}", tensor.shape[1])
            perm = perms.setdefault(key, rng.permutation(tensor.shape[1]))
        min_zero = 1 if spec.method == "gptq" and spec.checkpoint_format == "gptq" else 0
        bits = spec.bits if spec.method == "gptq" else 4
        qw = quantize_weight(tensor, bits, spec.group_size, spec.sym or (
            spec.method == "awq" and not spec.zero_point), perm, min_zero)
        base = name[: -len(".weight")]
        packed = _gptq_tensors(qw, spec) if spec.method == "gptq" else _awq_tensors(qw, spec)
        for suffix, t in packed.items():
            quant[f"{base}.{suffix}"] = t
        ref[name] = qw.dequant
    for out_dir, tensors, qc in ((quant_dir, quant, spec.quantization_config()),
                                 (ref_dir, ref, None)):
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(src_dir, "config.json")) as f:
            config = json.load(f)
        if qc is not None:
            config["quantization_config"] = qc
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(config, f)
        for extra in ("generation_config.json",):
            if os.path.exists(os.path.join(src_dir, extra)):
                shutil.copy(os.path.join(src_dir, extra), out_dir)
        save_file({k: v.contiguous() for k, v in tensors.items()},
                  os.path.join(out_dir, "model.safetensors"))
