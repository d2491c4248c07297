"""The runtime shared by the weight-only integer methods (GPTQ, AWQ).

Each method creates its checkpoint's tensors and, after loading, converts them to the
canonical form of `packed_int` (K-packed qweight, true zero points, scales, optional g_idx).
`finalize` then lays the layer out for the device it runs on:

- CUDA, 2/4/8-bit: `layers/ops/int_gemv.py` (4/8-bit GEMV, decode batches up to 16 rows),
  `layers/ops/int_gemm.py` (the fused Triton GEMM above that, dequantize + cuBLAS for large
  prefills), all three streaming the same layout. Act-order (`g_idx`) rows
  are sorted by group at load (qweight repacked, activations gathered by the same
  permutation per call), so groups become contiguous and the kernel needs no g_idx unless the
  sorted groups are ragged (a TP shard of an act-order layer).
- CPU, and 3-bit on CUDA: the weight is dequantized once at load to the model dtype and the
  layer runs `F.linear` (exact up to that final rounding; 16-bit memory).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.model_executor.layers.linear import LinearMethod
from pagedllm.model_executor.layers.quantization.packed_int import (
    column_chunks,
    dequantize,
    pack_int32,
    unpack_int32,
)

logger = logging.getLogger(__name__)

KERNEL_BITS: tuple[int, ...] = (2, 4, 8)  # the Triton kernel's widths (ops/int_gemm.py)
# Tests set this to run the Triton path on CPU tensors under TRITON_INTERPRET=1.
KERNEL_ON_CPU = False
_logged_dense_fallback: set[int] = set()


@dataclass(slots=True)
class CanonicalWeights:
    """See `packed_int`'s module docstring; every tensor on the layer's device."""

    qweight: torch.Tensor  # [K * bits / 32, N] int32
    zeros: torch.Tensor  # [G, N] float32
    scales: torch.Tensor  # [G, N] float16 / float32
    bits: int
    group_size: int  # rows per group (K for one group)
    g_idx: torch.Tensor | None = None  # [K] int64


def trivial_groups(g_idx: torch.Tensor, group_size: int) -> bool:
    """Whether g_idx is exactly row // group_size (no act order)."""
    expected = torch.arange(g_idx.numel(), device=g_idx.device) // group_size
    return bool(torch.equal(g_idx.to(torch.int64), expected))


def _replace(layer: nn.Module, name: str, tensor: torch.Tensor) -> None:
    if name in layer._parameters:
        delattr(layer, name)
    layer.register_parameter(name, nn.Parameter(tensor, requires_grad=False))


class PackedIntLinearMethod(LinearMethod):
    """Base of GPTQ/AWQ linear methods: `to_canonical` is the format's business, the rest is
    shared. `checkpoint_tensors` names the parameters the format's `create_weights` made."""

    method_name: str = ""
    checkpoint_tensors: tuple[str, ...] = ()

    def to_canonical(self, layer: nn.Module) -> CanonicalWeights:
        raise NotImplementedError

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        canonical = self.to_canonical(layer)
        for name in self.checkpoint_tensors:
            if name in layer._parameters:
                delattr(layer, name)
        finalize(layer, canonical, self.method_name)

    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if "weight" in layer._parameters:
            return F.linear(x, layer.weight, bias)
        from pagedllm.model_executor.layers.ops.int_gemm import int_matmul

        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [num_tokens, K]
        perm = layer._parameters.get("int_perm")
        if perm is not None:
            x2 = x2.index_select(1, perm)
        out = int_matmul(x2, layer.int_qweight, layer.int_zeros, layer.int_scales,
                         layer.int_bits, layer.int_group_size, layer._parameters.get("int_g_idx"))
        out = out.reshape(*shape[:-1], out.shape[-1])
        return out + bias if bias is not None else out


def finalize(layer: nn.Module, cw: CanonicalWeights, method_name: str) -> None:
    """Lays the canonical weights out for the layer's device (see the module docstring)."""
    device = cw.qweight.device
    g_idx = cw.g_idx
    if g_idx is not None and trivial_groups(g_idx, cw.group_size):
        g_idx = None
    if (device.type != "cuda" and not KERNEL_ON_CPU) or cw.bits not in KERNEL_BITS:
        if device.type == "cuda" and cw.bits not in _logged_dense_fallback:
            _logged_dense_fallback.add(cw.bits)
            logger.warning("%s %d-bit weights have no Triton kernel; they are dequantized to "
                           "%s at load (16-bit memory and speed)", method_name, cw.bits,
                           layer.params_dtype)
        w = dequantize(cw.qweight, cw.zeros, cw.scales, cw.bits, cw.group_size, g_idx)
        _replace(layer, "weight", w.t().to(layer.params_dtype).contiguous())  # [N, K]
        return
    from pagedllm.model_executor.layers.ops.split_k import prepare

    prepare(device)
    kernel = kernel_layout(cw)
    for name in ("qweight", "zeros", "scales", "g_idx", "perm"):
        tensor = getattr(kernel, name)
        if tensor is not None:
            _replace(layer, f"int_{name}", tensor)
    layer.int_bits = cw.bits
    layer.int_group_size = cw.group_size


@dataclass(slots=True)
class KernelWeights:
    """The Triton GEMM's operands (layout in `layers/ops/int_gemm.py`)."""

    qweight: torch.Tensor  # [K * bits / 32, N] int32, rows in `perm` order
    zeros: torch.Tensor  # [G, N] fp16
    scales: torch.Tensor  # [G, N] fp16
    g_idx: torch.Tensor | None  # [K] int32 of the permuted rows, None when contiguous
    perm: torch.Tensor | None  # [K] int64: the kernel reads x[:, perm]


def kernel_layout(cw: CanonicalWeights) -> KernelWeights:
    """Sorts act-order rows by group (repacking qweight) so groups are contiguous."""
    qweight, g_idx, perm = cw.qweight, cw.g_idx, None
    if g_idx is not None and trivial_groups(g_idx, cw.group_size):
        g_idx = None
    if g_idx is not None:
        perm = torch.argsort(g_idx, stable=True)
        k = g_idx.numel()
        if torch.equal(perm, torch.arange(k, device=perm.device)):
            perm = None  # already sorted (groups uneven or not row // size): no gather
    if perm is not None:
        qweight = torch.cat([
            pack_int32(unpack_int32(qweight[:, cols], cw.bits, 0, k)[perm], cw.bits, 0)
            for cols in column_chunks(qweight.shape[1])
        ], dim=1)
        g_idx = g_idx[perm]
        g_idx = None if trivial_groups(g_idx, cw.group_size) else g_idx.to(torch.int32)
    # Zero points are small integers, exact in fp16; scales keep the checkpoint's fp16.
    return KernelWeights(qweight.contiguous(), cw.zeros.to(torch.float16).contiguous(),
                         cw.scales.to(torch.float16).contiguous(),
                         g_idx.contiguous() if g_idx is not None else None, perm)
