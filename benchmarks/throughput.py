"""Throughput on the BENCHMARKS.md workloads with one engine (run on the device machine).

Same logic as `pagedllm bench throughput`, but several datasets share one engine start-up:
    python benchmarks/throughput.py --datasets sharegpt-shaped,single-stream --hf-compare 32
Prints one JSON object per dataset and a summary table; --json writes them all.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pagedllm.entrypoints.bench import (  # noqa: E402
    WORKLOADS,
    add_throughput_args,
    make_llm,
    resolve_model_arg,
    run_throughput,
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    add_throughput_args(ap)
    ap.add_argument("--datasets", default=",".join(WORKLOADS))
    ap.add_argument("--hf-datasets", default="sharegpt-shaped",
                    help="datasets that also run the HF peer (with --hf-compare N)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--ab-async", action="store_true",
                    help="run each dataset twice on the same engine: async scheduling on, then off")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t0 = time.perf_counter()
    model_dir = resolve_model_arg(args.model, args.dtype, load_format=args.load_format)
    build_s = time.perf_counter() - t0
    llm, timings, memory = make_llm(args, model_dir)
    hf_n = args.hf_compare
    results = {"model_build_s": build_s, "startup": timings, "memory": memory, "runs": {}}
    print(json.dumps({"startup": timings, "memory": memory}), flush=True)
    core = llm.llm_engine.engine_core
    modes = [True, False] if args.ab_async else [core.async_scheduling]
    for name in args.datasets.split(","):
        for i, mode in enumerate(modes):
            # The in-flight queue is empty between runs, so the mode can change here.
            core.scheduler.async_scheduling = mode
            args.dataset = name
            args.llm = (llm, timings, memory)
            hf = hf_n if name in args.hf_datasets.split(",") and i == 0 else 0
            args.hf_compare = hf
            r = run_throughput(args)
            r.pop("startup", None)
            r.pop("memory", None)
            r["async_scheduling"] = mode
            key = name if len(modes) == 1 else f"{name} (async {'on' if mode else 'off'})"
            timeline = r.get("stages", {}).pop("timeline", None)
            if timeline:  # per-step detail goes to --json only
                results.setdefault("timelines", {})[key] = timeline
            results["runs"][key] = r
            print(json.dumps({key: r}, default=float), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=1, default=float))
    print("| dataset | req/s | out tok/s | total tok/s | roofline frac | vs HF (first N) |")
    print("|---|---|---|---|---|---|")
    for name, r in results["runs"].items():
        p = r["pagedllm"]
        ratio = f"{r['ratio_vs_hf']:.1f}x" if "ratio_vs_hf" in r else "-"
        print(f"| {name} | {p['req_per_s']:.2f} | {p['output_tok_per_s']:.0f} | "
              f"{p['total_tok_per_s']:.0f} | {p['roofline_fraction']:.2f} | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
