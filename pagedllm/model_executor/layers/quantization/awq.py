"""AWQ checkpoints in AutoAWQ's GEMM layout (`version: gemm`), 4-bit, group 32/64/128 (any
group size dividing the input), with or without zero points.

Tensors of a linear layer with K inputs and N outputs (G = K / group_size groups):
  qweight [K, N / 8] int32 and qzeros [G, N / 8] int32, packed along N with AWQ's
          interleave: nibble i (bits 4i..4i+3) of word c holds column 8c + AWQ_ORDER[i];
  scales  [G, N] fp16, optional bias [N].
w[k, n] = (q[k, n] - z[k // group_size, n]) * s[k // group_size, n]. Without zero points
(`zero_point: false`) the checkpoint has no qzeros and values are offset by 8 (symmetric).

At load the weights are repacked along K (`packed_int`'s canonical form) for the shared
integer GEMM. Tensor parallelism: everything splits along N on column-parallel layers and
along K (qweight) / G (qzeros, scales) on row-parallel ones.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagedllm.model_executor.layers.linear import LinearMethod
from pagedllm.model_executor.layers.quantization import register_quantization_config
from pagedllm.model_executor.layers.quantization.base_config import (
    QuantizationConfig,
)
from pagedllm.model_executor.layers.quantization.int_linear import (
    CanonicalWeights,
    PackedIntLinearMethod,
)
from pagedllm.model_executor.layers.quantization.packed_int import (
    column_chunks,
    pack_int32,
    unpack_int32,
)
from pagedllm.model_executor.layers.utils import set_weight_attrs

# Nibble i of a packed word holds column AWQ_ORDER[i] of its run of 8.
AWQ_ORDER: tuple[int, ...] = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_BITS = 4
_PACK = 32 // AWQ_BITS


def awq_column_order(n: int, device: torch.device | None = None) -> torch.Tensor:
    """[N] index: logical column j of the unpacked nibble stream is nibble order[j]."""
    inverse = torch.empty(_PACK, dtype=torch.int64)
    inverse[torch.tensor(AWQ_ORDER)] = torch.arange(_PACK)
    base = torch.arange(0, n, _PACK).unsqueeze(1)
    return (base + inverse.unsqueeze(0)).reshape(-1).to(device)


def unpack_awq(packed: torch.Tensor, n: int) -> torch.Tensor:
    """[rows, N / 8] AWQ-packed int32 -> [rows, N] values in column order."""
    nibbles = unpack_int32(packed, AWQ_BITS, 1, n)
    return nibbles.index_select(1, awq_column_order(n, packed.device))


@register_quantization_config
class AWQConfig(QuantizationConfig):
    name = "awq"

    def __init__(self, group_size: int, zero_point: bool = True,
                 modules_to_not_convert: list[str] | None = None) -> None:
        if group_size != -1 and group_size <= 0:
            raise ValueError(f"AWQ group_size={group_size} must be positive")
        self.group_size = group_size
        self.zero_point = zero_point
        self.modules_to_not_convert = list(modules_to_not_convert or [])

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> AWQConfig:
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"AWQ version {version!r} is not supported (only the AutoAWQ "
                             "'gemm' layout)")
        bits = int(config.get("bits", config.get("w_bit", AWQ_BITS)))
        if bits != AWQ_BITS:
            raise ValueError(f"AWQ bits={bits} is not supported (the GEMM layout is 4-bit)")
        group = config.get("group_size", config.get("q_group_size"))
        if group is None:
            raise ValueError("AWQ quantization_config lacks 'group_size'")
        return cls(int(group), bool(config.get("zero_point", True)),
                   config.get("modules_to_not_convert"))

    def ignored_modules(self) -> list[str]:
        return self.modules_to_not_convert

    def linear_method(self, layer: nn.Module, prefix: str) -> LinearMethod | None:
        return AWQLinearMethod(self.group_size, self.zero_point)

    def describe(self) -> str:
        return (f"awq (4-bit gemm, group {self.group_size}"
                f"{'' if self.zero_point else ', no zero point'})")


class AWQLinearMethod(PackedIntLinearMethod):
    method_name = "awq"
    checkpoint_tensors = ("qweight", "qzeros", "scales")

    def __init__(self, group_size: int, zero_point: bool) -> None:
        self.group_size = group_size
        self.zero_point = zero_point

    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
    ) -> None:
        k, n, gs = input_size_per_partition, sum(output_partition_sizes), self.group_size
        if gs != -1 and input_size % gs != 0:
            raise ValueError(f"AWQ group_size {gs} does not divide the input dimension "
                             f"{input_size}")
        if gs != -1 and k % gs != 0:
            raise ValueError(f"AWQ group_size {gs} does not divide this rank's input "
                             f"partition {k} (input {input_size}); use another "
                             "--tensor-parallel-size")
        for size in output_partition_sizes:
            if size % _PACK:
                raise ValueError(f"AWQ output partition {size} is not a multiple of {_PACK}")
        if k % _PACK:
            raise ValueError(f"AWQ input partition {k} is not a multiple of {_PACK}")
        groups = 1 if gs == -1 else k // gs
        packed = {"output_dim": 1, "packed_dim": 1, "packed_factor": _PACK}
        grouped = {"input_dim": 0} if gs != -1 else {}
        qweight = nn.Parameter(torch.empty(k, n // _PACK, dtype=torch.int32),
                               requires_grad=False)
        set_weight_attrs(qweight, {"input_dim": 0, **packed})
        layer.register_parameter("qweight", qweight)
        if self.zero_point:
            qzeros = nn.Parameter(torch.empty(groups, n // _PACK, dtype=torch.int32),
                                  requires_grad=False)
            set_weight_attrs(qzeros, {**grouped, **packed})
            layer.register_parameter("qzeros", qzeros)
        scales = nn.Parameter(torch.empty(groups, n, dtype=torch.float16), requires_grad=False)
        set_weight_attrs(scales, {**grouped, "output_dim": 1})
        layer.register_parameter("scales", scales)

    def to_canonical(self, layer: nn.Module) -> CanonicalWeights:
        k, n = layer.qweight.shape[0], layer.scales.shape[1]
        # [K, N / 8] interleaved along N -> [K / 8, N] along K, a few thousand columns at once.
        qweight = torch.cat([
            pack_int32(unpack_awq(layer.qweight.data[:, cols.start // _PACK:cols.stop // _PACK],
                                  cols.stop - cols.start), AWQ_BITS, 0)
            for cols in column_chunks(n)
        ], dim=1)
        if self.zero_point:
            zeros = unpack_awq(layer.qzeros.data, n).float()
        else:
            zeros = torch.full_like(layer.scales.data, 2 ** (AWQ_BITS - 1), dtype=torch.float32)
        group_size = k if self.group_size == -1 else self.group_size
        return CanonicalWeights(qweight, zeros, layer.scales.data.float(),
                                AWQ_BITS, group_size)
