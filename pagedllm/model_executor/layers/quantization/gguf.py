"""GGUF weights kept packed on CPU (`--quantization gguf`, the CPU default for .gguf files).

The loader hands each quantized linear weight over as its GGUF bytes, [N, row_bytes] uint8
(rows along the output, blocks along K: row-wise concatenation of q/k/v or gate/up is valid
and the fused layer holds one packed tensor), and `GGUFLinearMethod` multiplies them with
the C++ kernels in `gguf_kernels`: up to DECODE_MAX_M rows the decode kernel (weights
dequantized in registers, batch-invariant: on AVX512-VNNI CPUs float32 FMAs with x unrounded,
on AVX2 CPUs 16-bit integer dots with x rounded to int16 per 32-group, `mm_x16`, unless
PAGEDLLM_CPU_GGUF_X16=0), above it dequantized tiles + torch's float32 GEMM (prefill). The int8-dot kernel (`gguf_mm`,
llama.cpp's approach) stays for benchmarks. A fused layer whose parts have different GGUF
types, and every F32/F16/BF16 or unsupported type, stays dequantized in the model dtype. The
LM head (the embedding table when tied) is multiplied packed too; the embedding lookup itself
gathers from the dequantized table. CPU only, one rank (tensor parallelism dequantizes).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import torch
from torch import nn

from pagedllm import envs
from pagedllm.model_executor.layers.linear import LinearMethod
from pagedllm.model_executor.layers.quantization import gguf_kernels, register_quantization_config
from pagedllm.model_executor.layers.quantization.base_config import (
    QuantizationConfig,
    checkpoint_module_names,
)
from pagedllm.model_executor.layers.utils import set_weight_attrs

logger = logging.getLogger(__name__)

# Rows of x up to which the decode kernel (`mm_x16` / `mm_f32`: weights dequantized in
# registers) runs; above, dequantized tiles + torch's float32 GEMM (prefill). Both are within
# ~1e-5 of |x| @ |W|^T, so switching by row count moves a result by about rounding (as
# torch's GEMM does between batch sizes); the kernel itself is
# batch-invariant up to this size. Measured crossover (SmolLM2 Q4_1 shapes, 1 thread,
# docs/benchmarks.md): the kernel wins up to 16-24 rows.
DECODE_MAX_M = 16
# Dequantized tile of the prefill path: about 256 KiB of float32 (stays in L2) for small
# batches, 4 MiB for long prefills (bigger GEMMs, the dequantization is amortised anyway).
_TILE_FLOATS = 1 << 16
_TILE_FLOATS_LONG = 1 << 20
_TYPE_NAMES = {2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 12: "Q4_K", 13: "Q5_K",
               14: "Q6_K"}


def _decode_mm(x: torch.Tensor, w: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """The decode kernel, chosen from the environment at the first call (then this name is
    the kernel itself: no per-call lookup on the ~120 calls of a step)."""
    global _decode_mm
    _decode_mm = gguf_kernels.gguf_mm_x16 if envs.cpu_gguf_x16() else gguf_kernels.gguf_mm_f32
    return _decode_mm(x, w, qtype, k)


def gguf_linear(x: torch.Tensor, w: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """[..., K] @ W^T for a packed W [N, row_bytes], in x's dtype."""
    flat = x.dim() == 2  # the usual [tokens, K]: no reshape either way (~1 us a call each)
    x2 = x if flat else x.reshape(-1, k)  # [M, K]
    if x2.shape[0] <= DECODE_MAX_M:
        y = _decode_mm(x2, w, qtype, k)
    else:
        floats = _TILE_FLOATS_LONG if x2.shape[0] >= 256 else _TILE_FLOATS
        y = gguf_kernels.gguf_mm_dequant(x2, w, qtype, k, max(16, floats // k))
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y if flat else y.reshape(*x.shape[:-1], w.shape[0])


@register_quantization_config
class GGUFConfig(QuantizationConfig):
    """Knows the GGUF type of every checkpoint tensor (HF name -> gguf type id)."""

    name = "gguf"

    def __init__(self, tensor_types: dict[str, int], head_source: str | None = None,
                 path: str | None = None) -> None:
        self.tensor_types = dict(tensor_types)
        self.head_source = head_source  # GGUF tensor the LM head is multiplied from
        self.path = path
        self.packed_names: set[str] = set()  # checkpoint weights a layer keeps packed

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GGUFConfig:
        raise ValueError("--quantization gguf needs a .gguf model file")

    @classmethod
    def from_model_config(cls, hf_config: Any) -> GGUFConfig:
        path = getattr(hf_config, "gguf_path", None)
        if not path:
            raise ValueError("--quantization gguf needs a .gguf model file")
        return cls.from_gguf(path, hf_config)

    @classmethod
    def from_gguf(cls, path: str, hf_config: Any) -> GGUFConfig:
        from pagedllm.model_executor.loader.gguf_archs import gguf_arch_spec
        from pagedllm.model_executor.loader.gguf_file import open_gguf
        from pagedllm.model_executor.loader.gguf_loader import (
            gguf_architecture,
            gguf_metadata,
            gguf_to_hf_name,
        )

        reader = open_gguf(path)
        arch = gguf_architecture(reader)
        spec = gguf_arch_spec(arch, lambda key, default=None: gguf_metadata(
            reader, f"{arch}.{key}", default))
        types: dict[str, int] = {}
        for t in reader.tensors:
            try:
                hf = gguf_to_hf_name(t.name, spec)
            except ValueError:
                continue  # stacked experts and the like: not linear layers
            if hf is not None and len(t.shape) == 2:
                types[hf] = t.qtype
        names = {t.name for t in reader.tensors}
        head = "output.weight" if "output.weight" in names else "token_embd.weight"
        return cls(types, head, path)

    def check_device(self, device: torch.device, dtype: torch.dtype) -> None:
        if device.type != "cpu":
            raise ValueError("--quantization gguf (packed GGUF kernels) runs on CPU only; on "
                             "a GPU the GGUF weights are dequantized (drop the flag)")
        if not gguf_kernels.available():  # loads the extension in this (worker) process
            raise ValueError("the GGUF CPU kernels could not be built (see the warning above); "
                             "drop --quantization gguf to dequantize the weights")

    def _packed_type(self, prefix: str) -> int | None:
        parts = [f"{name}.weight" for name in checkpoint_module_names(prefix)]
        types = {self.tensor_types.get(p) for p in parts}
        if len(types) != 1:
            return None
        qtype = types.pop()
        return qtype if qtype in gguf_kernels.PACKED_TYPES else None

    def get_linear_method(self, layer: nn.Module, prefix: str) -> LinearMethod | None:
        qtype = self._packed_type(prefix)
        if qtype is None or getattr(layer, "tp_size", 1) != 1:
            return None
        elems = gguf_kernels.PACKED_TYPES[qtype][0]
        if layer.input_size % elems:
            return None
        self.packed_names.update(f"{n}.weight" for n in checkpoint_module_names(prefix))
        return GGUFLinearMethod(qtype)

    def keep_packed(self, hf_name: str, qtype: int) -> bool:
        """Whether the loader hands this tensor over as its packed bytes."""
        return hf_name in self.packed_names and self.tensor_types.get(hf_name) == qtype

    def attach_lm_head(self, model: nn.Module) -> None:
        """Lets `compute_logits` multiply the LM head packed (read from the file)."""
        from pagedllm.model_executor.layers.vocab_parallel_embedding import (
            VocabParallelEmbedding,
        )
        from pagedllm.model_executor.loader.gguf_file import open_gguf

        head = getattr(model, "lm_head", None)
        if not isinstance(head, VocabParallelEmbedding) or self.path is None:
            return
        reader = open_gguf(self.path)
        info = next((t for t in reader.tensors if t.name == self.head_source), None)
        if info is None or info.qtype not in gguf_kernels.PACKED_TYPES:
            return
        vocab, k = info.shape
        if getattr(head, "tp_size", 1) != 1 or vocab != head.org_vocab_size:
            return
        packed = torch.from_numpy(reader.raw(info).copy())
        head.gguf_packed = (packed, int(info.qtype), int(k))
        self.head_type = int(info.qtype)

    def describe(self) -> str:
        counts = Counter(_TYPE_NAMES[self.tensor_types[n]] for n in self.packed_names)
        types = ", ".join(f"{t} x{c}" for t, c in counts.most_common())
        head = getattr(self, "head_type", None)
        head_s = f"; lm_head {_TYPE_NAMES[head]}" if head is not None else ""
        isa = gguf_kernels.isa() if gguf_kernels.available() else "unavailable"
        return f"gguf (packed CPU kernels, {isa}: {types}{head_s})"


class GGUFLinearMethod(LinearMethod):
    """One packed weight [sum(output sizes), row_bytes] uint8 of a single GGUF type."""

    def __init__(self, qtype: int) -> None:
        self.qtype = qtype

    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
    ) -> None:
        nbytes = gguf_kernels.row_bytes(self.qtype, input_size_per_partition)
        weight = nn.Parameter(
            torch.empty(sum(output_partition_sizes), nbytes, dtype=torch.uint8),
            requires_grad=False,
        )
        set_weight_attrs(weight, {"output_dim": 0})
        layer.register_parameter("weight", weight)
        layer.gguf_k = input_size_per_partition

    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        y = gguf_linear(x, layer.weight, self.qtype, layer.gguf_k)
        return y + bias if bias is not None else y
