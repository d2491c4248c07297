"""Tile sweep of the fused int4 GEMM (`ops/int_gemm.py`) at batch sizes above the GEMV's.

    python benchmarks/gpu_int_gemm_sweep.py [--ms 16,64,256] [--json FILE] [--budget-s 300]
    TRITON_INTERPRET=1 python benchmarks/gpu_int_gemm_sweep.py --smoke   # CPU, logic only

For each M, Llama-3.1-8B's four projections (4-bit, group 128), a list of (block_m, block_n,
block_k, warps, stages, unpack) tiles, each at several K splits (0 = the per-shape automatic
split), checked against the torch reference (`packed_int.int_linear_ref`) and timed with
`triton.testing.do_bench` next to bf16 cuBLAS and, from M = 64, dequantize + cuBLAS (the dense
path). Prints one row per (M, config) with the four shapes' times and their sum, then per M
the config with the smallest sum; `--json` writes those winners as PAGEDLLM_INT_GEMM_CONFIG
input and the M from which the dense path's sum is smaller (`dense_min_m`). Stops starting
new configs after `--budget-s` seconds (each distinct tile compiles once).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pagedllm.model_executor.layers.ops.int_gemm import GemmConfig, int_gemm, int_matmul  # noqa: E402
from pagedllm.model_executor.layers.quantization.packed_int import (  # noqa: E402
    dequantize,
    int_linear_ref,
)

SHAPES_8B = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672),
             "down": (14336, 4096)}
# (block_m, block_n, block_k, warps, stages, unpack); the first of each is today's default.
TILES = {
    16: [(16, 64, 128, 4, 4, "reshape"), (16, 128, 128, 4, 4, "reshape"),
         (16, 64, 256, 4, 3, "reshape"), (16, 128, 64, 4, 4, "reshape"),
         (16, 256, 64, 8, 3, "reshape"), (16, 64, 128, 4, 4, "planes"),
         (16, 128, 256, 8, 3, "planes"), (16, 128, 128, 8, 4, "reshape")],
    64: [(64, 128, 64, 8, 4, "reshape"), (64, 128, 128, 8, 3, "reshape"),
         (64, 64, 128, 4, 3, "reshape"), (64, 256, 64, 8, 3, "reshape"),
         (32, 128, 128, 4, 3, "reshape"), (64, 128, 64, 4, 4, "reshape"),
         (32, 64, 128, 4, 4, "reshape")],
    256: [(128, 128, 64, 8, 3, "reshape"), (128, 256, 64, 8, 3, "reshape"),
          (128, 128, 128, 8, 3, "reshape"), (64, 128, 64, 4, 4, "reshape"),
          (64, 256, 64, 8, 4, "reshape"), (128, 64, 64, 4, 4, "reshape")],
}
SPLITS = {16: (0, 1, 2, 4, 8), 64: (0, 1, 2, 4), 256: (1, 2)}


def _bench(fn) -> float:
    if torch.cuda.is_available():
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
    t0 = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", default="16,64,256")
    ap.add_argument("--json", default=None)
    ap.add_argument("--budget-s", type=float, default=300.0)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one tile per M")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = {"tiny": (256, 128)} if args.smoke else SHAPES_8B
    group, bits = (32 if args.smoke else 128), 4
    gen = torch.Generator(device=device).manual_seed(0)
    weights = {}
    for name, (k, n) in shapes.items():
        qweight = torch.randint(-2**31, 2**31 - 1, (k // 8, n), generator=gen, device=device,
                                dtype=torch.int64).to(torch.int32)
        zeros = torch.full((k // group, n), 8.0, device=device, dtype=dtype)
        scales = (torch.rand(k // group, n, generator=gen, device=device) * 0.004 + 0.001
                  ).to(dtype)
        dense = dequantize(qweight, zeros, scales, bits, group).t().to(dtype).contiguous()
        weights[name] = (qweight, zeros, scales, dense)
    start = time.perf_counter()
    winners, dense_sums, failed = {}, {}, False
    for m in [int(v) for v in args.ms.split(",")]:
        bucket = min((b for b in TILES if b >= m), default=max(TILES))
        xs = {name: torch.randn(m, shapes[name][0], generator=gen, device=device).to(dtype)
              for name in shapes}
        refs = {name: int_linear_ref(xs[name], *weights[name][:3], bits, group)
                for name in shapes}
        bf16 = {name: _bench(lambda x=xs[name], w=weights[name][3]:
                             torch.nn.functional.linear(x, w)) for name in shapes}
        print(f"\nM={m}: bf16 cuBLAS " + " ".join(f"{s} {t * 1e3:.1f}us" for s, t in
                                                 bf16.items()) + f" sum {sum(bf16.values()) * 1e3:.1f}us")
        if m >= 64:
            dense_sums[m] = sum(_bench(lambda a=(xs[s], *weights[s][:3], bits, group):
                                       int_matmul(*a, dense_min_m=1)) for s in shapes)
            print(f"  dense path sum {dense_sums[m] * 1e3:.1f}us")
        print("| block_m | block_n | block_k | warps | stages | unpack | split | "
              + " | ".join(shapes) + " | sum us | vs bf16 |")
        print("|---" * (8 + len(shapes)) + "|")
        best = None
        for tile in (TILES[bucket][:1] if args.smoke else TILES[bucket]):
            for split in (SPLITS[bucket][:1] if args.smoke else SPLITS[bucket]):
                if time.perf_counter() - start > args.budget_s:
                    break
                bm, bn, bk, warps, stages, unpack = tile
                times, bad = {}, False
                for name in shapes:
                    qweight, zeros, scales, _ = weights[name]
                    k, n = shapes[name]
                    sp = split if split else _auto(m, n, k, bm, bn, bk, device)
                    cfg = GemmConfig(bm, bn, bk, sp, warps, stages)
                    fn = (lambda x=xs[name], a=(qweight, zeros, scales, bits, group), c=cfg,
                          u=unpack: int_gemm(x, *a, config=c, unpack=u))
                    try:
                        out = fn()
                    except Exception as e:  # a tile the GPU cannot run (shared memory)
                        print(f"  {tile} split {split}: {type(e).__name__}: {str(e)[:120]}")
                        bad = True
                        break
                    err = ((out.double() - refs[name].double()).norm()
                           / refs[name].double().norm()).item()
                    if err > 1e-2:
                        print(f"  {tile} split {split} {name}: rel err {err:.1e} FAIL")
                        failed = bad = True
                        break
                    times[name] = _bench(fn)
                if bad or len(times) < len(shapes):
                    continue
                total = sum(times.values())
                print(f"| {bm} | {bn} | {bk} | {warps} | {stages} | {unpack} | {split or 'auto'} | "
                      + " | ".join(f"{times[s] * 1e3:.1f}" for s in shapes)
                      + f" | {total * 1e3:.1f} | {sum(bf16.values()) / total:.2f}x |", flush=True)
                if best is None or total < best[0]:
                    best = (total, tile, split)
        if best is not None:
            total, (bm, bn, bk, warps, stages, unpack), split = best
            winners[m] = {"block_m": bm, "block_n": bn, "block_k": bk, "split_k": split,
                          "num_warps": warps, "num_stages": stages, "unpack": unpack,
                          "sum_us": round(total * 1e3, 2),
                          "bf16_sum_us": round(sum(bf16.values()) * 1e3, 2)}
            print(f"M={m} best: {winners[m]}")
    dense_min_m = min((m for m, t in dense_sums.items()
                       if m in winners and t * 1e3 < winners[m]["sum_us"]), default=0)
    print(f"\nwinners: {json.dumps(winners)}\ndense path faster from M = {dense_min_m or 'never'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({str(m): w for m, w in winners.items()}, f, indent=1)
        with open(os.path.splitext(args.json)[0] + "_dense_min_m.txt", "w") as f:
            f.write(f"{dense_min_m}\n")
    return 1 if failed else 0


def _auto(m, n, k, bm, bn, bk, device) -> int:
    from pagedllm.model_executor.layers.ops.int_gemm import _auto_split

    return _auto_split(m, n, k, bm, bn, bk, torch.device(device))


if __name__ == "__main__":
    sys.exit(main())
