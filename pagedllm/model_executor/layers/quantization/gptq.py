"""GPTQ checkpoints (AutoGPTQ / GPTQModel): 2, 3, 4 and 8 bit, sym or asym, any group size,
act order (`desc_act` with `g_idx`), `checkpoint_format` "gptq" and "gptq_v2".

Tensors of a linear layer with K inputs and N outputs (G groups):
  qweight [K * bits / 32, N] int32 packed along K (`packed_int` bit stream; 3-bit runs 32
          values to 3 words), qzeros [G, N * bits / 32] int32 packed along N the same way,
  scales [G, N] fp16, g_idx [K] int32 (group of each input row), optional bias [N].
Format "gptq" (v1) stores each zero point minus one (read back as stored + 1, unmasked, as
AutoGPTQ's kernels do); "gptq_v2" stores the zero point itself.

Tensor parallelism: qweight and g_idx split along K on row-parallel layers; scales and
qzeros split along G there, except with act order, where any row may belong to any group
and every rank keeps all groups.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pagedllm.model_executor.layers.linear import LinearMethod
from pagedllm.model_executor.layers.quantization import register_quantization_config
from pagedllm.model_executor.layers.quantization.base_config import (
    QuantizationConfig,
    fused_parts_agree,
)
from pagedllm.model_executor.layers.quantization.int_linear import (
    CanonicalWeights,
    PackedIntLinearMethod,
)
from pagedllm.model_executor.layers.quantization.packed_int import (
    SUPPORTED_BITS,
    pack_factor,
    packed_size,
    unpack_int32,
)
from pagedllm.model_executor.layers.utils import set_weight_attrs

CHECKPOINT_FORMATS: tuple[str, ...] = ("gptq", "gptq_v2")
_OVERRIDABLE = ("bits", "group_size", "desc_act", "sym")


@dataclass(frozen=True, slots=True)
class GPTQLayerSpec:
    """The quantization of one layer (the config's, or a `dynamic` override of it)."""

    bits: int
    group_size: int  # -1: one group over the whole input
    desc_act: bool
    sym: bool
    v1_zeros: bool  # checkpoint_format "gptq": zero points stored minus one

    def validate(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"GPTQ bits={self.bits} is not supported (choose one of "
                             f"{', '.join(map(str, SUPPORTED_BITS))})")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"GPTQ group_size={self.group_size} must be positive or -1")


@register_quantization_config
class GPTQConfig(QuantizationConfig):
    name = "gptq"

    def __init__(
        self,
        spec: GPTQLayerSpec,
        checkpoint_format: str = "gptq",
        modules_to_not_convert: list[str] | None = None,
        dynamic: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        spec.validate()
        self.spec = spec
        self.checkpoint_format = checkpoint_format
        self.modules_to_not_convert = list(modules_to_not_convert or [])
        self.dynamic = dict(dynamic or {})

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GPTQConfig:
        # GPTQModel's own quantize_config.json names it `format`.
        fmt = str(config.get("checkpoint_format") or config.get("format") or "gptq").lower()
        if fmt not in CHECKPOINT_FORMATS:
            raise ValueError(f"GPTQ checkpoint_format {fmt!r} is not supported (choose one of "
                             f"{', '.join(CHECKPOINT_FORMATS)})")
        pack_dtype = str(config.get("pack_dtype") or "int32").replace("torch.", "")
        if pack_dtype != "int32":
            raise ValueError(f"GPTQ pack_dtype {pack_dtype!r} is not supported (int32 only)")
        if config.get("lm_head"):
            raise ValueError("GPTQ checkpoints with a quantized lm_head are not supported")
        try:
            spec = GPTQLayerSpec(
                bits=int(config["bits"]),
                group_size=int(config.get("group_size", -1)),
                desc_act=bool(config.get("desc_act", False)),
                sym=bool(config.get("sym", True)),
                v1_zeros=fmt == "gptq",
            )
        except KeyError as e:
            raise ValueError(f"GPTQ quantization_config lacks {e.args[0]!r}") from e
        dynamic = config.get("dynamic") or {}
        for key, override in dynamic.items():
            if not isinstance(override, dict):
                raise ValueError(f"GPTQ dynamic entry {key!r} must map to a dict")
        return cls(spec, fmt, config.get("modules_to_not_convert"), dynamic)

    def _spec_for(self, name: str) -> GPTQLayerSpec | None:
        """A checkpoint module's spec; None when it is left unquantized. `dynamic` keys are
        regular expressions, "-:" skipping the module and "+:" (or none) overriding."""
        for key, override in self.dynamic.items():
            negative = key.startswith("-:")
            pattern = key[2:] if key[:2] in ("-:", "+:") else key
            if re.match(pattern, name):
                if negative:
                    return None
                fields = {f: override[f] for f in _OVERRIDABLE if f in override}
                spec = GPTQLayerSpec(
                    bits=int(fields.get("bits", self.spec.bits)),
                    group_size=int(fields.get("group_size", self.spec.group_size)),
                    desc_act=bool(fields.get("desc_act", self.spec.desc_act)),
                    sym=bool(fields.get("sym", self.spec.sym)),
                    v1_zeros=self.spec.v1_zeros,
                )
                spec.validate()
                return spec
        return self.spec

    def ignored_modules(self) -> list[str]:
        return self.modules_to_not_convert

    def linear_method(self, layer: nn.Module, prefix: str) -> LinearMethod | None:
        spec = fused_parts_agree(prefix, self._spec_for, "the GPTQ dynamic config")
        return GPTQLinearMethod(spec) if spec is not None else None

    def describe(self) -> str:
        s = self.spec
        group = "per-channel" if s.group_size == -1 else f"group {s.group_size}"
        return (f"gptq ({s.bits}-bit, {group}, {'sym' if s.sym else 'asym'}"
                f"{', desc_act' if s.desc_act else ''}, format {self.checkpoint_format})")



def _plain_g_idx(row0: int, group_size: int):
    """`--load-format dummy`: the g_idx of a checkpoint without act order (each row in its
    own group, row // group_size), so random weights take the kernels' plain path."""

    def fill(data: torch.Tensor) -> None:
        rows = torch.arange(row0, row0 + data.numel(), device=data.device)
        data.copy_(rows // group_size if group_size != -1 else torch.zeros_like(rows))

    return fill

class GPTQLinearMethod(PackedIntLinearMethod):
    method_name = "gptq"
    checkpoint_tensors = ("qweight", "qzeros", "scales", "g_idx")

    def __init__(self, spec: GPTQLayerSpec) -> None:
        self.spec = spec

    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
    ) -> None:
        bits, gs = self.spec.bits, self.spec.group_size
        k, n = input_size_per_partition, sum(output_partition_sizes)
        partitioned = k != input_size
        # Scales split along K with the rows, unless any row may be in any group.
        shard_groups = gs != -1 and not (self.spec.desc_act and partitioned)
        if gs != -1 and input_size % gs != 0:
            raise ValueError(f"GPTQ group_size {gs} does not divide the input dimension "
                             f"{input_size}")
        if shard_groups and k % gs != 0:
            raise ValueError(f"GPTQ group_size {gs} does not divide this rank's input "
                             f"partition {k} (input {input_size}); use another "
                             "--tensor-parallel-size")
        groups = 1 if gs == -1 else (k // gs if shard_groups else math.ceil(input_size / gs))
        for size in output_partition_sizes:
            packed_size(size, bits)  # each fused part must fill whole qzeros words
        factor = pack_factor(bits)
        qweight = nn.Parameter(torch.empty(packed_size(k, bits), n, dtype=torch.int32),
                               requires_grad=False)
        set_weight_attrs(qweight, {"input_dim": 0, "output_dim": 1, "packed_dim": 0,
                                   "packed_factor": factor})
        qzeros = nn.Parameter(torch.empty(groups, packed_size(n, bits), dtype=torch.int32),
                              requires_grad=False)
        set_weight_attrs(qzeros, {"output_dim": 1, "packed_dim": 1, "packed_factor": factor})
        scales = nn.Parameter(torch.empty(groups, n, dtype=torch.float16), requires_grad=False)
        set_weight_attrs(scales, {"output_dim": 1})
        if shard_groups:
            set_weight_attrs(qzeros, {"input_dim": 0})
            set_weight_attrs(scales, {"input_dim": 0})
        g_idx = nn.Parameter(torch.empty(k, dtype=torch.int32), requires_grad=False)
        row0 = layer.tp_rank * k if partitioned else 0  # this rank's first input row
        set_weight_attrs(g_idx, {"input_dim": 0, "same_for_all_shards": True,
                                 "dummy_init": _plain_g_idx(row0, gs)})
        for name, param in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales),
                            ("g_idx", g_idx)):
            layer.register_parameter(name, param)
        layer.gptq_group_offset = layer.tp_rank * groups if shard_groups and partitioned else 0

    def to_canonical(self, layer: nn.Module) -> CanonicalWeights:
        bits = self.spec.bits
        k, n = layer.g_idx.numel(), layer.scales.shape[1]
        groups = layer.scales.shape[0]
        zeros = unpack_int32(layer.qzeros.data, bits, 1, n).float()
        if self.spec.v1_zeros:
            zeros = zeros + 1
        g_idx = layer.g_idx.data.to(torch.int64) - layer.gptq_group_offset
        if g_idx.numel() and (g_idx.min() < 0 or g_idx.max() >= groups):
            raise ValueError(f"GPTQ g_idx references groups outside the {groups} of scales "
                             f"(values {int(g_idx.min())}..{int(g_idx.max())})")
        group_size = k if self.spec.group_size == -1 else self.spec.group_size
        return CanonicalWeights(layer.qweight.data, zeros, layer.scales.data.float(), bits,
                                group_size, g_idx)
