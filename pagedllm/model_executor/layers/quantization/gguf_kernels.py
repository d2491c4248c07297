"""The GGUF CPU kernels: a small C++ extension (csrc/gguf_*.cpp) built on first use.

`torch.utils.cpp_extension.load` compiles it with the system compiler into a cache
directory keyed by the sources' hash (envs.gguf_kernel_build_dir), so a fresh machine needs
no manual step; `python -m pagedllm.model_executor.layers.quantization.gguf_kernels --build`
(the Makefile's venv target) builds it once ahead so tests and servers do not pay the
compile. The extension picks its ISA at run time (AVX512-VNNI or portable C++). When it
cannot be built `available()` is False, one warning is logged, and callers fall back to
dequantized weights.

Ops (torch.ops.pagedllm_gguf): mm_f32(x[M, K] f32, w[N, row_bytes] u8, qtype, K) -> [M, N]
(weights dequantized in registers, float32 FMAs with x unrounded: decode, batch-invariant);
mm(x, w, qtype, K) (x quantized to int8 per 32-group, integer dots: benchmarks);
mm_dequant(x, w, qtype, K, tile_rows) (tiles of W dequantized to f32 for torch's GEMM:
prefill); dequantize(w, qtype, K) -> [N, K] f32.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading

import torch

from pagedllm import envs

logger = logging.getLogger(__name__)

_CSRC = os.path.join(os.path.dirname(__file__), "csrc")
_SOURCES = ("gguf_ops.cpp", "gguf_avx512.cpp", "gguf_generic.cpp")
_HEADERS = ("gguf_blocks.h", "gguf_gemv_impl.h", "gguf_f32_impl.h")

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

_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool, "error": str


def _ext_name() -> str:
    digest = hashlib.sha1()
    for name in (*_SOURCES, *_HEADERS):
        with open(os.path.join(_CSRC, name), "rb") as f:
            digest.update(f.read())
    digest.update(torch.__version__.encode())
    return f"pagedllm_gguf_{digest.hexdigest()[:12]}"


def _ninja_on_path() -> None:
    """The `ninja` pip package's binary (and the venv's bin) on PATH, where torch's
    extension builder looks for it, also when the venv is not activated."""
    import sys

    dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja

        dirs.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    path = os.environ.get("PATH", "").split(os.pathsep)
    os.environ["PATH"] = os.pathsep.join([d for d in dirs if d not in path] + path)


def _build() -> None:
    from torch.utils import cpp_extension

    _ninja_on_path()

    build_dir = os.path.join(envs.gguf_kernel_build_dir(), _ext_name())
    os.makedirs(build_dir, exist_ok=True)
    cpp_extension.load(
        name=_ext_name(),
        sources=[os.path.join(_CSRC, s) for s in _SOURCES],
        extra_cflags=["-O3", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=build_dir,
        is_python_module=False,
        verbose=False,
    )


def available() -> bool:
    """Whether the extension is built and loaded (building it on the first call). A failed
    build logs one warning and stays failed for the process."""
    with _lock:
        if "ok" not in _state:
            if os.environ.get("PAGEDLLM_GGUF_KERNEL_FAIL") == "1":  # tests: a failed build
                _state.update(ok=False, error="PAGEDLLM_GGUF_KERNEL_FAIL=1")
            else:
                try:
                    _build()
                    _state["ok"] = True
                except Exception as e:  # noqa: BLE001 - any build failure means fallback
                    _state.update(ok=False, error=f"{type(e).__name__}: {e}")
            if not _state["ok"]:
                logger.warning(
                    "GGUF CPU kernels could not be built (%s); GGUF weights are dequantized "
                    "to float32 instead (slower)", str(_state["error"]).splitlines()[0][:300],
                )
        return bool(_state["ok"])


def reset_for_tests() -> None:
    with _lock:
        _state.clear()


def isa() -> str:
    """The kernel path this CPU runs: "avx512-vnni" or "portable"."""
    return "avx512-vnni" if torch.ops.pagedllm_gguf.isa() == 1 else "portable"


def set_portable(on: bool) -> None:
    """Tests and benchmarks: use the portable C++ kernels even on an AVX512-VNNI CPU."""
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


def gguf_mm_dequant(
    x: torch.Tensor, w: torch.Tensor, qtype: int, k: int, tile_rows: int = 1024
) -> torch.Tensor:
    """[M, K] @ W^T, W dequantized `tile_rows` rows at a time for torch's float32 GEMM."""
    return torch.ops.pagedllm_gguf.mm_dequant(x, w, qtype, k, tile_rows)


def gguf_dequantize(w: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """Packed [N, row_bytes] -> [N, K] float32."""
    return torch.ops.pagedllm_gguf.dequantize(w, qtype, k)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", action="store_true", help="build the extension now")
    args = parser.parse_args()
    if args.build:
        logging.basicConfig(level=logging.INFO)
        if not available():
            raise SystemExit(f"GGUF kernels not built: {_state.get('error')}")
        print(f"GGUF CPU kernels built ({isa()}) in {envs.gguf_kernel_build_dir()}")


if __name__ == "__main__":
    main()
