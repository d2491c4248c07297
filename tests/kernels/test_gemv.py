"""The small-M GEMV kernels (int4/int8 packed weights, fp8 e4m3) against torch references.

Runs on CPU under TRITON_INTERPRET=1 (set below when no GPU is present) at small odd shapes:
each group size 32/64/128 and one group per column, act-order (rows sorted at load) and
ragged g_idx, M = 1, 3, 16, the FMA and both tensor-core variants, split-K, the prefetching
loop, bf16 and fp16;
the same kernel on 16-bit weights (`dense_gemv`); plus the dispatch of the linear methods and
the tuned-config table.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed: Triton kernels are not tested")

from pagedllm.model_executor.layers import utils as layer_utils  # noqa: E402
from pagedllm.model_executor.layers.ops import fp8_gemv as fp8_gemv_mod  # noqa: E402
from pagedllm.model_executor.layers.ops import gemv_config, int_gemv, split_k  # noqa: E402
from pagedllm.model_executor.layers.ops.fp8_gemv import (  # noqa: E402
    dense_gemv,
    fp8_gemv,
    fp8_gemv_ref,
)
from pagedllm.model_executor.layers.ops.gemv_config import GemvConfig  # noqa: E402
from pagedllm.model_executor.layers.ops.int_gemm import int_matmul  # noqa: E402
from pagedllm.model_executor.layers.quantization import fp8_gemm  # noqa: E402
from pagedllm.model_executor.layers.quantization.int_linear import (  # noqa: E402
    CanonicalWeights,
    kernel_layout,
)
from pagedllm.model_executor.layers.quantization.packed_int import (  # noqa: E402
    dequantize,
    pack_int32,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FMA = GemvConfig(block_n=32, block_k=64, split_k=0, num_warps=4, num_stages=1)
FMA_PREFETCH = GemvConfig(32, 64, 2, 4, 1, prefetch=True)  # split 2: blocks past k_end masked
DOT = GemvConfig(block_n=32, block_k=128, split_k=1, num_warps=4, num_stages=1, use_dot=True,
                 prefetch=True)
DOT_SWAP = GemvConfig(32, 128, 2, 4, 1, use_dot=True, swap_ab=True)
INPLACE = GemvConfig(32, 64, 2, 4, 1, inplace=True)  # planes unpacked in place (one row)


def _canonical(k: int, n: int, bits: int, group_size: int, order: str, seed: int):
    """order: "none", "act" (shuffled groups, sorted at load) or "ragged" (a TP shard's)."""
    gen = torch.Generator().manual_seed(seed)
    groups = -(-k // group_size)
    q = torch.randint(0, 2**bits, (k, n), generator=gen)
    zeros = torch.randint(0, 2**bits, (groups, n), generator=gen).float()
    scales = (torch.rand(groups, n, generator=gen) * 0.05 + 0.01).half().float()
    g_idx = None
    if order == "act":
        g_idx = (torch.arange(k) // group_size)[torch.randperm(k, generator=gen)]
    elif order == "ragged":
        g_idx = torch.randint(0, groups, (k,), generator=gen)
    return CanonicalWeights(pack_int32(q, bits, 0).to(DEVICE), zeros.to(DEVICE),
                            scales.to(DEVICE), bits, group_size,
                            g_idx.to(DEVICE) if g_idx is not None else None)


def _rel_err(out: torch.Tensor, exact: torch.Tensor) -> float:
    assert torch.isfinite(out).all()
    out, exact = out.double(), exact.double()
    return ((out - exact).norm() / exact.norm()).item()


# bf16 output: one rounding (the interpreter truncates) ~ 2^-8 relative; fp16: 2^-11.
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("bits,group_size,order,m,config,dtype", [
    (4, 32, "none", 1, FMA_PREFETCH, torch.bfloat16),
    (4, 64, "ragged", 1, GemvConfig(32, 64, 2, 4, 1), torch.bfloat16),
    (4, 128, "none", 16, GemvConfig(32, 128, 2, 4, 1, use_dot=True), torch.bfloat16),
    (4, 128, "act", 3, DOT_SWAP, torch.float16),
    (4, 32, "none", 16, DOT, torch.bfloat16),  # groups smaller than the block: dequantized
    (4, 256, "none", 2, FMA, torch.float16),  # one group per column (group_size -1)
    (4, 32, "ragged", 3, GemvConfig(32, 128, 2, 4, 1), torch.bfloat16),  # 3 of 4 FMA rows
    (8, 64, "none", 1, FMA, torch.bfloat16),
    (4, 64, "none", 1, INPLACE, torch.bfloat16),  # one group per K block
    (4, 32, "none", 1, INPLACE, torch.float16),  # groups smaller than the block: per word
    (4, 64, "ragged", 1, INPLACE, torch.bfloat16),  # g_idx: the shifting form
    (8, 32, "none", 1, GemvConfig(32, 64, 2, 4, 1, prefetch=True, inplace=True), torch.bfloat16),
    (4, 128, "none", 2, INPLACE, torch.bfloat16),  # two rows: the flag does not apply
    (8, 128, "ragged", 16, DOT_SWAP, torch.bfloat16),
    (8, 128, "none", 3, DOT, torch.float16),
])
def test_int_gemv_matches_reference(bits, group_size, order, m, config, dtype) -> None:
    k, n = 256, 40  # N not a multiple of the block
    cw = _canonical(k, n, bits, group_size, order, seed=bits * 1000 + group_size + m)
    kw = kernel_layout(cw)
    assert (kw.g_idx is not None) == (order == "ragged")
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(DEVICE, dtype)
    exact = x.double() @ dequantize(cw.qweight, cw.zeros, cw.scales, bits, group_size,
                                    cw.g_idx).double()
    xk = x.index_select(1, kw.perm) if kw.perm is not None else x
    out = int_gemv.int_gemv(xk, kw.qweight, kw.zeros, kw.scales, bits, group_size, kw.g_idx,
                            config)
    assert out.dtype == dtype and out.shape == (m, n)
    assert _rel_err(out, exact) < TOLERANCE[dtype]
    # Every split re-armed its tile's arrival counter for the next launch.
    counters = split_k._LOCKS.get((x.device.type, x.device.index))
    assert counters is None or not counters.any()


def test_int_matmul_takes_the_gemv_up_to_the_threshold(monkeypatch) -> None:
    cw = _canonical(128, 24, 4, 64, "none", seed=5)
    kw = kernel_layout(cw)
    calls: list[int] = []
    real = int_gemv.int_gemv
    monkeypatch.setattr(int_gemv, "int_gemv",
                        lambda x, *a, **kw_: calls.append(x.shape[0]) or real(x, *a, **kw_))
    monkeypatch.setattr(gemv_config, "INT_GEMV_MAX_M", 2)
    w = dequantize(cw.qweight, cw.zeros, cw.scales, 4, 64).double()
    for m in (2, 3):
        x = torch.randn(m, 128, generator=torch.Generator().manual_seed(m)).to(DEVICE,
                                                                              torch.bfloat16)
        out = int_matmul(x, kw.qweight, kw.zeros, kw.scales, 4, 64)
        assert _rel_err(out, x.double() @ w) < 1e-2
    assert calls == [2]  # 3 rows went to the fused GEMM
    # fp32 activations keep the fused GEMM (the GEMV is 16-bit only).
    assert not int_gemv.gemv_supported(torch.zeros(1, 128), 4, 64)


@pytest.mark.parametrize("m,config,dtype", [
    (1, GemvConfig(32, 64, 0, 4, 1, prefetch=True), torch.bfloat16),
    (3, GemvConfig(32, 64, 2, 4, 1, use_dot=True, prefetch=True), torch.bfloat16),
    (16, GemvConfig(16, 64, 3, 4, 1, use_dot=True, swap_ab=True), torch.float16),
    (3, GemvConfig(16, 64, 2, 8, 1), torch.float16),  # FMA, 3 of 4 accumulators
])
def test_fp8_gemv_matches_reference(m, config, dtype) -> None:
    k, n = 200, 40  # K not a multiple of the block
    gen = torch.Generator().manual_seed(m)
    q, s = fp8_gemm.quantize_weight_per_channel(torch.randn(n, k, generator=gen))
    q, s = q.to(DEVICE), s.to(DEVICE)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    exact = x.double() @ (q.double() * s.double()[:, None]).t()
    out = fp8_gemv(x, q, s, config)
    assert out.dtype == dtype and out.shape == (m, n)
    assert _rel_err(out, exact) < TOLERANCE[dtype]
    assert _rel_err(fp8_gemv_ref(x, q, s), exact) < TOLERANCE[dtype]


def test_fp8_linear_uses_the_weight_only_gemv_for_decode(monkeypatch) -> None:
    monkeypatch.setattr(fp8_gemm, "GEMV_ON_CPU", DEVICE == "cpu")
    gen = torch.Generator().manual_seed(3)
    q, s = fp8_gemm.quantize_weight_per_channel(torch.randn(24, 64, generator=gen))
    q, s = q.to(DEVICE), s.to(DEVICE)
    bias = torch.randn(24, generator=gen).to(DEVICE, torch.bfloat16)
    x = torch.randn(2, 3, 64, generator=gen).to(DEVICE, torch.bfloat16)  # 6 tokens
    out = fp8_gemm.gemv_linear(x, q, s, bias)
    exact = x.double() @ (q.double() * s.double()[:, None]).t() + bias.double()
    assert out.shape == (2, 3, 24) and _rel_err(out, exact) < 1e-2
    # Past the threshold, or in fp32, the caller's W8A8 path runs instead.
    big = torch.randn(gemv_config.FP8_GEMV_MAX_M + 1, 64).to(DEVICE, torch.bfloat16)
    assert fp8_gemm.gemv_linear(big, q, s) is None
    assert fp8_gemm.gemv_linear(x.float(), q, s) is None
    monkeypatch.setenv("PAGEDLLM_FP8_GEMV_MAX_M", "0")  # off, for A/B runs
    assert fp8_gemm.gemv_linear(x, q, s) is None
    monkeypatch.setenv("PAGEDLLM_FP8_GEMV_MAX_M", "33")
    with pytest.raises(ValueError, match="PAGEDLLM_FP8_GEMV_MAX_M"):
        fp8_gemm.gemv_linear(x, q, s)


@pytest.mark.parametrize("m,config,dtype", [
    (1, GemvConfig(32, 64, 0, 4, 1), torch.bfloat16),
    (1, GemvConfig(16, 64, 3, 4, 1, prefetch=True), torch.float16),  # split, masked tail
    (2, GemvConfig(32, 128, 2, 8, 1), torch.bfloat16),
    (3, GemvConfig(32, 64, 2, 4, 1, use_dot=True, swap_ab=True), torch.bfloat16),
])
def test_dense_gemv_matches_reference(m, config, dtype) -> None:
    k, n = 200, 40  # K not a multiple of the block, N not of BLOCK_N
    gen = torch.Generator().manual_seed(10 + m)
    w = torch.randn(n, k, generator=gen).to(DEVICE, dtype)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    out = dense_gemv(x, w, config)
    assert out.dtype == dtype and out.shape == (m, n)
    assert _rel_err(out, x.double() @ w.double().t()) < TOLERANCE[dtype]
    with pytest.raises(ValueError, match="not x's"):
        dense_gemv(x, w.float(), config)


def test_dense_linear_takes_the_gemv_only_where_tuned(monkeypatch) -> None:
    monkeypatch.setattr(layer_utils, "DENSE_GEMV_ON_CPU", DEVICE == "cpu")
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(24, 64, generator=gen).to(DEVICE, torch.bfloat16)
    bias = torch.randn(24, generator=gen).to(DEVICE, torch.bfloat16)
    x = torch.randn(1, 64, generator=gen).to(DEVICE, torch.bfloat16)
    calls = []
    real = fp8_gemv_mod.dense_gemv
    monkeypatch.setattr(fp8_gemv_mod, "dense_gemv",
                        lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    exact = x.double() @ w.double().t() + bias.double()
    # No tuned entry for the shape: cuBLAS / F.linear.
    assert _rel_err(layer_utils.dense_linear(x, w, bias), exact) < 1e-2 and calls == []
    monkeypatch.setitem(gemv_config.TUNED, ("bf16", 1, 24, 64), GemvConfig(16, 64, 2, 4, 1))
    out = layer_utils.dense_linear(x, w, bias)
    assert calls == [1] and _rel_err(out, exact) < 1e-2
    # Past DENSE_GEMV_MAX_M rows, in fp32, or for a shape of another M bucket: F.linear.
    x3 = torch.randn(3, 64, generator=gen).to(DEVICE, torch.bfloat16)
    assert layer_utils.dense_linear(x3, w).shape == (3, 24)
    assert layer_utils.dense_linear(x.float(), w.float()).dtype == torch.float32
    assert layer_utils.dense_linear(torch.cat([x, x]), w).shape == (2, 24)
    assert calls == [1]
    monkeypatch.setenv("PAGEDLLM_DENSE_GEMV_MAX_M", "0")  # off, for A/B runs
    assert _rel_err(layer_utils.dense_linear(x, w, bias), exact) < 1e-2 and calls == [1]


def test_tuned_table_and_json_override(tmp_path, monkeypatch) -> None:
    assert [gemv_config.m_bucket(m) for m in (1, 2, 3, 9, 16, 40)] == [1, 2, 4, 16, 16, 32]
    assert not gemv_config.lookup("int4", 1, 4096, 4096).use_dot
    assert gemv_config.lookup("fp8", 8, 4096, 4096).use_dot
    tuned = GemvConfig(256, 128, 3, 8, 2)
    monkeypatch.setitem(gemv_config.TUNED, ("int4", 4, 6144, 4096), tuned)
    assert gemv_config.lookup("int4", 3, 6144, 4096) == tuned
    path = tmp_path / "gemv.json"
    row = GemvConfig(64, 256, 2, 4, 4, use_dot=True, swap_ab=True)
    path.write_text(json.dumps([{"kind": "int4", "m": 4, "n": 6144, "k": 4096,
                                 "config": row.to_json()}]))
    monkeypatch.setenv("PAGEDLLM_GEMV_CONFIG", str(path))
    assert gemv_config.lookup("int4", 4, 6144, 4096) == row
    # the file overrides its rows only; a shape in neither falls back to the defaults
    assert gemv_config.lookup("int4", 4, 4096, 4096) == gemv_config.TUNED["int4", 4, 4096, 4096]
    assert gemv_config.lookup("int4", 4, 11008, 4096) == gemv_config.default_config("int4", 4)
    # Splits: the config's when set, else about four programs per SM, never past K blocks.
    assert gemv_config.split_for(3, 128, 10, 4096, torch.device("cpu")) == 3
    assert gemv_config.split_for(0, 128, 1, 512, torch.device("cpu")) == 1
    assert gemv_config.split_for(0, 128, 1, 4096, torch.device("cpu")) == 4  # 4 / SM (1 here)
    assert gemv_config.split_for(0, 128, 2, 4096, torch.device("cpu"), no_split_from=2) == 1
