"""Per-step cost of structured outputs: the same decode batch with and without a 20-field JSON
schema, at batch 1, 16 and 64, plus grammar compile time (cold and cached).

    python benchmarks/structured_outputs.py [--model PATH] [--batches 1,16,64] [--steps 24]
        [--rounds 3]
        [--async-scheduling] [--backend auto|xgrammar|guidance] [--json OUT]

Each row: B requests of the same prompt decode together; after every request has its first
token, `--steps` engine steps are timed (no request finishes inside the window). The
constrained run differs only in `structured_outputs=StructuredOutputsParams(json=SCHEMA)`.
Defaults to the default model on CPU; pass `--model` (e.g. a random Llama-3.1-8B directory)
and run on the GPU for the H200 figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pagedllm import LLM, SamplingParams, StructuredOutputsParams  # noqa: E402
from pagedllm.entrypoints.bench_serve import schema_20_fields  # noqa: E402

PROMPT = ("Fill in a customer record as one JSON object with fields field_00 to field_19: "
          "names, counts, flags, colours, amounts and tag lists.")


def _params(constrained: bool, max_tokens: int) -> SamplingParams:
    so = StructuredOutputsParams(json=schema_20_fields()) if constrained else None
    return SamplingParams(temperature=0.8, seed=1, max_tokens=max_tokens, ignore_eos=True,
                          structured_outputs=so)


class FillTimer:
    """Wraps the manager's bitmask fill to time it (the host cost constrained steps add)."""

    def __init__(self, mgr) -> None:
        self.mgr, self.inner, self.times = mgr, mgr.grammar_bitmask, []
        mgr.grammar_bitmask = self

    def __call__(self, *a):
        t0 = time.perf_counter()
        out = self.inner(*a)
        self.times.append(time.perf_counter() - t0)
        return out


def time_steps(llm: LLM, batch: int, constrained: bool, steps: int, tag: str) -> list[float]:
    """Seconds of each timed engine step of a decode batch of `batch` requests."""
    engine = llm.llm_engine
    params = _params(constrained, max_tokens=4 * steps + 64)
    for i in range(batch):
        engine.add_request(f"{tag}-{i}", PROMPT, params)
    seen: set[str] = set()
    while len(seen) < batch:  # prefill (and each request's first token)
        for out in engine.step():
            if out.outputs and out.outputs[0].token_ids:
                seen.add(out.request_id)
    for _ in range(2):
        engine.step()  # warm
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        outs = engine.step()
        times.append(time.perf_counter() - t0)
        assert not any(o.finished for o in outs), "a request finished inside the window"
    engine.abort_request([f"{tag}-{i}" for i in range(batch)])
    while engine.has_unfinished_requests():
        engine.step()
    return times


def compile_times(llm: LLM) -> dict[str, float]:
    """Seconds to compile the 20-field schema cold (first time) and again (cache hit)."""
    from pagedllm.structured_output import grammar_spec

    mgr = llm.llm_engine.engine_core.structured_output_manager
    mgr.backend  # noqa: B018 (the tokenizer info is built once per engine, not per grammar)
    schema = schema_20_fields()
    schema["properties"]["field_00"] = {"type": "string", "maxLength": 17}  # a new spec
    spec = grammar_spec(StructuredOutputsParams(json=schema))
    t0 = time.perf_counter()
    mgr.compile_async(spec).result()
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    mgr.compile_async(spec).result()
    cached = time.perf_counter() - t0
    return {"compile_cold_s": cold, "compile_cached_s": cached}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--random-8b", action="store_true",
                   help="a random Llama-3.1-8B (bf16) over the default model's 49152-token "
                   "vocabulary and tokenizer: 8B step times, a real tokenizer for the grammar")
    p.add_argument("--tokenizer", default=None,
                   help="with --random-8b: a directory holding the default model's tokenizer "
                   "(tokenizer.json, e.g. saved with save_pretrained) where its package is absent")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--backend", default="auto")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    tokenizer = None
    if args.random_8b:
        from pagedllm.entrypoints.bench import LLAMA_3_1_8B, build_random_llama
        from pagedllm.model_executor.loader import resolve_model

        cfg = {**LLAMA_3_1_8B, "vocab_size": 49152, "bos_token_id": 1, "eos_token_id": 2}
        args.model = build_random_llama("/tmp/pagedllm_models/llama-3.1-8b-v49152", cfg)
        tokenizer = args.tokenizer or resolve_model(None).tokenizer_path
    llm = LLM(model=args.model, tokenizer=tokenizer, structured_outputs_backend=args.backend,
              async_scheduling=args.async_scheduling, max_num_seqs=max(64, *map(
                  int, args.batches.split(","))))
    results = {"compile": compile_times(llm), "rows": []}
    print(f"compile: cold {results['compile']['compile_cold_s'] * 1e3:.1f} ms, "
          f"cached {results['compile']['compile_cached_s'] * 1e6:.0f} us")
    fill = FillTimer(llm.llm_engine.engine_core.structured_output_manager)
    print(f"{'batch':>5} {'plain ms/step':>14} {'json ms/step':>13} {'overhead':>9} "
          f"{'mask fill ms':>13}")
    for b in map(int, args.batches.split(",")):
        # Alternating rounds, medians over all steps: a busy machine drifts less between them.
        plain_t, json_t = [], []
        fill.times.clear()
        for r in range(args.rounds):
            plain_t += time_steps(llm, b, False, args.steps, f"p{b}-{r}")
            json_t += time_steps(llm, b, True, args.steps, f"c{b}-{r}")
        plain, constrained = statistics.median(plain_t), statistics.median(json_t)
        row = {"batch": b, "plain_step_s": plain, "json_step_s": constrained,
               "overhead": constrained / plain - 1,
               "mask_fill_s": statistics.median(fill.times)}
        results["rows"].append(row)
        print(f"{b:>5} {plain * 1e3:>14.2f} {constrained * 1e3:>13.2f} "
              f"{row['overhead'] * 100:>8.1f}% {row['mask_fill_s'] * 1e3:>13.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
