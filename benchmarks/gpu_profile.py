"""Where a decode step's GPU time goes: kernel time per step by kernel family (device machine).

Runs the random Llama-3.1-8B config (bf16) through the engine with B requests of P-token
prompts, skips the prefill and warm-up steps, then records a few decode steps with the torch
profiler (CUDA graphs stay on: graph replays are traced kernel by kernel) and prints, per batch
size, the GPU time of each kernel family per step next to the step's weight + KV-read floor.

    python3 benchmarks/gpu_profile.py --batches 1,32,96,256 --prompt-len 400

`--mixed D:N:P` also profiles the eager steps that prefill N new P-token prompts while D
requests decode (what a busy server runs when requests arrive), next to their matmul floor.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pagedllm import LLM, SamplingParams  # noqa: E402
from pagedllm.entrypoints.bench import resolve_model_arg  # noqa: E402

FAMILIES = [
    ("attention", r"attention|attn|split_kv"),
    ("gemm", r"gemm|gemv|cutlass|sm90_xmma|nvjet|cublas|matmul|_mm_"),
    ("norm", r"rms|norm"),
    ("rotary", r"rotary|rope"),
    ("kv write", r"reshape_and_cache|cache"),
    ("silu", r"silu|act_and_mul"),
    ("sampling", r"argmax|sort|softmax|exponential|topk|reduce|scatter|gather|index"),
]


def family(name: str) -> str:
    low = name.lower()
    for fam, pat in FAMILIES:
        if re.search(pat, low):
            return fam
    return "other"


def _add(engine, tag: str, n: int, prompt_len: int, max_tokens: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        ids = torch.randint(0, 128000, (prompt_len,), generator=g).tolist()
        engine.add_request(f"{tag}-{i}", {"prompt_token_ids": ids},
                           SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))


def _profiled(engine, steps: int) -> tuple[float, object]:
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CUDA]
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps
    while engine.has_unfinished_requests():
        engine.step()
    return wall, prof


def profile_decode(llm: LLM, batch: int, prompt_len: int, steps: int) -> dict[str, float]:
    engine = llm.llm_engine
    _add(engine, f"p{batch}", batch, prompt_len, steps + 40, batch)
    for _ in range(20):  # prefill chunks and the first decodes
        engine.step()
    wall, prof = _profiled(engine, steps)
    return _by_family(prof, steps, wall)


def profile_mixed(llm: LLM, decodes: int, n: int, prompt_len: int) -> tuple[int, dict]:
    """Eager steps prefilling n prompts of prompt_len while `decodes` requests decode."""
    engine = llm.llm_engine
    budget = llm.llm_engine.config.scheduler_config.max_num_batched_tokens
    _add(engine, f"d{decodes}", decodes, 64, 400, decodes)
    for _ in range(20):
        engine.step()
    _add(engine, f"m{n}", n, prompt_len, 1, n + 7)
    steps = max(1, -(-n * prompt_len // (budget - decodes)))
    wall, prof = _profiled(engine, steps)
    return steps, _by_family(prof, steps, wall)


def _by_family(prof, steps: int, wall: float) -> dict:
    per: dict[str, float] = defaultdict(float)
    names: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if t <= 0 or evt.key.startswith("cuda") or evt.key.startswith("Memcpy"):
            continue
        per[family(evt.key)] += t / 1e3 / steps
        names[evt.key] += t / 1e3 / steps
    top = sorted(names.items(), key=lambda kv: -kv[1])[:TOP]
    return {"wall_ms": wall * 1e3, **per, "_top": top}


TOP = 8  # kernels listed per profile (--top)
COLS = ["attention", "gemm", "norm", "rotary", "kv write", "silu", "sampling", "other"]


def _print_top(title: str, r: dict) -> None:
    print(f"{title}: top kernels (ms/step):", flush=True)
    for name, t in r["_top"]:
        print(f"  {t:7.3f}  {name[:110]}", flush=True)


def _row(label: str, floor: float, r: dict) -> str:
    gpu = sum(r.get(c, 0.0) for c in COLS)
    return (f"| {label} | {floor:.2f} | {r['wall_ms']:.2f} | {gpu:.2f} | "
            + " | ".join(f"{r.get(c, 0.0):.2f}" for c in COLS) + " |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", default="1,32,96,256")
    ap.add_argument("--prompt-len", type=int, default=400)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--mixed", default="", help="D:N:P[,D:N:P...]: N P-token prompts + D decodes")
    ap.add_argument("--model", default="random:llama-3.1-8b",
                    help="random:NAME[:gptq|awq] (bench.py's models) or a model path")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--top", type=int, default=8, help="kernels listed per profile")
    args = ap.parse_args()
    global TOP
    TOP = args.top
    model_dir = resolve_model_arg(args.model, "bfloat16", load_format=args.load_format)
    llm = LLM(model=model_dir, dtype="bfloat16", max_model_len=4096, max_num_seqs=256,
              gpu_memory_utilization=0.85, skip_tokenizer_init=True,
              load_format=args.load_format, quantization=args.quantization)
    kv_per_token = 32 * 2 * 8 * 128 * 2
    weight_bytes = 8.03e9 * 2
    rows = []
    for b in (int(x) for x in args.batches.split(",") if x):
        r = profile_decode(llm, b, args.prompt_len, args.steps)
        ctx = args.prompt_len + 30
        floor = (weight_bytes + b * ctx * kv_per_token) / 4.22e12 * 1e3
        rows.append((f"decode {b}", floor, r))
        _print_top(f"batch {b}", r)
    for spec in (m for m in args.mixed.split(",") if m):
        d, n, p = (int(x) for x in spec.split(":"))
        steps, r = profile_mixed(llm, d, n, p)
        # Floor: the step's matmul FLOPs (2 x non-embedding params per token) at 785 TFLOP/s.
        floor = 2 * 7.5e9 * (n * p + d * steps) / steps / 785e12 * 1e3
        rows.append((f"mixed {d} dec + {n}x{p} ({steps} steps)", floor, r))
        _print_top(f"mixed {spec}", r)
    print("| step | floor ms | step wall ms | GPU ms | " + " | ".join(COLS) + " |")
    print("|---" * (4 + len(COLS)) + "|")
    for label, floor, r in rows:
        print(_row(label, floor, r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
