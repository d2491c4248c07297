"""`pagedllm bench serve`: latency under load against a running OpenAI-compatible server.

Streams every request through /v1/completions (or /v1/chat/completions) over one aiohttp
connection pool, with Poisson arrivals at `--request-rate` (inf: all at once) and an optional
cap on requests in flight (`--max-concurrency`). Reports request, output and total token
throughput, TTFT, TPOT, ITL and end-to-end latency (mean, median, p90, p99) and the failed
requests; writes a JSON result file and, with `--plot`, a PNG of the TTFT and ITL distributions.

Definitions (per successful request, times from sending the request):
- TTFT: until the first streamed chunk that carries generated text.
- ITL: the gaps between consecutive chunks that carry text (one list over all requests).
- TPOT: (latency - TTFT) / (output_tokens - 1), for requests with more than one output token.
Token counts come from the server's `usage` (`stream_options.include_usage`), never from
counting chunks; requests send `ignore_eos` and `max_tokens` so output lengths are exact.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

__all__ = [
    "SampleRequest",
    "RequestResult",
    "sample_sharegpt_shaped",
    "sample_random",
    "compute_metrics",
    "benchmark",
    "add_cli_args",
    "register_subcommand",
    "run_bench_serve",
    "main",
]

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
# Common one-token English words: chat prompts are text, built from the drawn token ids.
_WORDS = (
    "the of and to in is was for on with as by at from that this it be are or an have not "
    "but had his they you were her she which one all their there been has more when will "
    "would who so no if out up into them can only other new some time could these two may "
    "first then do any like my now over such our man me even most made after also did many "
    "before must through back years where much your way well down should because each just "
    "those people how too little state good very make world still own see men work long get"
).split()


@dataclass(slots=True)
class SampleRequest:
    """One request to send: token ids (or text) and the exact number of tokens to generate."""

    prompt: list[int] | str
    prompt_len: int
    output_len: int


@dataclass(slots=True)
class RequestResult:
    """What one request measured. Times are seconds; `itl` has one gap per text chunk after
    the first. `prompt_len`/`output_len` are the server's usage counts (0 when missing)."""

    success: bool = False
    start: float = 0.0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_len: int = 0
    output_len: int = 0
    expected_output_len: int = 0
    generated_text: str = ""
    error: str = ""


# ---------------------------------------------------------------------------------------------
# Datasets


def _token_ids(rng: np.random.Generator, n: int, low: int, high: int) -> list[int]:
    return rng.integers(low, high, size=n).tolist()


def sample_sharegpt_shaped(
    num_prompts: int, seed: int = 0, token_id_range: tuple[int, int] = (1000, 32000),
    output_len: int | None = None,
) -> list[SampleRequest]:
    """BENCHMARKS.md's `sharegpt-shaped` workload: log-normal lengths (sigma 1.0, means 215 in
    and 198 out, mu = ln(mean) - 0.5), rounded and clipped to [4, 2048], inputs drawn first,
    then outputs, then the prompts' token ids, all from `default_rng(seed)`."""
    rng = np.random.default_rng(seed)
    ins = rng.lognormal(math.log(215) - 0.5, 1.0, num_prompts)
    outs = rng.lognormal(math.log(198) - 0.5, 1.0, num_prompts)
    ins = np.clip(np.rint(ins), 4, 2048).astype(int)
    outs = np.clip(np.rint(outs), 4, 2048).astype(int)
    low, high = token_id_range
    return [
        SampleRequest(_token_ids(rng, int(i), low, high), int(i),
                      int(o) if output_len is None else output_len)
        for i, o in zip(ins, outs)
    ]


def sample_random(
    num_prompts: int, input_len: int, output_len: int, seed: int = 0, range_ratio: float = 0.0,
    token_id_range: tuple[int, int] = (1000, 32000),
) -> list[SampleRequest]:
    """Random token-id prompts; lengths uniform in [len * (1 - r), len * (1 + r)] (r=0: exact)."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError("--random-range-ratio must be in [0, 1)")
    rng = np.random.default_rng(seed)

    def lengths(n: int) -> np.ndarray:
        lo, hi = max(1, int(n * (1 - range_ratio))), max(1, int(n * (1 + range_ratio)))
        return rng.integers(lo, hi + 1, size=num_prompts)

    ins, outs = lengths(input_len), lengths(output_len)
    low, high = token_id_range
    return [SampleRequest(_token_ids(rng, int(i), low, high), int(i), int(o))
            for i, o in zip(ins, outs)]


def prompt_text(prompt: list[int] | str) -> str:
    """A text prompt for the chat endpoint: one common word per token id (about 1 token each)."""
    if isinstance(prompt, str):
        return prompt
    return " ".join(_WORDS[t % len(_WORDS)] for t in prompt)


# ---------------------------------------------------------------------------------------------
# One request


def schema_20_fields() -> dict:
    """The structured-outputs benchmark schema: 20 fields of every JSON kind, strings
    bounded so the object ends."""
    kinds = [
        {"type": "string", "maxLength": 16},
        {"type": "integer", "minimum": 0, "maximum": 100000},
        {"type": "boolean"},
        {"type": "string", "enum": ["red", "green", "blue", "cyan"]},
        {"type": "number"},
        {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    ]
    props = {f"field_{i:02d}": kinds[i % len(kinds)] for i in range(20)}
    return {"type": "object", "properties": props, "required": list(props)}


# --structured-outputs KIND -> the request's `structured_outputs` object.
STRUCTURED_KINDS = {
    "json": lambda: {"json": schema_20_fields()},
    "json_object": lambda: {"json_object": True},
    "regex": lambda: {"regex": r"[A-Z][a-z]{2,12}( [A-Z][a-z]{2,12}){0,3}\."},
    "choice": lambda: {"choice": ["positive", "negative", "neutral"]},
}


def _request_body(endpoint: str, model: str, req: SampleRequest, args: argparse.Namespace) -> dict:
    body: dict = {
        "model": model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": args.temperature,
        "ignore_eos": args.ignore_eos,
    }
    if endpoint == CHAT:
        body["messages"] = [{"role": "user", "content": prompt_text(req.prompt)}]
        body["max_completion_tokens"] = req.output_len
    else:
        body["prompt"] = req.prompt
        body["max_tokens"] = req.output_len
    kind = getattr(args, "structured_outputs", None)
    if kind and kind != "none":
        body["structured_outputs"] = STRUCTURED_KINDS[kind]()
    return body


async def _sse_events(content) -> AsyncIterator[bytes]:
    """Yields each `data:` payload of a server-sent-event stream (aiohttp StreamReader)."""
    async for raw in content:
        line = raw.strip()
        if line.startswith(b"data:"):
            yield line[5:].strip()


async def send_request(session, url: str, body: dict, headers: dict, result: RequestResult) -> None:
    """Streams one request and fills `result`; never raises for HTTP or protocol errors."""
    chat = url.endswith(CHAT)
    texts: list[str] = []
    last = result.start = time.perf_counter()
    usage = None
    try:
        async with session.post(url, json=body, headers=headers) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:500]}"
                return
            async for data in _sse_events(resp.content):
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"stream error: {chunk['error']}"
                    return
                if chunk.get("usage"):
                    usage = chunk["usage"]
                choices = chunk.get("choices") or []
                text = ""
                if choices and chat:
                    text = (choices[0].get("delta") or {}).get("content") or ""
                elif choices:
                    text = choices[0].get("text") or ""
                if not text:
                    continue
                now = time.perf_counter()
                if not texts:
                    result.ttft = now - result.start
                else:
                    result.itl.append(now - last)
                last = now
                texts.append(text)
        result.latency = time.perf_counter() - result.start
    except Exception as e:  # noqa: BLE001 (connection errors of every kind count as failures)
        result.error = f"{type(e).__name__}: {e}"
        return
    result.generated_text = "".join(texts)
    if usage is None:
        result.error = "no usage in the stream (stream_options.include_usage ignored?)"
        return
    result.prompt_len = int(usage.get("prompt_tokens") or 0)
    result.output_len = int(usage.get("completion_tokens") or 0)
    if result.output_len > 0 and not texts:
        # Tokens were generated but decoded to no text: time the first token at the end.
        result.ttft = result.latency
    result.success = True


# ---------------------------------------------------------------------------------------------
# Metrics


def _stats(values_s: list[float], name: str) -> dict[str, float]:
    """mean/median/std/p90/p99 of `values_s` (seconds) as `*_<name>_ms` keys."""
    a = np.asarray(values_s, dtype=np.float64) * 1000.0 if values_s else np.zeros(1)
    return {
        f"mean_{name}_ms": float(a.mean()),
        f"median_{name}_ms": float(np.median(a)),
        f"std_{name}_ms": float(a.std()),
        f"p90_{name}_ms": float(np.percentile(a, 90)),
        f"p99_{name}_ms": float(np.percentile(a, 99)),
    }


def compute_metrics(results: list[RequestResult], duration_s: float) -> dict:
    ok = [r for r in results if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_len for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]
    duration_s = max(duration_s, 1e-9)
    metrics: dict = {
        "duration_s": duration_s,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "output_len_mismatches": sum(r.output_len != r.expected_output_len for r in ok),
        "request_throughput": len(ok) / duration_s,
        "output_throughput": total_out / duration_s,
        "total_token_throughput": (total_in + total_out) / duration_s,
    }
    metrics.update(_stats([r.ttft for r in ok], "ttft"))
    metrics.update(_stats(tpots, "tpot"))
    metrics.update(_stats([g for r in ok for g in r.itl], "itl"))
    metrics.update(_stats([r.latency for r in ok], "e2el"))
    return metrics


def format_report(m: dict, title: str = " Serving Benchmark Result ") -> str:
    rows: list[tuple[str, str]] = [
        ("Successful requests:", f"{m['completed']}"),
        ("Failed requests:", f"{m['failed']}"),
        ("Benchmark duration (s):", f"{m['duration_s']:.2f}"),
        ("Total input tokens:", f"{m['total_input_tokens']}"),
        ("Total generated tokens:", f"{m['total_output_tokens']}"),
        ("Request throughput (req/s):", f"{m['request_throughput']:.2f}"),
        ("Output token throughput (tok/s):", f"{m['output_throughput']:.2f}"),
        ("Total token throughput (tok/s):", f"{m['total_token_throughput']:.2f}"),
    ]
    lines = [f"{title:=^60}"] + [f"{k:<45}{v:>15}" for k, v in rows]
    for key, label in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st)"),
                       ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        lines.append(f"{label:-^60}")
        for stat, shown in (("mean", "Mean"), ("median", "Median"), ("p90", "P90"), ("p99", "P99")):
            name = f"{shown} {key.upper()} (ms):"
            lines.append(f"{name:<45}{m[f'{stat}_{key}_ms']:>15.2f}")
    lines.append("=" * 60)
    return "\n".join(lines)


def write_plot(path: str, results: list[RequestResult]) -> None:
    """PNG with the TTFT and ITL histograms (matplotlib, imported only here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.success]
    ttft = [r.ttft * 1000 for r in ok]
    itl = [g * 1000 for r in ok for g in r.itl]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, data, name in ((axes[0], ttft, "TTFT"), (axes[1], itl, "ITL")):
        if data:
            ax.hist(data, bins=50)
            for q, style in ((50, "--"), (99, ":")):
                v = float(np.percentile(data, q))
                ax.axvline(v, color="k", linestyle=style, label=f"p{q} {v:.1f} ms")
            ax.legend()
        ax.set_title(f"{name} ({len(data)} samples)")
        ax.set_xlabel("ms")
        ax.set_ylabel("count")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The run


def arrival_delays(n: int, request_rate: float, seed: int) -> list[float]:
    """Gaps before each request: exponential with mean 1/rate (a Poisson process); 0 for inf."""
    if math.isinf(request_rate):
        return [0.0] * n
    rng = np.random.default_rng(seed + 1)
    return rng.exponential(1.0 / request_rate, size=n).tolist()


async def _resolve_model(session, base_url: str, headers: dict) -> str:
    async with session.get(base_url + "/v1/models", headers=headers) as resp:
        resp.raise_for_status()
        data = await resp.json()
    return data["data"][0]["id"]


async def benchmark(args: argparse.Namespace, requests: list[SampleRequest]) -> dict:
    """Sends `requests` as configured by `args`; returns the result dict (metrics + details)."""
    import aiohttp
    from tqdm import tqdm

    base_url = args.base_url.rstrip("/")
    url = base_url + args.endpoint
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limit = args.max_concurrency or 0  # 0: no limit on the pool
    connector = aiohttp.TCPConnector(limit=limit, force_close=False)
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        model = args.model or await _resolve_model(session, base_url, headers)
        if requests and not args.skip_test_request:
            probe = RequestResult(expected_output_len=requests[0].output_len)
            await send_request(session, url, _request_body(args.endpoint, model, requests[0], args),
                               headers, probe)
            if not probe.success:
                raise RuntimeError(f"the test request failed: {probe.error}")
        semaphore = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        results = [RequestResult(expected_output_len=r.output_len) for r in requests]
        bar = tqdm(total=len(requests), disable=args.disable_tqdm, desc="requests")

        async def one(i: int) -> None:
            body = _request_body(args.endpoint, model, requests[i], args)
            if semaphore is None:
                await send_request(session, url, body, headers, results[i])
            else:
                async with semaphore:
                    await send_request(session, url, body, headers, results[i])
            bar.update(1)

        tasks = []
        t0 = time.perf_counter()
        for i, delay in enumerate(arrival_delays(len(requests), args.request_rate, args.seed)):
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        bar.close()
    metrics = compute_metrics(results, duration)
    rate = args.request_rate
    out = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "backend": "openai",
        "base_url": base_url,
        "endpoint": args.endpoint,
        "model": model,
        "dataset": args.dataset,
        "num_prompts": len(requests),
        "request_rate": "inf" if math.isinf(rate) else rate,
        "max_concurrency": args.max_concurrency,
        "seed": args.seed,
        **metrics,
        "input_lens": [r.prompt_len for r in results],
        "output_lens": [r.output_len for r in results],
        "ttfts": [r.ttft for r in results],
        "itls": [r.itl for r in results],
        "errors": [r.error for r in results],
    }
    out["_results"] = results
    return out


def make_requests(args: argparse.Namespace) -> list[SampleRequest]:
    ids = tuple(args.token_id_range)
    if args.dataset == "sharegpt-shaped":
        return sample_sharegpt_shaped(args.num_prompts, args.seed, ids, args.sharegpt_output_len)
    return sample_random(args.num_prompts, args.random_input_len, args.random_output_len,
                         args.seed, args.random_range_ratio, ids)


# ---------------------------------------------------------------------------------------------
# CLI


def _rate(value: str) -> float:
    r = float(value)
    if not r > 0:
        raise argparse.ArgumentTypeError("--request-rate must be > 0 (or inf)")
    return r


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default=None,
                        help="server URL (default http://HOST:PORT)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--endpoint", default=COMPLETIONS, choices=[COMPLETIONS, CHAT])
    parser.add_argument("--model", default=None, help="model name (default: the server's first)")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                        help="sent as Bearer token (default: env OPENAI_API_KEY)")
    parser.add_argument("--dataset", "--dataset-name", dest="dataset", default="sharegpt-shaped",
                        choices=["sharegpt-shaped", "random"])
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--random-input-len", type=int, default=1024)
    parser.add_argument("--random-output-len", type=int, default=128)
    parser.add_argument("--random-range-ratio", type=float, default=0.0)
    parser.add_argument("--sharegpt-output-len", type=int, default=None,
                        help="override every sharegpt-shaped output length")
    parser.add_argument("--token-id-range", type=int, nargs=2, default=[1000, 32000],
                        metavar=("LOW", "HIGH"), help="prompt token ids drawn from [LOW, HIGH)")
    parser.add_argument("--request-rate", type=_rate, default=float("inf"),
                        help="requests per second, Poisson arrivals (default inf: all at once)")
    parser.add_argument("--max-concurrency", type=int, default=None,
                        help="at most this many requests in flight")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--structured-outputs", default="none",
                        choices=["none", *STRUCTURED_KINDS],
                        help="constrain every request: json (a 20-field schema), json_object, "
                        "regex or choice (sent as the structured_outputs request field)")
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                        help="send ignore_eos so every request generates exactly max_tokens")
    parser.add_argument("--request-timeout", type=float, default=6 * 3600.0)
    parser.add_argument("--skip-test-request", action="store_true",
                        help="do not send one probe request before the run")
    parser.add_argument("--result-file", default=None, help="write the results as JSON here")
    parser.add_argument("--plot", default=None, help="write a PNG of TTFT and ITL distributions")
    parser.add_argument("--disable-tqdm", action="store_true")


def run_bench_serve(args: argparse.Namespace) -> int:
    if args.base_url is None:
        args.base_url = f"http://{args.host}:{args.port}"
    if args.max_concurrency is not None and args.max_concurrency < 1:
        print("pagedllm bench serve: error: --max-concurrency must be >= 1", file=sys.stderr)
        return 2
    try:
        requests = make_requests(args)
    except ValueError as e:
        print(f"pagedllm bench serve: error: {e}", file=sys.stderr)
        return 2
    try:
        result = asyncio.run(benchmark(args, requests))
    except Exception as e:  # noqa: BLE001
        print(f"pagedllm bench serve: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    results = result.pop("_results")
    print(format_report(result))
    if args.result_file:
        with open(args.result_file, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        write_plot(args.plot, results)
    return 0 if result["failed"] == 0 else 1


def register_subcommand(subparsers) -> argparse.ArgumentParser:
    """Adds `serve` to a `bench` subparsers object (pagedllm bench serve)."""
    parser = subparsers.add_parser(
        "serve", help="latency under load against a running server (TTFT, TPOT, ITL)",
        description=__doc__.split("\n\n")[0],
    )
    add_cli_args(parser)
    parser.set_defaults(func=run_bench_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pagedllm bench serve")
    add_cli_args(parser)
    return run_bench_serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

