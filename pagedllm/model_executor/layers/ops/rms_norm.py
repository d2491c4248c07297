"""Fused RMSNorm, optionally with the residual add in the same pass (Triton + torch reference).

Numerics follow the HF Llama RMSNorm: the residual sum is rounded to the activation dtype, the
norm is computed in fp32. One program normalizes one row; the whole row sits in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    out_ptr,  # [num_tokens, hidden_size]
    x_ptr,  # [num_tokens, hidden_size]
    residual_ptr,  # [num_tokens, hidden_size], read then overwritten with x + residual
    weight_ptr,  # [hidden_size]
    stride_out,
    stride_x,
    stride_res,
    hidden_size,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden_size
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(residual_ptr + row * stride_res + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(res.dtype)
        tl.store(residual_ptr + row * stride_res + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / hidden_size + eps)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = (xf * inv_rms).to(x_ptr.dtype.element_ty).to(tl.float32) * w
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None):
    hidden_size = x.shape[-1]
    x2 = x.reshape(-1, hidden_size)
    assert x2.stride(-1) == 1 and weight.is_contiguous()
    out = torch.empty_like(x2)
    res2 = x2 if residual is None else residual.view(-1, hidden_size)
    block = triton.next_power_of_2(hidden_size)
    if x2.shape[0] > 0:
        _rms_norm_kernel[(x2.shape[0],)](
            out, x2, res2, weight, out.stride(0), x2.stride(0), res2.stride(0), hidden_size, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block,
            num_warps=min(max(block // 256, 1), 16),
        )  # fmt: skip
    return out.view(x.shape)


def rms_norm(
    x: torch.Tensor,  # [..., hidden_size]
    weight: torch.Tensor,  # [hidden_size]
    eps: float,
) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps) -> [..., hidden_size] in x's dtype."""
    return _launch(x, weight, eps, None)


def fused_add_rms_norm(
    x: torch.Tensor,  # [..., hidden_size]
    residual: torch.Tensor,  # [..., hidden_size], contiguous; overwritten with x + residual
    weight: torch.Tensor,  # [hidden_size]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual); the sum is written into `residual`."""
    assert residual.shape == x.shape and residual.is_contiguous()
    return _launch(x, weight, eps, residual), residual


def rms_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch reference (HF Llama numerics); returns (out, x + residual) with a residual."""
    summed = x if residual is None else x + residual
    xf = summed.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    out = (weight.float() * normed.float()).to(x.dtype)
    return out if residual is None else (out, summed)
