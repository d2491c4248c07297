"""Where a decode step's GPU time goes: kernel time per step by kernel family (device machine).

Runs the random Llama-3.1-8B config (bf16) through the engine with B requests of P-token
prompts, skips the prefill and warm-up steps, then records a few decode steps with the torch
profiler (CUDA graphs stay on: graph replays are traced kernel by kernel) and prints, per batch
size, the GPU time of each kernel family per step next to the step's weight + KV-read floor.

    python3 benchmarks/gpu_profile.py --batches 1,32,96,256 --prompt-len 400
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
    ("attention", r"attention|attn"),
    ("gemm", r"gemm|cutlass|sm90_xmma|nvjet|cublas|matmul|_mm_"),
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


def profile_decode(llm: LLM, batch: int, prompt_len: int, steps: int) -> dict[str, float]:
    engine = llm.llm_engine
    g = torch.Generator().manual_seed(batch)
    for i in range(batch):
        ids = torch.randint(0, 128000, (prompt_len,), generator=g).tolist()
        engine.add_request(f"p{batch}-{i}", {"prompt_token_ids": ids},
                           SamplingParams(temperature=0, max_tokens=steps + 40, ignore_eos=True))
    for _ in range(20):  # prefill chunks and the first decodes
        engine.step()
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
    per: dict[str, float] = defaultdict(float)
    names: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if t <= 0 or evt.key.startswith("cuda") or evt.key.startswith("Memcpy"):
            continue
        per[family(evt.key)] += t / 1e3 / steps
        names[evt.key] += t / 1e3 / steps
    top = sorted(names.items(), key=lambda kv: -kv[1])[:8]
    return {"wall_ms": wall * 1e3, **per, "_top": top}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", default="1,32,96,256")
    ap.add_argument("--prompt-len", type=int, default=400)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    model_dir = resolve_model_arg("random:llama-3.1-8b", "bfloat16")
    llm = LLM(model=model_dir, dtype="bfloat16", max_model_len=4096, max_num_seqs=256,
              gpu_memory_utilization=0.85, skip_tokenizer_init=True)
    kv_per_token = 32 * 2 * 8 * 128 * 2
    weight_bytes = 8.03e9 * 2
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        r = profile_decode(llm, b, args.prompt_len, args.steps)
        ctx = args.prompt_len + 30
        floor = (weight_bytes + b * ctx * kv_per_token) / 4.22e12 * 1e3
        rows.append((b, floor, r))
        print(f"batch {b}: top kernels (ms/step):", flush=True)
        for name, t in r["_top"]:
            print(f"  {t:7.3f}  {name[:110]}", flush=True)
    cols = ["attention", "gemm", "norm", "rotary", "kv write", "silu", "sampling", "other"]
    print("| batch | floor ms | step wall ms | GPU ms | " + " | ".join(cols) + " |")
    print("|---" * (4 + len(cols)) + "|")
    for b, floor, r in rows:
        gpu = sum(r.get(c, 0.0) for c in cols)
        print(f"| {b} | {floor:.2f} | {r['wall_ms']:.2f} | {gpu:.2f} | "
              + " | ".join(f"{r.get(c, 0.0):.2f}" for c in cols) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
