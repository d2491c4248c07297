"""Checks and times the fp8 paths on a CUDA GPU: the W8A8 GEMM against bf16 cuBLAS, the
activation quantization kernel, and decode attention over an fp8 vs a bf16 KV cache.

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_fp8.py

Shapes follow Llama-3.1-8B (hidden 4096, MLP 14336, 32 heads, 8 KV heads, head_dim 128).
Each fp8 result is checked against the fp32 emulation of the same arithmetic
(||out - ref|| / ||ref|| <= 1e-2); times are medians of CUDA-event-timed loops.
"""

from __future__ import annotations

import statistics
import sys
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

from pagedllm.model_executor.layers.quantization import fp8_gemm  # noqa: E402

# (name, in_features, out_features) of Llama-3.1-8B's linear layers.
LAYERS = [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672),
          ("down", 14336, 4096)]
TOKENS = [1, 16, 64, 256, 1024, 4096]


def _time(fn, *args, **kwargs) -> float:
    """Median microseconds per call of fn(*args, **kwargs) over 50 timed calls."""
    for _ in range(5):
        fn(*args, **kwargs)
    times = []
    for _ in range(50):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args, **kwargs)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def bench_gemm() -> None:
    print("fp8 W8A8 GEMM (dynamic per-token activations, per-channel weights) vs bf16 F.linear")
    print(f"{'layer':8} {'M':>5} {'bf16 us':>9} {'fp8 us':>9} {'speed-up':>8} {'rel err':>8}")
    for name, k, n in LAYERS:
        w16 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        wq, ws = fp8_gemm.quantize_weight_per_channel(w16)
        for m in TOKENS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            out = fp8_gemm.apply_fp8_linear(x, wq, ws, None)
            xq, xs = fp8_gemm.quantize_fp8_ref(x)
            ref = fp8_gemm.gemm_emulated(xq, xs, wq, ws)
            err = _rel(out, ref)
            t16 = _time(F.linear, x, w16)
            t8 = _time(fp8_gemm.apply_fp8_linear, x, wq, ws, None)
            flag = "" if err <= 1e-2 else "  FAIL"
            print(f"{name:8} {m:5d} {t16:9.1f} {t8:9.1f} {t16 / t8:8.2f} {err:8.1e}{flag}")


def bench_quant_kernel() -> None:
    from pagedllm.model_executor.layers.ops.fp8_quant import quantize_fp8

    print("\nactivation quantization kernel (per token), bf16 in")
    for m, k in [(1, 4096), (256, 4096), (4096, 4096), (4096, 14336)]:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        q, s = quantize_fp8(x)
        qr, sr = fp8_gemm.quantize_fp8_ref(x)
        mismatch = (q.float() != qr.float()).float().mean().item()
        t = _time(quantize_fp8, x)
        gbps = (x.numel() * 3) / (t * 1e-6) / 1e9
        print(f"M {m:5d} K {k:6d}: {t:7.1f} us, {gbps:6.0f} GB/s, codes differing from torch "
              f"{mismatch:.1e}, scales max rel diff {((s - sr).abs() / sr).max().item():.1e}")


def bench_kv_attention() -> None:
    from pagedllm.attention.fp8_kv import FP8_KV_DTYPE, quantize_kv
    from pagedllm.attention.ops.paged_attention import paged_attention, paged_attention_ref

    print("\ndecode attention, 8 KV heads x 128, block 16: bf16 vs fp8 KV cache")
    for num_reqs, ctx in [(1, 8192), (32, 2048), (128, 1024)]:
        blocks = -(-ctx // 16)
        cache16 = torch.randn(2, num_reqs * blocks, 16, 8, 128, device="cuda",
                              dtype=torch.bfloat16)
        cache8 = quantize_kv(cache16, FP8_KV_DTYPE, 0.02)
        q = torch.randn(num_reqs, 32, 128, device="cuda", dtype=torch.bfloat16)
        meta = dict(
            query_start_loc=torch.arange(num_reqs + 1, device="cuda", dtype=torch.int32),
            seq_lens=torch.full((num_reqs,), ctx, device="cuda", dtype=torch.int32),
            block_table=torch.arange(num_reqs * blocks, device="cuda",
                                     dtype=torch.int32).view(num_reqs, blocks),
            num_reqs=num_reqs, max_query_len=1, scale=128**-0.5)
        t16 = _time(paged_attention, q, cache16, **meta)
        t8 = _time(paged_attention, q, cache8, k_scale=0.02, v_scale=0.02, **meta)
        out = paged_attention(q, cache8, k_scale=0.02, v_scale=0.02, **meta)
        ref = paged_attention_ref(q, cache8, meta["query_start_loc"], meta["seq_lens"],
                                  meta["block_table"], meta["scale"], k_scale=0.02,
                                  v_scale=0.02)
        print(f"{num_reqs:4d} reqs x {ctx:5d}: bf16 {t16:7.1f} us, fp8 {t8:7.1f} us "
              f"({t16 / t8:.2f}x), rel err vs ref {_rel(out, ref):.1e}")


if __name__ == "__main__":
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability(),
          "torch", torch.__version__)
    bench_gemm()
    bench_quant_kernel()
    bench_kv_attention()
