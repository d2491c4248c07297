"""GGUF CPU kernel speed: the packed float-activation kernel (`mm_f32`, decode), the
int16-activation kernel (`mm_x16`, decode on AVX2 CPUs; the float one elsewhere), the int8-dot
kernel (`mm`), the dequantize-tile GEMM (`mm_dequant`, prefill) and the dequantized float32
`F.linear` pagedllm used before, at SmolLM2-135M's shapes (and K-quant shapes).

Usage: OMP_NUM_THREADS=1 python benchmarks/gguf_kernels.py [--m 1 8 64] [--threads 1 2]
Prints one line per (type, shape, M, threads): microseconds per call (CPU time / threads)
and weight GB/s of the two packed kernels, then the load average.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "model_executor"))
from test_gguf_kernels import random_packed  # noqa: E402

from pagedllm.model_executor.layers.quantization import gguf_kernels  # noqa: E402

SHAPES = {"Q4_1": [(1536, 576), (576, 1536), (576, 576)], "Q8_0": [(49152, 576)],
          "Q4_0": [(1536, 576)], "Q5_0": [(1536, 576)], "Q5_1": [(1536, 576)],
          "Q4_K": [(1536, 512)], "Q5_K": [(1536, 512)], "Q6_K": [(1536, 512)]}
TYPE_IDS = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13,
            "Q6_K": 14}


def _time(fn, *args, budget_s: float) -> float:
    """Seconds per call: process CPU time divided by the threads (less disturbed than wall
    time on a shared machine, exact at one thread)."""
    fn(*args)
    n, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < budget_s:
        fn(*args)
        n += 1
    return (time.process_time() - cpu) / n / torch.get_num_threads()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--m", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--portable", action="store_true")
    parser.add_argument("--types", nargs="+", default=list(SHAPES))
    parser.add_argument("--budget", type=float, default=0.3, help="seconds per measurement")
    args = parser.parse_args()
    assert gguf_kernels.available()
    gguf_kernels.set_portable(args.portable)
    print(f"isa={gguf_kernels.isa()} torch={torch.__version__}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, shapes in SHAPES.items():
            if name not in args.types:
                continue
            qtype = TYPE_IDS[name]
            for n, k in shapes:
                w = torch.from_numpy(random_packed(qtype, n, k, seed=0))
                dense = gguf_kernels.gguf_dequantize(w, qtype, k)
                for m in args.m:
                    x = torch.randn(m, k)
                    b = args.budget
                    t_f = _time(gguf_kernels.gguf_mm_f32, x, w, qtype, k, budget_s=b)
                    t_16 = _time(gguf_kernels.gguf_mm_x16, x, w, qtype, k, budget_s=b)
                    t_mm = _time(gguf_kernels.gguf_mm, x, w, qtype, k, budget_s=b)
                    t_dq = _time(gguf_kernels.gguf_mm_dequant, x, w, qtype, k, budget_s=b)
                    t_f32 = _time(F.linear, x, dense, budget_s=b)
                    gb = w.numel() / 1e9
                    print(f"{name} N={n} K={k} M={m} threads={threads}: "
                          f"packed-f32 {t_f * 1e6:8.1f} us ({gb / t_f:5.1f} GB/s)  "
                          f"packed-x16 {t_16 * 1e6:8.1f} us ({gb / t_16:5.1f} GB/s)  "
                          f"packed-int8 {t_mm * 1e6:8.1f} us ({gb / t_mm:5.1f} GB/s)  "
                          f"dequant-tile+GEMM {t_dq * 1e6:8.1f} us  "
                          f"fp32 F.linear {t_f32 * 1e6:8.1f} us", flush=True)
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
