"""The packed GGUF CPU kernels against gguf's reference dequantization times a matmul; the
decode kernels' batch invariance (float `mm_f32` and int16-activation `mm_x16`) and the float
kernel's continuity in x."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

from pagedllm.model_executor.layers.quantization import gguf_kernels

TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]
# Byte offsets of each block's fp16 scale fields (set to sane values in random blocks).
_HALF_FIELDS = {T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,),
                T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}


def random_packed(qtype: T, n: int, k: int, seed: int) -> np.ndarray:
    """Random blocks of the published layout: every quant bit random, fp16 scales in a
    sane range. [n, row_bytes] uint8."""
    rng = np.random.default_rng(seed)
    elems, nbytes = gguf_kernels.PACKED_TYPES[int(qtype)]
    blocks = rng.integers(0, 256, size=(n, k // elems, nbytes), dtype=np.uint8)
    for off in _HALF_FIELDS[qtype]:
        scale = (rng.standard_normal((n, k // elems)) * 0.02).astype(np.float16)
        blocks[:, :, off:off + 2] = scale.view(np.uint8).reshape(n, k // elems, 2)
    return blocks.reshape(n, -1)


@pytest.fixture(scope="module", autouse=True)
def _built() -> None:
    assert gguf_kernels.available(), "the GGUF kernels must build on the test machine"


def _check(qtype: T, packed: np.ndarray, k: int, m: int, seed: int) -> None:
    ref_w = torch.from_numpy(np.asarray(dequantize(packed, qtype), dtype=np.float32))
    w = torch.from_numpy(packed.copy())
    # Dequantization is exact: the same floats as gguf's.
    torch.testing.assert_close(gguf_kernels.gguf_dequantize(w, int(qtype), k), ref_w,
                               rtol=1e-6, atol=1e-7)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    ref = (x.double() @ ref_w.double().T).float()
    # Integer path: x rounded to int8 per 32-group, so ~0.4% relative error per product.
    y = gguf_kernels.gguf_mm(x, w, int(qtype), k)
    err = (y - ref).norm() / ref.norm()
    assert y.shape == (m, packed.shape[0]) and err < 1.5e-2, (qtype.name, m, float(err))
    scale = (x.abs().double() @ ref_w.abs().double().T).float()
    assert ((y - ref).abs() <= 0.03 * scale + 1e-4).all(), qtype.name
    # Float path: x not rounded, so float32 accuracy.
    _check_f32(y_f32 := gguf_kernels.gguf_mm_f32(x, w, int(qtype), k), ref, scale)
    assert y_f32.shape == (m, packed.shape[0])
    # int16 path (AVX2 decode kernel; the float one elsewhere): within half an int16 step of x
    # per weight, plus float32 rounding.
    _check_x16(gguf_kernels.gguf_mm_x16(x, w, int(qtype), k), x, ref_w, ref, scale)
    # Prefill path: dequantized tiles, float32 GEMM.
    y2 = gguf_kernels.gguf_mm_dequant(x, w, int(qtype), k, tile_rows=7)
    torch.testing.assert_close(y2, ref, rtol=1e-4, atol=1e-4)


def _check_f32(y: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor) -> None:
    """Within float32 rounding of the exact product: |y - ref| <= 1e-5 * (|x| @ |W|^T)."""
    assert ((y - ref).abs() <= 1e-5 * scale + 1e-7).all(), float(((y - ref).abs() / scale).max())


def _check_x16(y: torch.Tensor, x: torch.Tensor, ref_w: torch.Tensor, ref: torch.Tensor,
               scale: torch.Tensor) -> None:
    """|y - ref| <= |W| @ (dx / 2) + 1e-5 * (|x| @ |W|^T), dx = max|x group| / 32767 for each
    element of x (the int16 rounding bound), and at least as close as 2e-4 of the scale."""
    m, k = x.shape
    dx = x.abs().reshape(m, k // 32, 32).amax(-1, keepdim=True).expand(m, k // 32, 32) / 32767
    bound = (dx.reshape(m, k).double() / 2) @ ref_w.abs().double().T
    err = (y - ref).abs()
    assert y.shape == ref.shape
    assert (err <= bound.float() + 1e-5 * scale + 1e-7).all(), float((err / scale).max())
    assert (err <= 2e-4 * scale + 1e-7).all(), float((err / scale).max())


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_random_blocks_match_gguf_dequantize(qtype: T) -> None:
    k = 512 if qtype >= T.Q4_K else 288  # 9 groups: one 8-group step and one left over
    packed = random_packed(qtype, 37, k, seed=int(qtype))
    for m in (1, 3, 13, 16):  # 1-row kernels, 2+1 and 4+1 chunks, 8+4+1, 4 x 4
        _check(qtype, packed, k, m, seed=m)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_portable_kernels(qtype: T) -> None:
    """The C++ fallback for CPUs without AVX512-VNNI or AVX2 gives the same results."""
    k = 256
    packed = random_packed(qtype, 11, k, seed=3)
    gguf_kernels.set_portable(True)
    try:
        assert gguf_kernels.isa() == "portable"
        _check(qtype, packed, k, 5, seed=2)
    finally:
        gguf_kernels.set_portable(False)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0], ids=lambda t: t.name)
def test_gguf_quantized_weights(qtype: T) -> None:
    """Weights written by gguf's own quantizer (the types it implements)."""
    rng = np.random.default_rng(0)
    k = 352
    packed = np.asarray(quantize(rng.standard_normal((19, k)).astype(np.float32), qtype))
    _check(qtype, packed, k, 5, seed=1)


def test_bad_shapes_are_refused() -> None:
    w = torch.from_numpy(random_packed(T.Q4_1, 4, 64, seed=0))
    with pytest.raises(RuntimeError, match="bytes, expected"):
        gguf_kernels.gguf_mm(torch.randn(2, 96), w, int(T.Q4_1), 96)
    with pytest.raises(RuntimeError, match="x must be"):
        gguf_kernels.gguf_mm(torch.randn(2, 32), w, int(T.Q4_1), 64)


def test_fused_layer_keeps_packed_only_when_types_match() -> None:
    """q/k/v (or gate/up) of one GGUF type share one packed tensor; mixed types (Q4_K_M files
    store v as Q6_K) and float tensors leave the layer dequantized."""
    from types import SimpleNamespace

    from pagedllm.model_executor.layers.quantization.gguf import GGUFConfig, GGUFLinearMethod

    attn = "model.layers.0.self_attn"
    types = {f"{attn}.q_proj.weight": 12, f"{attn}.k_proj.weight": 12,
             f"{attn}.v_proj.weight": 14, f"{attn}.o_proj.weight": 14,
             "model.layers.0.mlp.gate_proj.weight": 3, "model.layers.0.mlp.up_proj.weight": 3,
             "model.layers.0.mlp.down_proj.weight": 0}  # fmt: skip
    config = GGUFConfig(types)
    layer = SimpleNamespace(tp_size=1, input_size=512)
    assert config.get_linear_method(layer, f"{attn}.qkv_proj") is None
    method = config.get_linear_method(layer, "model.layers.0.mlp.gate_up_proj")
    assert isinstance(method, GGUFLinearMethod) and method.qtype == 3
    assert config.get_linear_method(layer, f"{attn}.o_proj").qtype == 14
    assert config.get_linear_method(layer, "model.layers.0.mlp.down_proj") is None  # F32
    assert config.keep_packed("model.layers.0.mlp.up_proj.weight", 3)
    assert not config.keep_packed(f"{attn}.q_proj.weight", 12)
    tp2 = SimpleNamespace(tp_size=2, input_size=512)
    assert GGUFConfig(types).get_linear_method(tp2, f"{attn}.o_proj") is None


def _packed_case(qtype: T, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    k = 768 if qtype >= T.Q4_K else 288
    w = torch.from_numpy(random_packed(qtype, 45, k, seed=seed))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    return x, w, k


DECODE_KERNELS = {"f32": gguf_kernels.gguf_mm_f32, "x16": gguf_kernels.gguf_mm_x16}


@pytest.mark.parametrize("kernel", sorted(DECODE_KERNELS))
@pytest.mark.parametrize("portable", [False, True], ids=["native", "portable"])
def test_decode_kernel_is_batch_and_thread_invariant(portable: bool, kernel: str) -> None:
    """Row m of an M-row call is bitwise the row alone (and in any other batch), whatever the
    thread count: what a prefix-cache hit or another batch needs to give the same tokens."""
    mm = DECODE_KERNELS[kernel]
    gguf_kernels.set_portable(portable)
    threads = torch.get_num_threads()
    try:
        for qtype in TYPES:
            x, w, k = _packed_case(qtype, 16, seed=int(qtype))
            full = mm(x, w, int(qtype), k)
            for m in range(16):
                alone = mm(x[m:m + 1], w, int(qtype), k)
                assert torch.equal(alone[0], full[m]), (qtype.name, m)
            mid = mm(x[3:8], w, int(qtype), k)  # 4+1 chunks
            assert torch.equal(mid, full[3:8]), qtype.name
            torch.set_num_threads(1 if threads > 1 else 2)
            assert torch.equal(mm(x, w, int(qtype), k), full), qtype.name
            torch.set_num_threads(threads)
    finally:
        torch.set_num_threads(threads)
        gguf_kernels.set_portable(False)


@pytest.mark.parametrize("kernel", sorted(DECODE_KERNELS))
def test_decode_kernel_chunkings_give_the_same_bits(kernel: str) -> None:
    """The native kernel's ways of walking one (x row, weight row) pair give the same bits: one
    x row against weight rows in pairs or alone (odd N, thread ranges), 4/2/1 x rows a pass,
    blocks of weight rows above 4 x rows; long rows too (x larger than a core's L1 at K = 8960)."""
    mm = DECODE_KERNELS[kernel]
    threads = torch.get_num_threads()
    try:
        for qtype in (T.Q4_1, T.Q8_0, T.Q4_K, T.Q6_K):
            k = 8960 if qtype in (T.Q4_K, T.Q8_0) else 1536
            w = torch.from_numpy(random_packed(qtype, 21, k, seed=7))
            x = torch.randn(11, k, generator=torch.Generator().manual_seed(int(qtype)))
            full = mm(x, w, int(qtype), k)
            for m0, m1 in ((0, 1), (5, 6), (0, 2), (1, 4), (2, 7), (0, 11)):
                part = mm(x[m0:m1], w, int(qtype), k)
                assert torch.equal(part, full[m0:m1]), (qtype.name, m0, m1)
            alone = mm(x[3:4], w[5:6].contiguous(), int(qtype), k)
            assert torch.equal(alone[0, 0], full[3, 5]), qtype.name
            torch.set_num_threads(1 if threads > 1 else 2)
            assert torch.equal(mm(x, w, int(qtype), k), full), qtype.name
            torch.set_num_threads(threads)
    finally:
        torch.set_num_threads(threads)


def _near_half_steps(m: int, k: int, seed: int) -> torch.Tensor:
    """x whose int8 quantization sits on rounding boundaries: each 32-group's first value is
    its max (127 steps), the others (j + 0.5) steps."""
    rng = torch.Generator().manual_seed(seed)
    step = 0.01
    x = (torch.randint(-120, 120, (m, k), generator=rng).float() + 0.5) * step
    x[:, ::32] = 127 * step
    return x


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_f32_kernel_is_continuous_in_x(qtype: T) -> None:
    """A tiny relative change of x (1 ulp, or 1e-6 of each value) changes y by about as much,
    not by a quantization step; the int8 kernel fails the same check (which proves the test
    can see the difference)."""
    m, k = 3, 768 if qtype >= T.Q4_K else 288
    w = torch.from_numpy(random_packed(qtype, 45, k, seed=5))
    ref_w = torch.from_numpy(np.asarray(dequantize(w.numpy(), qtype), dtype=np.float32))
    x = _near_half_steps(m, k, seed=int(qtype))
    sign = torch.where(torch.rand(m, k, generator=torch.Generator().manual_seed(1)) < 0.5, -1, 1)
    x2 = x * (1 + 1e-6 * sign)
    x2[:, ::32] = x[:, ::32]  # the group maxima (the int8 scales) unchanged
    scale = x.abs() @ ref_w.abs().T
    for mm in (gguf_kernels.gguf_mm_f32, gguf_kernels.gguf_mm):
        dy = (mm(x2, w, int(qtype), k) - mm(x, w, int(qtype), k)).abs()
        if mm is gguf_kernels.gguf_mm_f32:
            assert (dy <= 1e-5 * scale).all(), float((dy / scale).max())
            ulp = torch.nextafter(x, torch.full_like(x, float("inf")))
            dy1 = (mm(ulp, w, int(qtype), k) - mm(x, w, int(qtype), k)).abs()
            assert (dy1 <= 1e-6 * scale).all(), float((dy1 / scale).max())
        else:  # int8: the flipped roundings move y by ~1e-3 of its scale
            assert float((dy / scale).max()) > 1e-3


def test_f32_kernel_refuses_bad_shapes() -> None:
    w = torch.from_numpy(random_packed(T.Q4_K, 4, 256, seed=0))
    with pytest.raises(RuntimeError, match="bytes, expected"):
        gguf_kernels.gguf_mm_f32(torch.randn(2, 512), w, int(T.Q4_K), 512)
    with pytest.raises(RuntimeError, match="x must be"):
        gguf_kernels.gguf_mm_f32(torch.randn(2, 64), w, int(T.Q4_K), 256)


def test_x16_kernel_rounds_x_on_avx2_only() -> None:
    """On AVX2 CPUs `mm_x16` is its own int16 kernel (results differ from the float kernel's
    in the last bits, inside _check_x16's bound); elsewhere it is the float kernel."""
    x, w, k = _packed_case(T.Q4_K, 3, seed=11)
    y16 = gguf_kernels.gguf_mm_x16(x, w, int(T.Q4_K), k)
    y32 = gguf_kernels.gguf_mm_f32(x, w, int(T.Q4_K), k)
    if gguf_kernels.isa() == "avx2":
        assert not torch.equal(y16, y32)
    else:
        assert torch.equal(y16, y32)
    with pytest.raises(RuntimeError, match="x must be"):
        gguf_kernels.gguf_mm_x16(torch.randn(2, 64), w, int(T.Q4_K), k)
    # Denormal-scale groups (32767 / max|x| overflows) are rounded to zeros, not garbage.
    ref_w = torch.from_numpy(np.asarray(dequantize(w.numpy(), T.Q4_K), dtype=np.float32))
    tiny = x.clone()
    tiny[0, 32:64] *= 1e-40
    tiny[1] *= 1e-39
    y = gguf_kernels.gguf_mm_x16(tiny, w, int(T.Q4_K), k)
    ref = (tiny.double() @ ref_w.double().T).float()
    scale = tiny.abs().double() @ ref_w.abs().double().T
    assert torch.isfinite(y).all()
    assert ((y - ref).abs() <= 2e-4 * scale.float() + 1e-30).all()


def test_prefill_tiles_split_over_threads() -> None:
    """mm_dequant's tiles run on several threads (inference mode included, as in the engine)
    with the one-thread result."""
    x, w, k = _packed_case(T.Q4_K, 20, seed=13)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref = gguf_kernels.gguf_mm_dequant(x, w, int(T.Q4_K), k, 4)  # 12 tiles
        torch.set_num_threads(2)
        with torch.inference_mode():
            y = gguf_kernels.gguf_mm_dequant(x.clone(), w.clone(), int(T.Q4_K), k, 4)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
