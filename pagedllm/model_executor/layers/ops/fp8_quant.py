"""Activation quantization to fp8 e4m3 (Triton kernel + torch reference).

Dynamic per-token: each row gets scale = max(amax(|row|) / 448, MIN_SCALE) and is stored as
clamp(row / scale, -448, 448) rounded to e4m3. Static: one given scale for every row. Both
compute in fp32 and divide (never multiply by a reciprocal), so the kernel and its torch
reference (`quantization.fp8_gemm.quantize_fp8_ref`, torch-only so CPU installs need no
triton) round the same values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.attention.ops.fp8_round import round_to_e4m3_grid
from pagedllm.model_executor.layers.quantization.fp8_gemm import FP8_DTYPE


@triton.jit
def _quant_fp8_kernel(
    x_ptr,  # [num_tokens, hidden]
    q_ptr,  # [num_tokens, hidden] fp8
    scale_ptr,  # dynamic: [num_tokens] fp32 out; static: [1] fp32 in
    hidden,
    stride_x,
    stride_q,
    DYNAMIC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    if DYNAMIC:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, hidden, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(x_row + cols, mask=cols < hidden, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.max(amax, axis=0) / 448.0, 1e-10)
        tl.store(scale_ptr + row, scale)
    else:
        scale = tl.load(scale_ptr).to(tl.float32)
    for start in range(0, hidden, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < hidden
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        q = round_to_e4m3_grid(tl.clamp(x / scale, -448.0, 448.0))
        tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=mask)


def quantize_fp8(
    x: torch.Tensor,  # [num_tokens, hidden], last dim contiguous
    scale: torch.Tensor | None = None,  # static: [1] fp32; None: dynamic per token
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [num_tokens, hidden] e4m3, scales): scales is [num_tokens, 1] fp32 when dynamic,
    the given [1] scale when static. x ≈ q * scales."""
    assert x.dim() == 2 and x.stride(-1) == 1
    num_tokens, hidden = x.shape
    q = torch.empty(num_tokens, hidden, dtype=FP8_DTYPE, device=x.device)
    dynamic = scale is None
    if dynamic:
        scale = torch.empty(num_tokens, 1, dtype=torch.float32, device=x.device)
    if num_tokens > 0:
        block = min(triton.next_power_of_2(hidden), 2048)
        _quant_fp8_kernel[(num_tokens,)](
            x, q, scale, hidden, x.stride(0), q.stride(0), DYNAMIC=dynamic, BLOCK=block,
            num_warps=4 if block <= 1024 else 8,
        )
    return q, scale
