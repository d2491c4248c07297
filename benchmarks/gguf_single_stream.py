"""Single-stream decode of the default model (SmolLM2-135M Q4_1 GGUF) through `LLM()` with
its defaults (packed GGUF kernels on CPU) or `--dtype float32` (dequantized).

Usage: OMP_NUM_THREADS=1 python benchmarks/gguf_single_stream.py [--dtype auto|float32]
Decode tok/s = (tokens of a 129-token generation - 1) / (its time - a 1-token generation's);
prints wall-clock and CPU-time (process time / threads, less disturbed on a shared machine).
"""

from __future__ import annotations

import argparse
import time

import torch

from pagedllm import LLM, SamplingParams

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def _run(llm: LLM, tokens: int) -> tuple[float, float]:
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    wall, cpu = time.perf_counter(), time.process_time()
    llm.generate([PROMPT], params, use_tqdm=False)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tokens", type=int, default=129)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    llm = LLM(dtype=args.dtype)
    print(f"quantization={llm.llm_engine.model_config.quantization} "
          f"threads={torch.get_num_threads()}")
    _run(llm, 8)  # warm-up
    threads = torch.get_num_threads()
    best_wall = best_cpu = 0.0
    for _ in range(args.repeats):
        w1, c1 = _run(llm, 1)
        wn, cn = _run(llm, args.tokens)
        n = args.tokens - 1
        best_wall = max(best_wall, n / max(wn - w1, 1e-9))
        best_cpu = max(best_cpu, n / max((cn - c1) / threads, 1e-9))
        print(f"prefill {w1 * 1e3:.0f} ms wall; decode {n / (wn - w1):.1f} tok/s wall, "
              f"{n / ((cn - c1) / threads):.1f} tok/s CPU time")
    print(f"best: decode {best_wall:.1f} tok/s wall, {best_cpu:.1f} tok/s CPU time")


if __name__ == "__main__":
    main()
