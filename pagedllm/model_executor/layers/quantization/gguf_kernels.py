"""The GGUF CPU kernels: a small C++ extension (csrc/gguf_*.cpp) built on first use.

Built, cached and loaded by `pagedllm/cpp_extension.py` (a cache directory keyed by the
sources' hash under envs.gguf_kernel_build_dir), so a fresh machine needs no manual step;
`python -m pagedllm.model_executor.layers.quantization.gguf_kernels --build` (the
Makefile's venv target) builds it once ahead so tests and servers do not pay the compile.
The extension picks its ISA at run time (AVX512-VNNI, AVX2 for `mm_f32` and the dequantizer,
or portable C++). When it cannot be
built `available()` is False, one warning is logged, and callers fall back to
dequantized weights.

Ops (torch.ops.pagedllm_gguf): mm_f32(x[M, K] f32, w[N, row_bytes] u8, qtype, K) -> [M, N]
(weights dequantized in registers, float32 FMAs with x unrounded: decode, batch-invariant);
mm_x16(x, w, qtype, K) (x rounded to int16 per 32-group, 16-bit integer dots: the decode
kernel on AVX2 CPUs, 1.4-1.5x mm_f32 there, batch-invariant; mm_f32 elsewhere);
mm(x, w, qtype, K) (x quantized to int8 per 32-group, integer dots: benchmarks);
mm_dequant(x, w, qtype, K, tile_rows) (tiles of W dequantized to f32 for torch's GEMM:
prefill); dequantize(w, qtype, K) -> [N, K] f32.
"""

from __future__ import annotations

import os

import torch

from pagedllm import envs
from pagedllm.cpp_extension import CppExtension

_CSRC = os.path.join(os.path.dirname(__file__), "csrc")
_SOURCES = ("gguf_ops.cpp", "gguf_avx512.cpp", "gguf_avx2.cpp", "gguf_generic.cpp")
_HEADERS = ("gguf_blocks.h", "gguf_gemv_impl.h", "gguf_f32_impl.h", "gguf_f32_avx2.h",
            "gguf_x16_avx2.h", "gguf_avx2_rows.h")

# gguf.GGMLQuantizationType values the kernels read packed, and their block geometry
# (weights per block, bytes per block).
PACKED_TYPES: dict[int, tuple[int, int]] = {
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
}

_EXT = CppExtension(
    "pagedllm_gguf", _CSRC, _SOURCES, _HEADERS, envs.gguf_kernel_build_dir,
    fail_env="PAGEDLLM_GGUF_KERNEL_FAIL",  # tests: a failed build
    fallback="GGUF weights are dequantized to float32 instead (slower)",
)
_state = _EXT.state  # "ok": bool, "error": str


def _ext_name() -> str:
    return _EXT.ext_name()


def _build() -> None:
    _EXT.build()


def available() -> bool:
    """Whether the extension is built and loaded (building it on the first call). A failed
    build logs one warning and stays failed for the process."""
    return _EXT.available()


def reset_for_tests() -> None:
    _EXT.reset_for_tests()


def isa() -> str:
    """The kernel path this CPU runs: "avx512-vnni", "avx2" (`mm_f32` and the dequantizer;
    the int8 `mm` portable) or "portable"."""
    return {1: "avx512-vnni", 2: "avx2"}.get(int(torch.ops.pagedllm_gguf.isa()), "portable")


def set_portable(on: bool) -> None:
    """Tests and benchmarks: use the portable C++ kernels even on an AVX512-VNNI or AVX2 CPU."""
    torch.ops.pagedllm_gguf.set_portable(on)


def row_bytes(qtype: int, k: int) -> int:
    """Bytes of one packed row of `k` weights; ValueError when k is not whole blocks."""
    elems, nbytes = PACKED_TYPES[qtype]
    if k % elems:
        raise ValueError(f"GGUF type {qtype}: {k} inputs are not whole {elems}-weight blocks")
    return k // elems * nbytes


def gguf_mm(x: torch.Tensor, w: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """[M, K] @ W^T with W packed [N, row_bytes] -> [M, N] float32 (int8 dot products)."""
    return torch.ops.pagedllm_gguf.mm(x, w, qtype, k)


def gguf_mm_f32(x: torch.Tensor, w: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """[M, K] @ W^T with W packed [N, row_bytes] -> [M, N] float32, x not rounded (weights
    dequantized in registers, FMAs): continuous in x and batch-invariant (decode)."""
    return torch.ops.pagedllm_gguf.mm_f32(x, w, qtype, k)


def gguf_mm_x16(x: torch.Tensor, w: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """[M, K] @ W^T with W packed [N, row_bytes] -> [M, N] float32, x rounded to int16 per
    32-group on AVX2 CPUs (within ~1e-5 of |x| @ |W|^T; batch-invariant), `gguf_mm_f32`'s
    float path on others."""
    return torch.ops.pagedllm_gguf.mm_x16(x, w, qtype, k)


def gguf_mm_dequant(
    x: torch.Tensor, w: torch.Tensor, qtype: int, k: int, tile_rows: int = 1024
) -> torch.Tensor:
    """[M, K] @ W^T, W dequantized `tile_rows` rows at a time for torch's float32 GEMM."""
    return torch.ops.pagedllm_gguf.mm_dequant(x, w, qtype, k, tile_rows)


def gguf_dequantize(w: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """Packed [N, row_bytes] -> [N, K] float32."""
    return torch.ops.pagedllm_gguf.dequantize(w, qtype, k)


def main() -> None:
    _EXT.build_main(
        __doc__.splitlines()[0],
        lambda: f"GGUF CPU kernels built ({isa()}) in {envs.gguf_kernel_build_dir()}",
    )


if __name__ == "__main__":
    main()
