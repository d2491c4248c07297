"""Times the fused MoE Triton kernel against one dense GEMM pair per expert (the grouped torch
path) on Mixtral-8x7B expert shapes, and checks the two agree.

    PYTHONUNBUFFERED=1 python3 benchmarks/moe_kernel.py             # on a CUDA GPU
    TRITON_INTERPRET=1 python3 benchmarks/moe_kernel.py --smoke     # tiny shapes, CPU, logic

Shapes: hidden 4096, expert intermediate 14336, 8 experts, top-2, bf16; batches of 1, 64 and
512 tokens with random router logits. The check is ||fused - grouped|| / ||grouped|| <= 2e-2.
Prints milliseconds per MoE layer and the speed-up of the fused kernel.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _import_moe():
    """Imports the MoE modules without running pagedllm/__init__ (whose server-side
    dependencies the GPU image may lack)."""
    sys.path.insert(0, str(ROOT))
    if "pagedllm" not in sys.modules:
        pkg = types.ModuleType("pagedllm")
        pkg.__path__ = [str(ROOT / "pagedllm")]
        sys.modules["pagedllm"] = pkg
    from pagedllm.model_executor.layers.fused_moe import moe_gemv, routing, torch_moe, triton_moe

    return routing, torch_moe, triton_moe, moe_gemv


def _time(fn, device: str, iters: int) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (interpreter)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--sweep", action="store_true",
                        help="also time the few-token matrix-vector path over a config grid "
                        "(CUDA-graph replays, as decode runs) and print the best configs")
    args = parser.parse_args()
    routing, torch_moe, triton_moe, moe_gemv = _import_moe()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        hidden, inter, experts, batches, dtype, iters = 64, 96, 4, (1, 5, 17), torch.float32, 1
    else:
        hidden, inter, experts, batches, dtype = 4096, 14336, 8, (1, 64, 512), torch.bfloat16
        iters = args.iters
    gen = torch.Generator(device=device).manual_seed(0)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=gen, device=device) * 0.02).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=gen, device=device) * 0.02).to(dtype)
    print(f"device {device}, hidden {hidden}, intermediate {inter}, {experts} experts, top-2, "
          f"{dtype}")  # fmt: skip
    for num_tokens in batches:
        x = torch.randn(num_tokens, hidden, generator=gen, device=device).to(dtype)
        logits = torch.randn(num_tokens, experts, generator=gen, device=device)
        weights, ids = routing.select_experts(logits, 2, renormalize=True)
        fused = triton_moe.fused_experts_triton(x, w13, w2, weights, ids)
        grouped = torch_moe.grouped_experts_torch(x, w13, w2, weights, ids)
        err = ((fused.float() - grouped.float()).norm() / grouped.float().norm()).item()
        status = "ok" if err <= 2e-2 and torch.isfinite(fused).all() else "MISMATCH"
        inputs = (x, w13, w2, weights, ids)
        t_fused = _time(lambda a=inputs: triton_moe.fused_experts_triton(*a), device, iters)
        t_grouped = _time(lambda a=inputs: torch_moe.grouped_experts_torch(*a), device, iters)
        print(f"tokens {num_tokens:4d}: fused {t_fused:8.3f} ms, per-expert GEMMs "
              f"{t_grouped:8.3f} ms, speed-up {t_grouped / t_fused:5.2f}x, rel err {err:.1e} "
              f"{status}")  # fmt: skip
    if args.sweep:
        _sweep(moe_gemv, routing, triton_moe, torch_moe, w13, w2, device, dtype, args.smoke)


def _time_graph(fn, device: str, iters: int = 50) -> float:
    """Milliseconds per call replayed from a CUDA graph (no launch overhead), else plain."""
    if device != "cuda":
        return _time(fn, device, 1)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return _time(graph.replay, device, iters)


def _sweep(moe_gemv, routing, triton_moe, torch_moe, w13, w2, device, dtype, smoke) -> None:
    """Both kernels at 1-16 tokens under CUDA graphs; the gemv path over a config grid."""
    grid = [moe_gemv.GemvConfig(n, k, w, s) for n in (16, 32, 64) for k in (64, 128, 256)
            for w in (4, 8) for s in (2, 4)]  # fmt: skip
    if smoke:
        grid = grid[:2]
    gen = torch.Generator(device=device).manual_seed(1)
    best = (moe_gemv.GemvConfig(), moe_gemv.GemvConfig())
    for num_tokens in (1, 2, 4, 8, 16):
        x = torch.randn(num_tokens, w13.shape[2], generator=gen, device=device).to(dtype)
        logits = torch.randn(num_tokens, w13.shape[0], generator=gen, device=device)
        weights, ids = routing.select_experts(logits, 2, renormalize=True)
        inputs = (x, w13, w2, weights, ids)
        best = _sweep_row(moe_gemv, triton_moe, torch_moe, inputs, device, grid,
                          best if num_tokens > 2 else None, best)  # fmt: skip
    print(f"best GATE_UP_CONFIG = {best[0]}")
    print(f"best DOWN_CONFIG = {best[1]}")


def _sweep_row(moe_gemv, triton_moe, torch_moe, inputs, device, grid, fixed, best):
    """One token count: picks the configs unless `fixed`, prints the row; returns the configs."""
    x, w13, w2, weights, ids = inputs
    gemv = functools.partial(moe_gemv.fused_experts_gemv, *inputs)
    if fixed is None:  # gate_up first with the current down config, then down
        gu = min(grid, key=lambda c: _time_graph(functools.partial(gemv, c, best[1]), device))
        dn = min(grid, key=lambda c: _time_graph(functools.partial(gemv, gu, c), device))
        best = (gu, dn)
    ref = torch_moe.grouped_experts_torch(*inputs).float()
    err = ((gemv(*best).float() - ref).norm() / ref.norm()).item()
    t_gemv = _time_graph(functools.partial(gemv, *best), device)
    t_grouped = _time_graph(functools.partial(triton_moe.fused_experts_triton, *inputs), device)
    distinct = int(ids.unique().numel())
    expert_bytes = 3 * w13.shape[1] // 2 * w13.shape[2] * w13.element_size()
    gbs = distinct * expert_bytes / (t_gemv * 1e-3) / 1e9
    print(f"graph tokens {x.shape[0]:3d} ({distinct} experts): grouped {t_grouped:7.3f} ms, "
          f"gemv {t_gemv:7.3f} ms ({gbs:6.0f} GB/s of expert weights), "
          f"gemv/grouped {t_gemv / t_grouped:5.2f}, rel err {err:.1e}")  # fmt: skip
    return best


if __name__ == "__main__":
    main()
