"""Where one CPU decode step's time goes: GGUF matmuls, the model forward around them, and the
engine's host work, for one greedy stream of the default model (packed GGUF weights).

A prompt of P random token ids (default 128) and N greedy decode tokens (default 64). The
decode steps' wall and process CPU time are split by timers wrapped around the packed matmul
kernels (`gguf_kernels.gguf_mm_x16`, `gguf_mm_f32` and friends, LM head included), the model
forward, `compute_logits` and the sampler; "engine host" is the rest of the step (schedule, input preparation, update, output
processing). Then, optionally, torch.profiler's op table and cProfile's top functions of the
same decode.

    OMP_NUM_THREADS=1 python benchmarks/cpu_decode_profile.py --threads 1 [--ops] [--cprofile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_acc: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])


def _timed(name: str, fn):
    def wrapper(*args, **kwargs):
        t, c = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            a = _acc[name]
            a[0] += time.perf_counter() - t
            a[1] += time.process_time() - c
            a[2] += 1

    return wrapper


def _install_timers() -> None:
    import pagedllm.model_executor.layers.quantization.gguf_kernels as gk
    from pagedllm.model_executor.models.llama import LlamaForCausalLM
    from pagedllm.sample.sampler import Sampler

    # Every packed kernel counts as "gguf_mm": the float-activation one (decode, the default),
    # the int8 one and the dequantized-tile GEMM (prefill).
    for name in ("gguf_mm", "gguf_mm_f32", "gguf_mm_x16", "gguf_mm_dequant"):
        setattr(gk, name, _timed("gguf_mm", getattr(gk, name)))
    LlamaForCausalLM.forward = _timed("forward", LlamaForCausalLM.forward)
    LlamaForCausalLM.compute_logits = _timed("logits", LlamaForCausalLM.compute_logits)
    Sampler.__call__ = _timed("sampler", Sampler.__call__)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ops", action="store_true", help="torch.profiler op table")
    ap.add_argument("--cprofile", action="store_true", help="cProfile top functions")
    ap.add_argument("--quantization", default="gguf")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    _install_timers()
    from pagedllm import LLM, SamplingParams

    llm = LLM(model=None, quantization=args.quantization or None,
              max_model_len=args.prompt_len + args.output_len + 16)
    rng = np.random.default_rng(0)
    P, N = args.prompt_len, args.output_len

    def run(n: int) -> tuple[float, float, dict[str, list[float]]]:
        prompt = {"prompt_token_ids": rng.integers(100, 40000, size=P).tolist()}
        sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        _acc.clear()
        t, c = time.perf_counter(), time.process_time()
        llm.generate([prompt], sp, use_tqdm=False)
        return time.perf_counter() - t, time.process_time() - c, {k: list(v) for k, v in
                                                                   _acc.items()}

    run(8)
    best = None
    for _ in range(args.repeats):
        w1, c1, a1 = run(1)
        wn, cn, an = run(N + 1)
        d = {k: [(an[k][0] - a1.get(k, [0, 0])[0]) / N * 1e3,
                 (an[k][1] - a1.get(k, [0, 0])[1]) / N * 1e3] for k in an}
        d["step"] = [(wn - w1) / N * 1e3, (cn - c1) / N * 1e3]
        if best is None or d["step"][1] < best["step"][1]:
            best = d
    mm, fwd, lg, smp, step = (best.get(k, [0.0, 0.0]) for k in
                              ("gguf_mm", "forward", "logits", "sampler", "step"))
    # The LM head's gguf_mm sits inside compute_logits, the layers' inside forward.
    rows = [
        ("gguf mm (layers + LM head)", mm),
        ("forward + logits outside the gguf mm",
         [fwd[i] + lg[i] - mm[i] for i in range(2)]),
        ("sampler", smp),
        ("engine host (schedule, inputs, update, output)",
         [step[i] - fwd[i] - lg[i] - smp[i] for i in range(2)]),
        ("whole decode step", step),
    ]
    load = os.getloadavg()
    print(f"threads {args.threads}; prompt {P}, decode {N}; load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; best of {args.repeats} by CPU time")
    print(f"{'part':48s} {'wall ms/step':>13s} {'CPU ms/step':>12s}")
    for name, (w, c) in rows:
        print(f"{name:48s} {w:13.2f} {c / args.threads:12.2f}")
    print(f"decode tok/s: {1e3 / step[0]:.1f} wall, {1e3 * args.threads / step[1]:.1f} per CPU s")
    if args.ops:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(N + 1)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    if args.cprofile:
        pr = cProfile.Profile()
        pr.enable()
        run(N + 1)
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(30)
        print(s.getvalue())


if __name__ == "__main__":
    main()
