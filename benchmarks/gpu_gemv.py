"""Sweep of the small-M GEMV kernels (int4 GPTQ/AWQ layout, fp8 e4m3, 16-bit) on the GPU.

    PYTHONUNBUFFERED=1 timeout 900 python3 benchmarks/gpu_gemv.py [--kinds int4,fp8,bf16]
        [--ms 1,2,4,8,16,32] [--json /tmp/gemv.json]
    TRITON_INTERPRET=1 python3 benchmarks/gpu_gemv.py --smoke   # CPU, tiny shapes, logic only

For Llama-3.1-8B's projections (qkv 4096->6144, o 4096->4096, gate_up 4096->28672, down
14336->4096) and each M: every config of a small grid (`_grid`) is checked against the torch
reference (rel err <= 1e-2, else FAIL and excluded) and timed as the replay of one CUDA graph of
>= 20 back-to-back calls cycling through copies of the weights that together exceed the
L2 2.5 times (each call's weights cold, as in decode where every layer has its own; no
launch gaps, as inside the engine's decode graphs). One row per
(kind, shape, M): the best config, its µs, the bytes it must stream (weights + scales + x +
out) per µs as GB/s and as a share of 4.0 TB/s, and its speed-up over bf16 cuBLAS
(`F.linear`) and over today's path (int4: the fused `int_gemm` with its defaults; fp8: Triton
activation quantization + `torch._scaled_mm`; bf16: cuBLAS itself, and the LM head's shape
too). The bf16 rows go into the table only where the GEMV beat cuBLAS: the engine takes the
dense GEMV for exactly the shapes the table names. At the end: the winners as a `TUNED` dict to
paste into `pagedllm/model_executor/layers/ops/gemv_config.py`, and per kind the largest M
up to which the GEMV beats today's path (the `*_GEMV_MAX_M` constants). `--json` also writes
the table that `PAGEDLLM_GEMV_CONFIG=FILE` makes the module read.

Exit status 1 when any config (or the defaults) disagrees with the reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if "pagedllm" not in sys.modules:
    # Skip pagedllm/__init__ (its server-side dependencies may be missing on a GPU image).
    _pkg = types.ModuleType("pagedllm")
    _pkg.__path__ = [str(ROOT / "pagedllm")]
    sys.modules["pagedllm"] = _pkg

from pagedllm.model_executor.layers.ops import gemv_config  # noqa: E402
from pagedllm.model_executor.layers.ops.fp8_gemv import (  # noqa: E402
    dense_gemv,
    fp8_gemv,
    fp8_gemv_ref,
)
from pagedllm.model_executor.layers.ops.gemv_config import GemvConfig  # noqa: E402
from pagedllm.model_executor.layers.ops.int_gemm import int_gemm  # noqa: E402
from pagedllm.model_executor.layers.ops.int_gemv import int_gemv  # noqa: E402
from pagedllm.model_executor.layers.quantization import fp8_gemm  # noqa: E402
from pagedllm.model_executor.layers.quantization.packed_int import (  # noqa: E402
    dequantize,
    int_linear_ref,
)

SHAPES_8B = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672),
             "down": (14336, 4096)}
EXTRA_SHAPES = {"bf16": {"lm_head": (4096, 128256)}}  # the LM head is 16-bit in every kind
PEAK = 4.0e12  # bytes/s: the H200's usable HBM bandwidth (~4.0-4.3 TB/s)
GROUP = 128
SPLITS = (0, 1, 4, 16)  # 0: the heuristic of gemv_config.split_for (16: loads in flight)


def _grid(kind: str, m: int, smoke: bool, wide: bool = False) -> list[GemvConfig]:
    """A small grid per M: FMA tiles (one 2-D accumulator per row) up to M = 4, tensor-core
    tiles from M = 2; split 0 is the heuristic (none once the tiles give two programs per
    SM). Splits are runtime values (no recompile), the rest compile. `wide` (M = 1 and 2):
    larger tiles per thread, more split counts, int4's in-place planes and tensor-core tiles
    at M = 1 too."""
    if smoke:
        fma = [GemvConfig(32, 64, 0, 4, 1), GemvConfig(32, 64, 2, 4, 1, prefetch=True),
               GemvConfig(32, 64, 2, 4, 1, inplace=True)]
        dot = [GemvConfig(32, 128, 0, 4, 1, use_dot=True),
               GemvConfig(32, 128, 2, 4, 1, use_dot=True, swap_ab=True)]
        return (fma if m <= 4 else []) + (dot if m >= 2 else [])
    if wide and m <= 2:
        return _wide_grid(kind, m)
    configs: list[GemvConfig] = []
    if m <= 4:
        tiles = ([(16, 128, 8), (16, 256, 8), (32, 128, 4), (32, 256, 8), (64, 128, 8)]
                 if kind in ("fp8", "bf16") else [(32, 128, 4), (64, 128, 4), (64, 256, 8), (128, 128, 8)])
        for bn, bk, warps in tiles:
            for split in SPLITS:
                configs.append(GemvConfig(bn, bk, split, warps, 3))
                if m == 1:  # register double buffering of the weight tile
                    configs.append(GemvConfig(bn, bk, split, warps, 3, prefetch=True))
    if m >= 2:
        for bn, bk, swap in ((32, 128, False), (64, 128, False), (64, 128, True),
                             (128, 128, True)):
            for split in SPLITS:
                configs.append(GemvConfig(bn, bk, split, 4, 3, use_dot=True, swap_ab=swap))
    return configs


WIDE_SPLITS = (0, 1, 2, 4, 8, 16)


WIDE_TILES = {  # (BLOCK_N, BLOCK_K, warps) of the FMA form
    "fp8": [(16, 256, 8), (32, 128, 4), (32, 256, 8), (32, 512, 8), (64, 128, 8),
            (64, 256, 8), (128, 128, 8)],
    "int4": [(64, 128, 4), (64, 256, 8), (64, 256, 4), (64, 512, 8), (128, 128, 8),
             (128, 256, 8), (32, 256, 4)],
    "bf16": [(8, 512, 4), (16, 256, 8), (16, 512, 8), (32, 128, 4), (32, 256, 8),
             (32, 512, 8), (64, 128, 8), (64, 256, 8)],
}
# Flag sets tried beside the plain FMA form at one row: fp8 prefetch; int4 in-place planes
# with and without prefetch.
WIDE_M1_FLAGS = {"fp8": [{"prefetch": True}], "bf16": [{"prefetch": True}],
                 "int4": [{"inplace": True}, {"prefetch": True, "inplace": True}]}


def _wide_grid(kind: str, m: int) -> list[GemvConfig]:
    configs: list[GemvConfig] = []
    flag_sets = [{}] + (WIDE_M1_FLAGS[kind] if m == 1 else [])
    for bn, bk, warps in WIDE_TILES[kind]:
        for split in WIDE_SPLITS:
            configs += [GemvConfig(bn, bk, split, warps, 3, **flags) for flags in flag_sets]
    for bn, bk, swap in ((64, 128, True), (128, 128, True), (64, 256, True)):
        for split in (0, 4, 8, 16):
            configs.append(GemvConfig(bn, bk, split, 4, 3, use_dot=True, swap_ab=swap))
    return configs


L2_BYTES = 60 << 20  # the H200's L2 is 50 MiB; copies stream over 2.5x more than that


def _copies(nbytes: int, device: str) -> int:
    """Weight copies a timing rotates through so that every call finds its weight cold."""
    return 1 if device != "cuda" else max(1, min(32, -(-int(2.5 * L2_BYTES) // nbytes)))


def _bench(fns: list, device: str) -> float:
    """µs of one call: on CUDA, the replay of one graph of >= 20 back-to-back calls that
    cycle through `fns` (one per weight copy: cold L2, no launch gaps), median of 5; on the
    CPU one wall-clock call."""
    if device != "cuda":
        t0 = time.perf_counter()
        fns[0]()
        return 1e6 * (time.perf_counter() - t0)
    calls = [fns[i % len(fns)] for i in range(max(20, len(fns)))]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compile, allocate) off the graph
        for fn in calls:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    del graph
    return statistics.median(times)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _int4_case(k: int, n: int, device: str, gen: torch.Generator) -> dict:
    qweight = torch.randint(-2**31, 2**31 - 1, (k // 8, n), generator=gen, device=device,
                            dtype=torch.int64).to(torch.int32)
    groups = k // GROUP
    zeros = torch.randint(0, 16, (groups, n), generator=gen, device=device).half()
    scales = (torch.rand(groups, n, generator=gen, device=device) * 0.004 + 0.001).half()
    dense = dequantize(qweight, zeros, scales, 4, GROUP).t().to(torch.bfloat16).contiguous()
    nbytes = k * n // 2 + 2 * groups * n * 2
    packs = [(qweight, zeros, scales)] + [
        (qweight.clone(), zeros.clone(), scales.clone())
        for _ in range(_copies(nbytes, device) - 1)]
    return {
        "bytes": nbytes,
        "dense": [dense] + [dense.clone() for _ in range(_copies(2 * k * n, device) - 1)],
        "weights": packs,
        "ref": lambda x: int_linear_ref(x, qweight, zeros, scales, 4, GROUP),
        "gemv": lambda x, w, cfg: int_gemv(x, *w, 4, GROUP, config=cfg),
        "today": lambda x, w: int_gemm(x, *w, 4, GROUP),
    }


def _fp8_case(k: int, n: int, device: str, gen: torch.Generator) -> dict:
    w = torch.randn(n, k, generator=gen, device=device) * 0.02
    q, s = fp8_gemm.quantize_weight_per_channel(w)
    dense = (q.float() * s[:, None]).to(torch.bfloat16)
    del w

    def today(x: torch.Tensor, w: tuple) -> torch.Tensor:  # the W8A8 path the GEMV replaces
        xq, xs = fp8_gemm.quantize_activations(x, None)
        if fp8_gemm._scaled_mm_ok(x, w[0]):
            return fp8_gemm.gemm_scaled_mm(xq, xs, w[0], w[1], True)
        return fp8_gemm.gemm_emulated(xq, xs, w[0], w[1])

    nbytes = k * n + 4 * n
    return {
        "bytes": nbytes,
        "dense": [dense] + [dense.clone() for _ in range(_copies(2 * k * n, device) - 1)],
        "weights": [(q, s)] + [(q.clone(), s.clone())
                               for _ in range(_copies(nbytes, device) - 1)],
        "ref": lambda x: fp8_gemv_ref(x, q, s),
        "gemv": lambda x, w, cfg: fp8_gemv(x, *w, cfg),
        "today": today,
    }


def _bf16_case(k: int, n: int, device: str, gen: torch.Generator) -> dict:
    w = (torch.randn(n, k, generator=gen, device=device) * 0.02).to(torch.bfloat16)
    copies = [w] + [w.clone() for _ in range(_copies(2 * k * n, device) - 1)]
    return {
        "bytes": 2 * k * n,
        "dense": copies,
        "weights": copies,
        "ref": lambda x: (x.float() @ w.float().t()).to(x.dtype),
        "gemv": lambda x, w, cfg: dense_gemv(x, w, cfg),
        "today": lambda x, w: F.linear(x, w),  # cuBLAS: what the GEMV must beat
    }


CASES = {"int4": _int4_case, "fp8": _fp8_case, "bf16": _bf16_case}


def _sweep_shape(kind: str, name: str, k: int, n: int, ms: list[int], device: str,
                 smoke: bool, winners: dict, wide: bool = False) -> bool:
    gen = torch.Generator(device=device).manual_seed(0)
    case = CASES[kind](k, n, device, gen)
    dtype = torch.bfloat16
    failed = False
    for m in ms:
        x = (torch.randn(m, k, generator=gen, device=device) * 0.5).to(dtype)
        ref = case["ref"](x)
        best: tuple[float, GemvConfig] | None = None
        timed: list[tuple[float, GemvConfig]] = []
        fails = 0
        weights = case["weights"]
        for cfg in [None, *_grid(kind, m, smoke, wide)]:
            try:
                out = case["gemv"](x, weights[0], cfg)
            except Exception as e:  # a config the compiler refuses (resources): skip it
                print(f"  {kind} {name} M={m} {cfg}: {type(e).__name__}: {str(e)[:120]}",
                      flush=True)
                continue
            err = _rel(out, ref)
            if err > 1e-2:
                fails += 1
                failed = True
                print(f"  FAIL {kind} {name} M={m} {cfg or 'default'}: rel err {err:.1e}",
                      flush=True)
                continue
            if cfg is None:
                continue  # the defaults: checked, not a candidate
            us = _bench([lambda c=cfg, x=x, w=w: case["gemv"](x, w, c) for w in weights],
                        device)
            timed.append((us, cfg))
            if best is None or us < best[0]:
                best = (us, cfg)
        default_us = _bench([lambda x=x, w=w: case["gemv"](x, w, None) for w in weights],
                            device)
        bf16_us = _bench([lambda x=x, d=d: F.linear(x, d) for d in case["dense"]], device)
        today_us = _bench([lambda x=x, w=w: case["today"](x, w) for w in weights], device)
        if best is None:
            print(f"| {kind} | {name} {k}x{n} | {m} | no valid config | | | | | |", flush=True)
            continue
        us, cfg = best
        for t, c in sorted(timed, key=lambda tc: tc[0])[:4]:  # the runners-up, for the notes
            print(f"  top {kind} {name} M={m}: {t:.1f} us {_short(c)}", flush=True)
        nbytes = case["bytes"] + 2 * m * (k + n)
        gbs = nbytes / (us * 1e-6) / 1e9
        winners[(kind, gemv_config.m_bucket(m), n, k)] = (cfg, us, today_us)
        print(f"| {kind} | {name} {k}x{n} | {m} | {_short(cfg)} | {us:.1f} | {default_us:.1f} "
              f"| {gbs:.0f} | {gbs * 1e9 / PEAK:.0%} | {bf16_us / us:.2f}x | "
              f"{today_us / us:.2f}x | {fails} |", flush=True)
    return failed


def _short(cfg: GemvConfig) -> str:
    how = ("dot-swap" if cfg.swap_ab else "dot") if cfg.use_dot else "fma"
    return (f"{how}{' pf' if cfg.prefetch else ''}{' in' if cfg.inplace else ''} n{cfg.block_n} k{cfg.block_k} "
            f"s{cfg.split_k or 'auto'} w{cfg.num_warps} st{cfg.num_stages}")


def _report(winners: dict, json_path: str | None) -> None:
    print("\n# paste into pagedllm/model_executor/layers/ops/gemv_config.py")
    print("TUNED: dict[tuple[str, int, int, int], GemvConfig] = {")
    winners = {key: w for key, w in winners.items()
               if key[0] != "bf16" or w[1] < w[2]}  # 16-bit: only where cuBLAS lost
    for (kind, m, n, k), (cfg, _, _) in sorted(winners.items()):
        print(f"    ({kind!r}, {m}, {n}, {k}): GemvConfig({cfg.block_n}, {cfg.block_k}, "
              f"{cfg.split_k}, {cfg.num_warps}, {cfg.num_stages}, use_dot={cfg.use_dot}, "
              f"swap_ab={cfg.swap_ab}, prefetch={cfg.prefetch}, inplace={cfg.inplace}),")
    print("}")
    for kind in sorted({w[0] for w in winners}):
        ms = sorted({m for (kd, m, _, _) in winners if kd == kind})
        wins = [m for m in ms if all(today > us for (kd, mm, _, _), (_, us, today)
                                     in winners.items() if kd == kind and mm == m)]
        limit = 0
        for m in ms:  # the largest M up to which every shape wins
            if m not in wins:
                break
            limit = m
        const = {"fp8": "FP8_GEMV_MAX_M", "bf16": "DENSE_GEMV_MAX_M"}.get(kind, "INT_GEMV_MAX_M")
        print(f"# {kind}: GEMV faster than today's path at every shape for M <= {limit} "
              f"(M buckets winning: {wins}) -> {const} = {limit}")
    if json_path:
        rows = [{"kind": kind, "m": m, "n": n, "k": k, "config": cfg.to_json()}
                for (kind, m, n, k), (cfg, _, _) in sorted(winners.items())]
        Path(json_path).write_text(json.dumps(rows, indent=1))
        print(f"# wrote {json_path} (PAGEDLLM_GEMV_CONFIG={json_path})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="int4,fp8")
    parser.add_argument("--ms", default="1,2,4,8,16,32")
    parser.add_argument("--shapes", default=",".join(SHAPES_8B))
    parser.add_argument("--json", default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter)")
    parser.add_argument("--wide", action="store_true", help="the wider M <= 2 grid")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    smoke = args.smoke or device == "cpu"
    if device == "cpu":
        fp8_gemm.GEMV_ON_CPU = True
    shapes = {"tiny": (256, 48)} if smoke else {s: SHAPES_8B[s] for s in args.shapes.split(",")}
    ms = [1, 3] if smoke else [int(m) for m in args.ms.split(",")]
    if device == "cuda":
        from pagedllm.model_executor.layers.ops.split_k import prepare

        prepare(torch.device(device))
        print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    print("| kind | shape KxN | M | best config | µs | default µs | GB/s | of 4.0 TB/s | "
          "vs bf16 | vs today | fails |")
    print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    winners: dict = {}
    failed = False
    t0 = time.perf_counter()
    for kind in args.kinds.split(","):
        kind_shapes = shapes if smoke else {**shapes, **EXTRA_SHAPES.get(kind, {})}
        for name, (k, n) in kind_shapes.items():
            failed |= _sweep_shape(kind, name, k, n, ms, device, smoke, winners, args.wide)
            if device == "cuda":
                torch.cuda.empty_cache()
        print(f"# {kind} done at {time.perf_counter() - t0:.0f} s", flush=True)
    _report(winners, args.json)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
