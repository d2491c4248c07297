"""The Triton weight-only int GEMM against its torch reference (`packed_int.int_linear_ref`).

Runs on CPU under TRITON_INTERPRET=1 (set below when no GPU is present) at small odd shapes:
every kernel width, group sizes that do and do not align with the K block, act-order g_idx
(through the load-time row sort of `int_linear.kernel_layout`), and split-K.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed: Triton kernels are not tested")

from pagedllm.model_executor.layers.ops import split_k  # noqa: E402
from pagedllm.model_executor.layers.ops.int_gemm import (  # noqa: E402
    GemmConfig,
    choose_config,
    int_dequant,
    int_gemm,
    int_matmul,
)
from pagedllm.model_executor.layers.quantization.int_linear import (  # noqa: E402
    CanonicalWeights,
    kernel_layout,
)
from pagedllm.model_executor.layers.quantization.packed_int import (  # noqa: E402
    dequantize,
    int_linear_ref,
    pack_int32,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = GemmConfig(block_m=16, block_n=32, block_k=32, split_k=1, num_warps=4, num_stages=1)


def _canonical(k: int, n: int, bits: int, group_size: int, act_order: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    groups = -(-k // group_size)
    q = torch.randint(0, 2**bits, (k, n), generator=gen)
    zeros = torch.randint(0, 2**bits, (groups, n), generator=gen).float()
    scales = (torch.rand(groups, n, generator=gen) * 0.05 + 0.01).half().float()
    g_idx = None
    if act_order:
        g_idx = torch.arange(k) // group_size
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    return CanonicalWeights(pack_int32(q, bits, 0).to(DEVICE), zeros.to(DEVICE),
                            scales.to(DEVICE), bits, group_size,
                            g_idx.to(DEVICE) if g_idx is not None else None)


def _run(cw: CanonicalWeights, x: torch.Tensor, config: GemmConfig | None,
         unpack: str = "gather") -> torch.Tensor:
    kw = kernel_layout(cw)
    xk = x.index_select(1, kw.perm) if kw.perm is not None else x
    return int_gemm(xk, kw.qweight, kw.zeros, kw.scales, cw.bits, cw.group_size, kw.g_idx,
                    config, unpack)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size,act_order", [(32, False), (64, True), (96, False),
                                                  (48, True), (160, False)])
def test_matches_reference_fp32(bits: int, group_size: int, act_order: bool) -> None:
    k, n, m = 192, 40, 5  # N, M not multiples of the blocks
    if group_size == 160:
        k = 160  # one group over the whole input (GPTQ group_size -1)
    cw = _canonical(k, n, bits, group_size, act_order, seed=bits * 100 + group_size)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ref = int_linear_ref(x, cw.qweight, cw.zeros, cw.scales, bits, group_size, cw.g_idx)
    assert _rel_err(_run(cw, x, SMALL), ref) < 1e-5
    # The other unpack variants: every group layout at 4 bits, the per-row one at 2 and 8.
    others = ("reshape", "planes") if bits == 4 else ("reshape", "planes") * (group_size == 48)
    for unpack in others:
        assert _rel_err(_run(cw, x, SMALL, unpack), ref) < 1e-5, unpack


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_reference_half(dtype: torch.dtype) -> None:
    cw = _canonical(128, 48, 4, 32, True, seed=7)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    ref = int_linear_ref(x, cw.qweight, cw.zeros, cw.scales, 4, 32, cw.g_idx)
    for unpack in ("gather", "planes"):
        out = _run(cw, x, SMALL, unpack)
        assert out.dtype == dtype and out.shape == (3, 48)
        # The interpreter rounds fp32 -> bf16 toward zero, the GPU to nearest: ulps apart.
        assert _rel_err(out, ref) < 1e-2


def test_split_k_and_ragged_groups() -> None:
    # K split across three programs; a TP shard of an act-order layer keeps ragged groups.
    k, n = 256, 24
    cw = _canonical(k, n, 4, 32, False, seed=3)
    g_idx = torch.randint(0, k // 32, (k,), generator=torch.Generator().manual_seed(4))
    cw.g_idx = g_idx.to(DEVICE)
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    ref = int_linear_ref(x, cw.qweight, cw.zeros, cw.scales, 4, 32, cw.g_idx)
    kw = kernel_layout(cw)
    assert kw.g_idx is not None and kw.perm is not None
    split = GemmConfig(16, 32, 32, split_k=3, num_warps=4, num_stages=1)
    for unpack in ("gather", "reshape", "planes"):
        assert _rel_err(_run(cw, x, split, unpack), ref) < 1e-5, unpack
    # The last split of each tile re-arms its arrival counter for the next launch.
    assert not split_k._LOCKS[(x.device.type, x.device.index)].any()


def test_default_config_for_decode_splits_k() -> None:
    cfg = choose_config(1, 4096, 4096, torch.device("cpu"))
    assert cfg.block_m == 16 and cfg.split_k >= 1
    big = choose_config(512, 4096, 4096, torch.device("cpu"))
    assert big.split_k == 1 and big.block_m == 128
    # fp32 activations: two pipeline stages (four overflowed the H200's shared memory).
    assert choose_config(512, 4096, 4096, torch.device("cpu"), elem_bytes=4).num_stages == 2
    assert choose_config(8, 4096, 4096, torch.device("cpu"), elem_bytes=4).num_stages == 2
    # the swept tiles are 4-bit ones; 2 and 8 bits keep the earlier (their shared memory)
    cpu = torch.device("cpu")
    assert choose_config(8, 4096, 4096, cpu).block_n == 128
    assert choose_config(8, 4096, 4096, cpu, bits=8).block_n == 64
    assert choose_config(40, 4096, 4096, cpu, bits=2).num_warps == 8
    cw = _canonical(256, 32, 8, 64, False, seed=9)
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    ref = int_linear_ref(x, cw.qweight, cw.zeros, cw.scales, 8, 64, None)
    assert _rel_err(_run(cw, x, None), ref) < 1e-5
    # M = 40 picks 64 x 64 x 128 tiles; "planes" widens BLOCK_K to 16 words.
    cw4 = _canonical(256, 24, 4, 128, False, seed=10)
    x = torch.randn(40, 256, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    ref = int_linear_ref(x, cw4.qweight, cw4.zeros, cw4.scales, 4, 128, None)
    for unpack in ("gather", "planes"):
        assert _rel_err(_run(cw4, x, None, unpack), ref) < 1e-5, unpack


def test_config_file_overrides_tiles_per_m_bucket(tmp_path, monkeypatch) -> None:
    """PAGEDLLM_INT_GEMM_CONFIG (the sweep's JSON): the smallest bucket >= M gives the tiles
    and unpack mode; split 0 is chosen per shape; M above every bucket keeps the default."""
    from pagedllm.model_executor.layers.ops import int_gemm as ig

    path = tmp_path / "int_gemm.json"
    path.write_text('{"16": {"block_m": 16, "block_n": 32, "block_k": 64, "split_k": 2, '
                    '"num_warps": 4, "num_stages": 2, "unpack": "planes"}, '
                    '"64": {"block_m": 32, "block_n": 64, "block_k": 32, "split_k": 0, '
                    '"num_warps": 4, "num_stages": 3, "unpack": "gather"}}')
    monkeypatch.setenv("PAGEDLLM_INT_GEMM_CONFIG", str(path))
    cpu = torch.device("cpu")
    assert choose_config(3, 4096, 4096, cpu) == GemmConfig(16, 32, 64, 2, 4, 2)
    assert ig.tuned_config(3)[1] == "planes"
    mid = choose_config(40, 4096, 4096, cpu)
    assert (mid.block_m, mid.block_n, mid.block_k, mid.num_stages) == (32, 64, 32, 3)
    assert mid.split_k >= 1
    assert choose_config(512, 4096, 4096, cpu).block_m == 128  # past the buckets: default
    cw = _canonical(256, 24, 4, 128, False, seed=11)
    kw = kernel_layout(cw)
    for m in (3, 40):
        x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m)).to(DEVICE)
        ref = int_linear_ref(x, cw.qweight, cw.zeros, cw.scales, 4, 128, None)
        out = int_gemm(x, kw.qweight, kw.zeros, kw.scales, 4, 128, kw.g_idx)
        assert _rel_err(out, ref) < 1e-5, m


def test_unsupported_width_is_refused() -> None:
    cw = _canonical(64, 32, 4, 32, False, seed=1)
    with pytest.raises(ValueError, match="not 3"):
        int_gemm(torch.zeros(1, 64, device=DEVICE), cw.qweight, cw.zeros, cw.scales, 3, 32)


@pytest.mark.parametrize("bits,group_size,ragged", [(4, 64, False), (8, 48, False),
                                                    (2, 32, True)])
def test_dequant_kernel_and_the_dense_path(bits: int, group_size: int, ragged: bool) -> None:
    k, n = 192, 40
    cw = _canonical(k, n, bits, group_size, False, seed=11)
    if ragged:
        cw.g_idx = torch.randint(0, k // group_size, (k,),
                                 generator=torch.Generator().manual_seed(1)).to(DEVICE)
    g32 = cw.g_idx.to(torch.int32) if cw.g_idx is not None else None
    zeros, scales = cw.zeros.half(), cw.scales.half()
    ref = dequantize(cw.qweight, cw.zeros, cw.scales, bits, group_size, cw.g_idx)
    w = int_dequant(cw.qweight, zeros, scales, bits, group_size, g32, torch.float32)
    assert torch.equal(w, ref)
    x = torch.randn(6, k, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    dense = int_matmul(x, cw.qweight, zeros, scales, bits, group_size, g32, dense_min_m=4)
    fused = int_matmul(x, cw.qweight, zeros, scales, bits, group_size, g32, dense_min_m=0)
    expected = x @ ref
    assert _rel_err(dense, expected) < 1e-5 and _rel_err(fused, expected) < 1e-5
