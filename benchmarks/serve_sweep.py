"""Serving latency sweep: `pagedllm bench serve` at several concurrency levels, one table.

Starts `pagedllm serve` (unless --base-url points at a running server), runs the
sharegpt-shaped workload at each `--concurrency` level (all requests submitted at once, at most
C in flight), and prints a markdown table with the device, date, commit and command, the rows
that docs/benchmarks.md ("Serving latency") publishes. One JSON result per level goes to
--out-dir.

Example (the CPU figures): python benchmarks/serve_sweep.py --concurrency 1 8 32 \\
    --num-prompts 200 --prompts-at 1=50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pagedllm.entrypoints import bench_serve  # noqa: E402

COLUMNS = [
    ("concurrency", "C", "{}"), ("num_prompts", "prompts", "{}"),
    ("request_throughput", "req/s", "{:.2f}"), ("output_throughput", "out tok/s", "{:.1f}"),
    ("total_token_throughput", "total tok/s", "{:.1f}"),
    ("median_ttft_ms", "TTFT med ms", "{:.0f}"), ("p99_ttft_ms", "TTFT p99 ms", "{:.0f}"),
    ("median_tpot_ms", "TPOT med ms", "{:.1f}"), ("p99_tpot_ms", "TPOT p99 ms", "{:.1f}"),
    ("median_itl_ms", "ITL med ms", "{:.1f}"), ("p99_itl_ms", "ITL p99 ms", "{:.1f}"),
    ("failed", "failed", "{}"),
]


def device_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores"


def commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                       text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def start_server(port: int, server_args: list[str], log_path: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", "--port", str(port),
           "--disable-uvicorn-access-log", "--disable-log-requests", *server_args]
    proc = subprocess.Popen(cmd, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"server not ready in 300 s; see {log_path}")


def run_level(
    base_url: str, concurrency: int, num_prompts: int, seed: int, extra: list[str]
) -> dict:
    parser = argparse.ArgumentParser()
    bench_serve.add_cli_args(parser)
    args = parser.parse_args([
        "--base-url", base_url, "--dataset", "sharegpt-shaped", "--num-prompts", str(num_prompts),
        "--max-concurrency", str(concurrency), "--seed", str(seed), "--disable-tqdm", *extra,
    ])
    result = asyncio.run(bench_serve.benchmark(args, bench_serve.make_requests(args)))
    result.pop("_results")
    result["concurrency"] = concurrency
    return result


def markdown(rows: list[dict]) -> str:
    head = "| " + " | ".join(c[1] for c in COLUMNS) + " |"
    sep = "|" + "---|" * len(COLUMNS)
    body = ["| " + " | ".join(fmt.format(r[key]) for key, _, fmt in COLUMNS) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default=None, help="use this running server")
    p.add_argument("--port", type=int, default=8123, help="port of the server we start")
    p.add_argument("--server-args", default="", help="extra `pagedllm serve` flags (one string)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--prompts-at", nargs="*", default=[], metavar="C=N",
                   help="run N prompts at concurrency C instead (the workload drawn for N "
                   "prompts, as `bench serve --num-prompts N` would)")
    p.add_argument("--bench-args", default="", help="extra `bench serve` flags (one string)")
    p.add_argument("--out-dir", default="serve_sweep_results")
    p.add_argument("--seed", type=int, default=0,
                   help="workload seed of the first level, +1 per level: random token-id prompts "
                   "then never hit the prefix cache an earlier level left on the server")
    a = p.parse_args(argv)
    overrides = {int(k): int(v) for k, v in (x.split("=") for x in a.prompts_at)}
    os.makedirs(a.out_dir, exist_ok=True)
    proc = None
    base_url = a.base_url
    # SIGTERM (timeout, kill) must still stop the server we started: run the `finally` below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if base_url is None:
        proc = start_server(a.port, shlex.split(a.server_args),
                            os.path.join(a.out_dir, "server.log"))
        base_url = f"http://127.0.0.1:{a.port}"
    rows = []
    code_commit = commit()  # the code the server runs, whatever is committed meanwhile
    try:
        for i, c in enumerate(a.concurrency):
            n = overrides.get(c, a.num_prompts)
            load = os.getloadavg()[0]
            res = run_level(base_url, c, n, a.seed + i, shlex.split(a.bench_args))
            res["loadavg_before"] = load
            with open(os.path.join(a.out_dir, f"c{c}.json"), "w") as f:
                json.dump(res, f, indent=1)
            rows.append(res)
            print(bench_serve.format_report(res, f" concurrency {c}, {n} prompts "), flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    print(f"\nDevice: {device_name()}. Date: {datetime.now(timezone.utc):%Y-%m-%d}. "
          f"Commit: {code_commit}. Load average before each level: "
          + ", ".join(f"{r['loadavg_before']:.1f}" for r in rows))
    print("Command: python benchmarks/serve_sweep.py " + " ".join(map(shlex.quote, sys.argv[1:]
                                                                         if argv is None else argv)))
    print(markdown(rows))
    return 0 if all(r["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
