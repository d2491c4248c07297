"""The fp8 W8A8 matmul: quantize activations to e4m3, multiply by an e4m3 weight, rescale.

out[t, n] = (sum_k xq[t, k] * wq[n, k]) * x_scale[t] * w_scale[n]

Decode-sized inputs (at most `gemv_config.FP8_GEMV_MAX_M` tokens, bf16/fp16) skip all of
this on CUDA >= 8.9: `ops/fp8_gemv.py` multiplies the unquantized activations by the e4m3
weight dequantized in registers (weight-only; see `gemv_linear`).

Otherwise, on CUDA with compute capability >= 8.9 (Ada, Hopper) the product runs in
`torch._scaled_mm` (row-wise scales on >= 9.0; on 8.9 unit scales and the rescale after),
with the activations quantized by the Triton kernel. Elsewhere (CPU, older GPUs, shapes
`_scaled_mm` refuses) the same arithmetic is emulated: the activations are quantized
identically and the product of the e4m3 values is taken in fp32, so CPU tests check the
engine's numbers.
"""

from __future__ import annotations

import functools

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
# Floor of a dynamic scale: an all-zero row quantizes to zeros instead of dividing by 0.
MIN_SCALE = 1e-10


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def device_has_fp8_gemm(device: torch.device) -> bool:
    """Whether `_scaled_mm` runs on this device (CUDA, compute capability >= 8.9)."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability(index) >= (8, 9)


def quantize_fp8_ref(
    x: torch.Tensor,  # [num_tokens, hidden]
    scale: torch.Tensor | None = None,  # static: [1] fp32; None: dynamic per token
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch reference of `ops.fp8_quant.quantize_fp8` (same outputs)."""
    xf = x.float()
    if scale is None:
        amax = xf.abs().amax(dim=-1, keepdim=True)  # [num_tokens, 1]
        scale = torch.clamp(amax / FP8_MAX, min=MIN_SCALE)
    q = torch.clamp(xf / scale.float(), -FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dynamic_tensor_scale(x: torch.Tensor) -> torch.Tensor:
    """[1] fp32: one scale for all of x (amax / 448), for dynamic per-tensor schemes."""
    return torch.clamp(x.abs().amax().float() / FP8_MAX, min=MIN_SCALE).reshape(1)


def quantize_activations(
    x: torch.Tensor,  # [num_tokens, hidden]
    input_scale: torch.Tensor | None,  # [1] fp32 static, None dynamic per token
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernel on CUDA >= 8.9 (Triton has no e4m3 below), its torch reference
    elsewhere (identical rounding)."""
    if device_has_fp8_gemm(x.device):
        from pagedllm.model_executor.layers.ops.fp8_quant import quantize_fp8

        return quantize_fp8(x.contiguous() if x.stride(-1) != 1 else x, input_scale)
    return quantize_fp8_ref(x, input_scale)


def quantize_weight_per_channel(
    weight: torch.Tensor,  # [out_features, in_features], any float dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, [out_features] fp32 scales): each output row scaled by amax / 448."""
    wf = weight.float()
    scale = torch.clamp(wf.abs().amax(dim=1) / FP8_MAX, min=MIN_SCALE)  # [out_features]
    q = torch.clamp(wf / scale[:, None], -FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def _scaled_mm_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # cuBLASLt fp8 needs in/out feature counts that are multiples of 16.
    return (
        device_has_fp8_gemm(x.device)
        and weight.shape[0] % 16 == 0
        and weight.shape[1] % 16 == 0
    )


def _rowwise_supported(device: torch.device) -> bool:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability(index) >= (9, 0)


def gemm_scaled_mm(
    xq: torch.Tensor,  # [num_tokens, in] e4m3
    x_scale: torch.Tensor,  # [num_tokens, 1] or [1] fp32
    weight: torch.Tensor,  # [out, in] e4m3, row-major
    w_scale: torch.Tensor,  # [out] fp32
    rowwise: bool,
) -> torch.Tensor:
    """The product through `torch._scaled_mm`: row-wise scales in the epilogue (bf16 out,
    Hopper), or unit scales, fp32 out and the rescale after (Ada)."""
    num_tokens = xq.shape[0]
    if x_scale.numel() != num_tokens or x_scale.dim() != 2:
        x_scale = x_scale.reshape(1, 1).expand(num_tokens, 1).contiguous()
    if rowwise:
        return torch._scaled_mm(
            xq, weight.t(), scale_a=x_scale, scale_b=w_scale.view(1, -1),
            out_dtype=torch.bfloat16,
        )
    one = torch.ones((), dtype=torch.float32, device=xq.device)
    out = torch._scaled_mm(xq, weight.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    return out * x_scale * w_scale.view(1, -1)


def gemm_emulated(
    xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor
) -> torch.Tensor:
    """The same product in fp32 on any device (CPU, GPUs without fp8 matmul)."""
    out = xq.float() @ weight.float().t()  # [num_tokens, out]: exact products, fp32 sums
    return out * x_scale.float().reshape(-1, 1) * w_scale.float().view(1, -1)


# Tests set this to run the fp8 GEMV on CPU tensors under TRITON_INTERPRET=1.
GEMV_ON_CPU = False


def gemv_linear(
    x: torch.Tensor,  # [..., in_features]
    weight: torch.Tensor,  # [out_features, in_features] e4m3
    weight_scale: torch.Tensor,  # [out_features] fp32
    bias: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """x @ dequant(weight).T + bias through the fp8 GEMV when the call is decode-sized
    (at most FP8_GEMV_MAX_M tokens, bf16/fp16, a GPU with e4m3 or `GEMV_ON_CPU`); None
    otherwise, for the caller's W8A8 / dequantizing path. The choice depends on shapes only,
    so it is the same for every replay of a captured CUDA graph."""
    from pagedllm.model_executor.layers.ops.gemv_config import fp8_gemv_max_m

    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if not 0 < x2.shape[0] <= fp8_gemv_max_m() or x.dtype not in (torch.bfloat16, torch.float16):
        return None
    if not (device_has_fp8_gemm(x.device) or (GEMV_ON_CPU and x.device.type == "cpu")):
        return None
    if weight.stride(1) != 1:
        return None
    from pagedllm.model_executor.layers.ops.fp8_gemv import fp8_gemv

    out = fp8_gemv(x2, weight, weight_scale)
    if bias is not None:
        out = out + bias
    return out.view(*lead, weight.shape[0])


def apply_fp8_linear(
    x: torch.Tensor,  # [..., in_features]
    weight: torch.Tensor,  # [out_features, in_features] e4m3
    weight_scale: torch.Tensor,  # [out_features] fp32
    input_scale: torch.Tensor | None,  # [1] fp32 static; None: dynamic per token
    bias: torch.Tensor | None = None,  # [out_features]
) -> torch.Tensor:
    """y = dequant(quant(x)) @ dequant(weight).T + bias, in x's dtype."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] == 0:
        return x.new_empty(*lead, weight.shape[0])
    xq, x_scale = quantize_activations(x2, input_scale)
    if _scaled_mm_ok(x2, weight):
        out = gemm_scaled_mm(xq, x_scale, weight, weight_scale, _rowwise_supported(x.device))
    else:
        out = gemm_emulated(xq, x_scale, weight, weight_scale)
    out = out.to(x.dtype)
    if bias is not None:
        out = out + bias
    return out.view(*lead, weight.shape[0])
