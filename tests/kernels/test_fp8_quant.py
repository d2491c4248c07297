"""The Triton fp8 activation quantization kernel against its torch reference.

Runs on CPU under TRITON_INTERPRET=1 (set below when no GPU is present) at small sizes; the
interpreter divides in IEEE fp32 like torch, so codes and scales must match exactly.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed: Triton kernels are not tested")

from pagedllm.model_executor.layers.ops.fp8_quant import quantize_fp8  # noqa: E402
from pagedllm.model_executor.layers.quantization.fp8_gemm import (  # noqa: E402
    FP8_MAX,
    apply_fp8_linear,
    gemm_emulated,
    gemm_scaled_mm,
    quantize_fp8_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 16), (5, 37), (3, 2100)])  # 2100 > one 2048 block
def test_dynamic_per_token_matches_reference(shape, dtype):
    g = torch.Generator().manual_seed(shape[1])
    x = (torch.randn(shape, generator=g) * torch.logspace(-3, 2, shape[0])[:, None]).to(dtype)
    x[0, -1] = 0.0
    x = x.to(DEVICE)
    q, s = quantize_fp8(x)
    q_ref, s_ref = quantize_fp8_ref(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (shape[0], 1)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    assert torch.equal(q.float(), q_ref.float())
    # Each row's largest magnitude lands on the top code.
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((shape[0],), FP8_MAX,
                                                               device=DEVICE))


def test_all_zero_rows_quantize_to_zero():
    x = torch.zeros(2, 24, device=DEVICE)
    q, s = quantize_fp8(x)
    assert torch.equal(q.float(), torch.zeros_like(x)) and (s > 0).all()


@pytest.mark.parametrize("shape", [(4, 40), (2, 2100)])
def test_static_scale_matches_reference_and_saturates(shape):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=g) * 3).to(DEVICE)
    x[0, 0] = 1e4  # beyond 448 * scale: clamps to the top code
    scale = torch.tensor([0.01], device=DEVICE)
    q, s = quantize_fp8(x, scale)
    q_ref, _ = quantize_fp8_ref(x, scale)
    assert s is scale
    assert torch.equal(q.float(), q_ref.float())
    assert q[0, 0].float().item() == FP8_MAX


def test_fp8_linear_is_dequantized_product():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 32, generator=g)
    w = torch.randn(48, 32, generator=g).to(torch.float8_e4m3fn)
    ws = torch.rand(48, generator=g) + 0.1
    bias = torch.randn(48, generator=g)
    out = apply_fp8_linear(x, w, ws, None, bias)
    xq, xs = quantize_fp8_ref(x.reshape(-1, 32))
    want = (xq.float() * xs) @ (w.float() * ws[:, None]).t() + bias
    assert out.shape == (3, 5, 48)
    torch.testing.assert_close(out.reshape(-1, 48), want, rtol=1e-5, atol=1e-5)
    assert apply_fp8_linear(x[:0], w, ws, None).shape == (0, 5, 48)


@pytest.mark.parametrize("rowwise", [True, False], ids=["hopper-rowwise", "ada-unit-scales"])
@pytest.mark.parametrize("static", [False, True])
def test_scaled_mm_call_matches_emulation(rowwise, static):
    """The GPU GEMM's `torch._scaled_mm` call (scale shapes, layouts, rescale), run by
    torch's CPU implementation, against the fp32 emulation."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 64, generator=g)
    w = torch.randn(32, 64, generator=g).to(torch.float8_e4m3fn)
    ws = torch.rand(32, generator=g) + 0.1
    xq, xs = quantize_fp8_ref(x, torch.tensor([0.01]) if static else None)
    out = gemm_scaled_mm(xq, xs, w, ws, rowwise)
    want = gemm_emulated(xq, xs, w, ws)
    assert out.dtype == (torch.bfloat16 if rowwise else torch.float32)
    torch.testing.assert_close(out.float(), want, rtol=1e-2 if rowwise else 1e-5, atol=1e-2)
