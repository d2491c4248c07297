"""Host (CPU) cost of one engine step at many running requests, stage by stage (issue #16).

A tiny random Llama (1 layer, hidden 64, vocabulary 8192, the default model's tokenizer) makes
the model's own work small, so what remains is the engine's Python: scheduling, the model
runner's input preparation and sampling metadata, the resolution of sampled ids, the
scheduler's update, output processing and incremental detokenization. The stages are timed by
wrapping the engine's methods here (nothing is timed unless this script runs), and the table
reports the median milliseconds of this thread's CPU time per decode step (each stage's median over the decode steps
that run at least 90% of the requests, so a burst of another process does not count).

    python benchmarks/host_overhead.py [--num-requests 256 1024] [--max-tokens 64]
        [--no-async-scheduling] [--time-detokenize] [--json OUT] [--profile OUT.prof]

"host" = every stage except forward, lm_head and sample (the device's work on a GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Stages in table order: (name, "owner.attribute" wrapped, part of host time).
STAGES: list[tuple[str, bool]] = [
    ("schedule", True),
    ("update_states", True),  # the model runner applies the scheduler's diff
    ("prepare_inputs", True),  # input ids, positions, slots, block table
    ("forward", False),
    ("lm_head", False),
    ("sampling_metadata", True),
    ("sample", False),
    ("runner_other", True),  # the rest of ModelRunner.submit
    ("resolve", True),  # StepHandle.get: sampled ids to the host and into the states
    ("update", True),  # Scheduler.update_from_output
    ("output", True),  # OutputProcessor.process_outputs (detokenize included)
    ("detokenize", True),  # IncrementalDetokenizer.update, a part of "output"
    ("gc", True),  # Python's cyclic garbage collector, inside whichever stage triggered it
]


class StageTimer:
    """Accumulates wall time per stage for the current step."""

    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)

    def wrap(self, owner: object, attr: str, stage: str) -> None:
        fn: Callable = getattr(owner, attr)
        cur = self.current
        # CPU time of this thread: other processes on a shared machine do not count (torch
        # runs in this thread under OMP_NUM_THREADS=1, which main() sets).
        clock = time.thread_time

        def timed(*args, **kwargs):
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                cur[stage] += clock() - t0

        setattr(owner, attr, timed)

    def time_gc(self) -> None:
        """Adds the collector's pauses as stage "gc" (they also count in the stage that
        allocated when the collection started)."""
        cur = self.current
        started = [0.0]

        def callback(phase: str, info: dict) -> None:
            if phase == "start":
                started[0] = time.thread_time()
            else:
                cur["gc"] += time.thread_time() - started[0]

        gc.callbacks.append(callback)

    def take(self) -> dict[str, float]:
        out = dict(self.current)
        self.current.clear()
        return out


def tiny_model_dir(path: str, vocab_size: int) -> str:
    from transformers import LlamaConfig

    from pagedllm.model_executor.loader.testing import build_random_hf_model_dir

    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, architectures=["LlamaForCausalLM"],
    )  # fmt: skip
    return build_random_hf_model_dir(path, cfg, seed=0)


def instrument(engine, time_detokenize: bool) -> StageTimer:
    """Wraps the stages of one in-process engine (uni executor) with timers."""
    from pagedllm.engine import detokenizer as detok_mod
    from pagedllm.worker import model_runner as mr_mod
    from pagedllm.worker import step_handle as sh_mod

    timer = StageTimer()
    core = engine.engine_core
    runner = core.executor.worker.model_runner
    timer.wrap(core.scheduler, "schedule", "schedule")
    timer.wrap(core.scheduler, "update_from_output", "update")
    timer.wrap(engine.output_processor, "process_outputs", "output")
    timer.wrap(runner, "_update_states", "update_states")
    timer.wrap(runner.buffers, "prepare", "prepare_inputs")
    timer.wrap(runner, "_run_stage", "forward")
    timer.wrap(runner.model, "compute_logits", "lm_head")
    timer.wrap(runner, "sampler", "sample")
    timer.wrap(runner, "submit", "submit")
    timer.wrap(mr_mod, "build_sampling_metadata", "sampling_metadata")
    timer.wrap(sh_mod.StepHandle, "get", "resolve")
    if time_detokenize:  # one timer per request and step: adds ~2 us a request to "output"
        timer.wrap(detok_mod.IncrementalDetokenizer, "update", "detokenize")
    return timer


def run(args, model_dir: str, tokenizer: str, num_requests: int) -> dict:
    import numpy as np

    from pagedllm import SamplingParams
    from pagedllm.engine.arg_utils import EngineArgs
    from pagedllm.engine.llm_engine import LLMEngine

    gc.callbacks.clear()
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=model_dir, tokenizer=tokenizer, dtype="float32", kv_cache_space=1,
        max_num_seqs=max(num_requests, 1), max_num_batched_tokens=16384,
        async_scheduling=args.async_scheduling, seed=0,
    ))  # fmt: skip
    timer = instrument(engine, args.time_detokenize)
    timer.time_gc()
    rng = np.random.default_rng(0)
    vocab = engine.model_config.vocab_size
    for i in range(num_requests):
        n = int(rng.integers(args.min_prompt, args.max_prompt + 1))
        prompt = rng.integers(100, vocab - 100, size=n).tolist()
        params = SamplingParams(
            temperature=args.temperature, max_tokens=args.max_tokens, ignore_eos=True,
            output_kind=args.output_kind,
        )
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
    steps: list[tuple[int, float, dict[str, float]]] = []
    prof = cProfile.Profile() if args.profile else None
    t_start = time.perf_counter()
    with prof if prof is not None else contextlib.nullcontext():
        while engine.has_unfinished_requests():
            t0 = time.thread_time()
            engine.step()
            dt = time.thread_time() - t0
            stats = engine.last_stats
            batch = stats.num_scheduled_tokens if stats is not None else 0
            steps.append((batch, dt, timer.take()))
    total_s = time.perf_counter() - t_start
    gc_s = sum(s[2].get("gc", 0.0) for s in steps)  # the whole run, spikes included
    if prof is not None:
        prof.dump_stats(f"{args.profile}.{num_requests}")
    # Decode steps at (nearly) every request: a token each, >= 90% of the requests.
    full = [s for s in steps if num_requests * 0.9 <= s[0] <= num_requests]
    per_stage = {}  # the median step of each stage: robust to other processes' bursts
    for name, _ in STAGES + [("submit", False)]:
        per_stage[name] = 1e3 * _median([s[2].get(name, 0.0) for s in full])
    inner = ("update_states", "prepare_inputs", "forward", "lm_head", "sampling_metadata",
             "sample")
    per_stage["runner_other"] = per_stage["submit"] - sum(per_stage[k] for k in inner)
    per_stage.pop("submit")
    host = sum(per_stage[name] for name, is_host in STAGES
               if is_host and name not in ("detokenize", "gc"))
    step_ms = 1e3 * _median([s[1] for s in full])
    return {
        "num_requests": num_requests,
        "steps": len(steps),
        "decode_steps_timed": len(full),
        "total_s": total_s,
        "step_ms": step_ms,
        "host_ms": host,
        "gc_s": gc_s,
        "stages_ms": per_stage,
    }


def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2] if values else 0.0


def print_table(results: list[dict]) -> None:
    cols = [f"{r['num_requests']} reqs" for r in results]
    print(f"| ms / decode step | {' | '.join(cols)} |")
    print("|---|" + "---|" * len(results))
    for name, is_host in STAGES:
        label = name if is_host else f"{name} (device)"
        vals = " | ".join(f"{r['stages_ms'][name]:.2f}" for r in results)
        print(f"| {label} | {vals} |")
    print("| **host total** | " + " | ".join(f"**{r['host_ms']:.2f}**" for r in results) + " |")
    print("| whole step | " + " | ".join(f"{r['step_ms']:.2f}" for r in results) + " |")
    print("| gc, whole run (s) | " + " | ".join(f"{r['gc_s']:.2f}" for r in results) + " |")
    print("| decode steps timed / all | "
          + " | ".join(f"{r['decode_steps_timed']} / {r['steps']}" for r in results) + " |")


def main() -> None:
    from pagedllm.sampling_params import RequestOutputKind

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-requests", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--min-prompt", type=int, default=16)
    p.add_argument("--max-prompt", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0: greedy (the CPU sampler at temperature 1 dominates the run)")
    p.add_argument("--vocab-size", type=int, default=8192,
                   help="ids the model can sample (the first ones of SmolLM2's tokenizer); "
                        "small so that freeing the CPU logits stays out of the host figures")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--output-kind", choices=["cumulative", "delta", "final_only"],
                   default="final_only", help="final_only: what LLM.generate uses")
    p.add_argument("--time-detokenize", action="store_true",
                   help="also time IncrementalDetokenizer.update (inflates \"output\")")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--profile", help="cProfile each run to PROFILE.<num_requests>")
    args = p.parse_args()
    args.output_kind = {"cumulative": RequestOutputKind.CUMULATIVE,
                        "delta": RequestOutputKind.DELTA,
                        "final_only": RequestOutputKind.FINAL_ONLY}[args.output_kind]
    os.environ.setdefault("PAGEDLLM_LOGGING_LEVEL", "WARNING")
    import torch

    torch.set_num_threads(1)

    from pagedllm.model_executor.loader.resolve import default_model_path
    from pagedllm.tokenizer import get_tokenizer

    tokenizer = default_model_path()
    vocab = min(args.vocab_size, len(get_tokenizer(tokenizer)))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = tiny_model_dir(os.path.join(tmp, "tiny"), vocab)
        results = [run(args, model_dir, tokenizer, n) for n in args.num_requests]
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
