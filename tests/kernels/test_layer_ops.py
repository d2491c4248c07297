"""Triton layer kernels (RMSNorm, rotary, SiLU-and-mul) against their torch references.

Runs on CPU under TRITON_INTERPRET=1 (set below when no GPU is present) at small sizes.
Note: the interpreter rounds fp32 -> bf16 toward zero while torch rounds to nearest, so bf16
results are compared with a tolerance, never bit for bit.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed: Triton kernels are not tested")

from pagedllm.model_executor.layers.ops.activation import (  # noqa: E402
    silu_and_mul,
    silu_and_mul_ref,
)
from pagedllm.model_executor.layers.ops.rms_norm import (  # noqa: E402
    fused_add_rms_norm,
    rms_norm,
    rms_norm_ref,
)
from pagedllm.model_executor.layers.ops.rotary import (  # noqa: E402
    rotary_embedding,
    rotary_embedding_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm()).item()


def _randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [64, 100])
def test_rms_norm(dtype, hidden):
    x = _randn(7, hidden, dtype=dtype, seed=hidden) * 3
    w = _randn(hidden, dtype=dtype, seed=1)
    out = rms_norm(x, w, 1e-6)
    assert out.shape == x.shape and out.dtype == dtype
    assert _rel_err(out, rms_norm_ref(x, w, 1e-6)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_add_rms_norm(dtype):
    x = _randn(2, 5, 64, dtype=dtype, seed=2)
    res = _randn(2, 5, 64, dtype=dtype, seed=3)
    w = _randn(64, dtype=dtype, seed=4)
    ref_out, ref_sum = rms_norm_ref(x, w, 1e-5, residual=res)
    out, new_res = fused_add_rms_norm(x, res.clone(), w, 1e-5)
    assert _rel_err(out, ref_out) < TOL[dtype]
    assert _rel_err(new_res, ref_sum) < TOL[dtype]
    # The sum really lands in the residual buffer passed in.
    buf = res.clone()
    fused_add_rms_norm(x, buf, w, 1e-5)
    assert _rel_err(buf, ref_sum) < TOL[dtype]


def test_rms_norm_reference_matches_definition():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 16, dtype=torch.float64, generator=g)
    w = torch.randn(16, dtype=torch.float64, generator=g)
    expect = w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)
    # The reference computes in fp32 whatever the input dtype (HF's numerics): compare at
    # fp32 precision (unseeded fp64 tolerances failed now and then on rounding alone).
    torch.testing.assert_close(rms_norm_ref(x, w, 1e-6), expect, rtol=1e-5, atol=1e-6)


def _cos_sin(max_pos: int, rotary_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    freqs = torch.outer(torch.arange(max_pos).float(), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(DEVICE)  # [max_pos, rotary_dim]


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotary_dim", [64, 32])  # 32: partial rotary, dims 32.. untouched
def test_rotary(is_neox, dtype, rotary_dim):
    num_tokens, num_heads, num_kv_heads, head_size = 6, 6, 2, 64
    cache = _cos_sin(100, rotary_dim)
    positions = torch.tensor([0, 5, 99, 17, 17, 42], device=DEVICE)
    # q and k as slices of one fused QKV buffer, as the attention layer produces them.
    qkv = _randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_size, dtype=dtype, seed=5)
    q_size, kv_size = num_heads * head_size, num_kv_heads * head_size
    ref = qkv.clone()
    q, k = qkv[:, :q_size], qkv[:, q_size : q_size + kv_size]
    rq, rk = ref[:, :q_size], ref[:, q_size : q_size + kv_size]
    rotary_embedding(positions, q, k, head_size, cache, is_neox)
    rotary_embedding_ref(positions, rq, rk, head_size, cache, is_neox)
    assert _rel_err(q, rq) < TOL[dtype] and _rel_err(k, rk) < TOL[dtype]
    # V and the unrotated dims are untouched; position 0 is the identity.
    assert torch.equal(qkv[:, q_size + kv_size :], ref[:, q_size + kv_size :])
    orig = _randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_size, dtype=dtype, seed=5)
    if rotary_dim < head_size:
        heads = qkv[:, :q_size].view(num_tokens, num_heads, head_size)
        orig_heads = orig[:, :q_size].view(num_tokens, num_heads, head_size)
        assert torch.equal(heads[..., rotary_dim:], orig_heads[..., rotary_dim:])
    torch.testing.assert_close(qkv[0].float(), orig[0].float(), rtol=1e-2, atol=1e-2)
    assert not torch.allclose(qkv[1:].float(), orig[1:].float())


def test_rotary_reference_preserves_norm_and_relative_angle():
    # A rotation keeps each pair's norm, and <R(p)q, R(p+d)k> depends only on d.
    cache = _cos_sin(64, 64).cpu()
    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, 64, generator=g)
    k = torch.randn(1, 64, generator=g)
    dots = []
    for p in (3, 20):
        qq, kk = q.clone(), k.clone()
        rotary_embedding_ref(torch.tensor([p]), qq, kk.clone(), 64, cache)
        kk2, qq2 = k.clone(), q.clone()
        rotary_embedding_ref(torch.tensor([p + 5]), qq2, kk2, 64, cache)
        torch.testing.assert_close(qq.norm(), q.norm())
        dots.append((qq * kk2).sum())
    torch.testing.assert_close(dots[0], dots[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 1500])  # 1500: two column blocks, ragged tail
def test_silu_and_mul(dtype, d):
    x = _randn(3, 2, 2 * d, dtype=dtype, seed=d) * 4
    out = silu_and_mul(x)
    assert out.shape == (3, 2, d)
    assert _rel_err(out, silu_and_mul_ref(x.double())) < TOL[dtype]


def test_silu_and_mul_reference_matches_definition():
    x = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    g, u = x[:, :4], x[:, 4:]
    torch.testing.assert_close(silu_and_mul_ref(x), g / (1 + torch.exp(-g)) * u)
