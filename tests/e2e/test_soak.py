"""Soak and fault tests against a live CPU server with the default model (issue #7).

- Soak: many short requests at concurrency 64, a mix of streaming, non-streaming, n=2, stop
  strings, chat, and 10% of clients that disconnect mid-stream. Every other request completes
  correctly, nothing is answered 5xx, the server's RSS (process tree) after the run is within
  10% of its RSS after the first 200 requests, and /metrics shows an empty engine at the end.
- Fault: requests beyond the context or the KV cache are answered 400 at once while other
  requests keep streaming.

The issue asks for 2,000 soak requests; PAGEDLLM_SOAK_REQUESTS overrides the count.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from dataclasses import dataclass, field

import aiohttp
import httpx
import psutil
import pytest

from tests.entrypoints.remote_server import RemoteServer

NUM_REQUESTS = int(os.environ.get("PAGEDLLM_SOAK_REQUESTS", "2000"))
CONCURRENCY = 64
WARMUP = 200  # the RSS baseline is taken after this many requests
MAX_TOKENS = 4
NUM_BLOCKS = 256  # 4096 KV tokens < max_model_len 8192, so "exceeds the KV cache" is reachable
BLOCK_SIZE = 16
MAX_MODEL_LEN = 8192
STOP_PROMPT = "Write the alphabet in order:"
# One torch thread: on a 2-core machine shared with other work, two OpenMP threads make each
# step up to ~50x slower whenever the other core is busy (measured); this test is about
# correctness and leaks, not speed.
SERVER_ENV = {"OMP_NUM_THREADS": "1"}
KINDS = ("stream", "stream", "plain", "plain", "n2", "n2_stream", "stop_stream", "stop_plain",
         "chat_stream", "disconnect")


@pytest.fixture(scope="module")
def soak_server():
    srv = RemoteServer([
        "--max-num-seqs", "128", "--num-gpu-blocks-override", str(NUM_BLOCKS),
        "--max-model-len", str(MAX_MODEL_LEN), "--disable-uvicorn-access-log",
        "--disable-log-requests", "--served-model-name", "smol",
    ], env=SERVER_ENV)
    yield srv
    srv.stop()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} not found")


def tree_rss(pid: int) -> int:
    """RSS of a process and all its descendants, in bytes."""
    root = psutil.Process(pid)
    total = root.memory_info().rss
    for child in root.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


@dataclass
class Outcome:
    kind: str
    status: int = 0
    ok: bool = False
    problem: str = ""
    texts: dict[int, str] = field(default_factory=dict)


async def sse_chunks(resp: aiohttp.ClientResponse):
    async for raw in resp.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        yield json.loads(data)


def _body(kind: str, i: int, stop: str) -> tuple[str, dict]:
    """The endpoint and JSON body of soak request `i` of `kind`."""
    prompt = f"Request {i}: a short note about the number {i % 97}."
    if kind == "chat_stream":
        return "/v1/chat/completions", {
            "model": "smol", "messages": [{"role": "user", "content": prompt}],
            "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0,
        }
    body: dict = {"model": "smol", "prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True,
                  "temperature": 0}
    if kind in ("stream", "n2_stream", "stop_stream", "disconnect"):
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if kind in ("n2", "n2_stream"):
        body.update(n=2, temperature=1.0, seed=i)
    if kind in ("stop_stream", "stop_plain"):
        body.update(prompt=STOP_PROMPT, stop=[stop], max_tokens=12)
    if kind == "disconnect":
        body["max_tokens"] = 256
    return "/v1/completions", body


async def run_one(session, url: str, kind: str, i: int, stop: tuple[str, str]) -> Outcome:
    """Sends one request; `stop` is (stop string, the greedy text expected before it)."""
    path, body = _body(kind, i, stop[0])
    out = Outcome(kind)
    usage = None
    finish: dict[int, str] = {}
    async with session.post(url + path, json=body) as resp:
        out.status = resp.status
        if resp.status != 200:
            out.problem = f"HTTP {resp.status}: {await resp.text()}"
            return out
        if not body.get("stream"):
            data = await resp.json()
            usage = data["usage"]
            for c in data["choices"]:
                out.texts[c["index"]] = c["text"]
                finish[c["index"]] = c["finish_reason"]
        else:
            async for chunk in sse_chunks(resp):
                if "error" in chunk:
                    out.problem = f"stream error {chunk}"
                    return out
                usage = chunk.get("usage") or usage
                for c in chunk["choices"]:
                    if kind == "chat_stream":
                        text = c["delta"].get("content") or ""
                    else:
                        text = c["text"]
                    out.texts[c["index"]] = out.texts.get(c["index"], "") + text
                    if c.get("finish_reason"):
                        finish[c["index"]] = c["finish_reason"]
                if kind == "disconnect" and out.texts:
                    resp.close()  # drop the connection mid-stream
                    out.ok = True
                    return out
    n = 2 if kind.startswith("n2") else 1
    if sorted(finish) != list(range(n)):
        out.problem = f"choices {sorted(finish)}, want {n}"
    elif kind.startswith("stop"):
        want_text = stop[1]
        if finish[0] != "stop" or out.texts[0] != want_text:
            out.problem = f"stop: {finish[0]} {out.texts[0]!r}, want stop {want_text!r}"
    elif set(finish.values()) != {"length"}:
        out.problem = f"finish reasons {finish}"
    elif usage is None or usage["completion_tokens"] != n * MAX_TOKENS:
        out.problem = f"usage {usage}, want {n * MAX_TOKENS} completion tokens"
    out.ok = not out.problem
    return out


def learn_stop_string(url: str) -> tuple[str, str]:
    """Greedy continuation of STOP_PROMPT: a stop string from its middle, and the text before."""
    r = httpx.post(url + "/v1/completions", json={
        "model": "smol", "prompt": STOP_PROMPT, "max_tokens": 12, "temperature": 0,
        "ignore_eos": True,
    }, timeout=120)
    r.raise_for_status()
    text = r.json()["choices"][0]["text"]
    # A 2-character window from the middle of the text that is not pure whitespace.
    starts = [i for i in range(max(1, len(text) // 3), len(text) - 1) if text[i:i + 2].strip()]
    assert starts, f"greedy text {text!r} has no usable stop string"
    stop = text[starts[0]:starts[0] + 2]
    return stop, text[:text.index(stop)]


async def run_batch(url: str, indices: range, stop: tuple[str, str],
                    rng: random.Random) -> list[Outcome]:
    sem = asyncio.Semaphore(CONCURRENCY)
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    timeout = aiohttp.ClientTimeout(total=600)
    kinds = [rng.choice(KINDS) for _ in indices]

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async def guarded(kind: str, i: int) -> Outcome:
            async with sem:
                try:
                    return await run_one(session, url, kind, i, stop)
                except Exception as e:  # noqa: BLE001 (reported below, with the kind)
                    return Outcome(kind, problem=f"{type(e).__name__}: {e}")

        return await asyncio.gather(*(guarded(k, i) for k, i in zip(kinds, indices)))


def engine_idle(url: str, deadline_s: float = 30.0) -> tuple[float, float, float]:
    """Waits until /metrics shows no running or waiting request; returns the three gauges."""
    t0 = time.monotonic()
    while True:
        text = httpx.get(url + "/metrics", timeout=10).text
        vals = (metric(text, "pagedllm:num_requests_running"),
                metric(text, "pagedllm:num_requests_waiting"),
                metric(text, "pagedllm:kv_cache_usage_perc"))
        if vals == (0.0, 0.0, 0.0) or time.monotonic() - t0 > deadline_s:
            return vals
        time.sleep(0.5)


def check(outcomes: list[Outcome]) -> None:
    five = [o for o in outcomes if o.status >= 500]
    assert not five, f"{len(five)} 5xx answers, first: {five[0].problem}"
    bad = [o for o in outcomes if not o.ok]
    assert not bad, f"{len(bad)}/{len(outcomes)} failed, e.g. " + "; ".join(
        f"{o.kind}: {o.problem}" for o in bad[:5])


@pytest.mark.slow
def test_soak(soak_server):
    url = soak_server.url
    stop = learn_stop_string(url)
    rng = random.Random(0)
    t0 = time.monotonic()
    first = asyncio.run(run_batch(url, range(WARMUP), stop, rng))
    check(first)
    assert engine_idle(url) == (0.0, 0.0, 0.0)
    rss_warm = tree_rss(soak_server.proc.pid)
    rest = asyncio.run(run_batch(url, range(WARMUP, NUM_REQUESTS), stop, rng))
    elapsed = time.monotonic() - t0
    check(rest)
    kinds = {k: sum(o.kind == k for o in first + rest) for k in set(KINDS)}
    assert all(kinds.values()), kinds
    # Disconnected streams must have been aborted: nothing left running or holding blocks.
    assert engine_idle(url) == (0.0, 0.0, 0.0)
    rss_end = tree_rss(soak_server.proc.pid)
    # A leak shows as growth; a drop (allocator giving memory back) is not one.
    assert rss_end <= 1.10 * rss_warm, (
        f"server RSS grew from {rss_warm / 2**20:.0f} MiB after {WARMUP} requests to "
        f"{rss_end / 2**20:.0f} MiB after {NUM_REQUESTS}")
    metrics = httpx.get(url + "/metrics").text
    assert 'finished_reason="abort"' in metrics
    print(f"soak: {NUM_REQUESTS} requests in {elapsed:.1f} s, kinds {kinds}, RSS "
          f"{rss_warm / 2**20:.0f} -> {rss_end / 2**20:.0f} MiB")


BACKGROUND_TOKENS = 48


async def _stream_tokens(session, url: str, i: int) -> tuple[int, int, str]:
    """One long-ish greedy stream; returns (HTTP status, usage completion tokens, finish)."""
    body = {"model": "smol", "prompt": f"Story {i}:", "max_tokens": BACKGROUND_TOKENS,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    completion, finish = -1, ""
    async with session.post(url + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            return resp.status, completion, finish
        async for chunk in sse_chunks(resp):
            if chunk.get("usage"):
                completion = chunk["usage"]["completion_tokens"]
            for c in chunk["choices"]:
                finish = c.get("finish_reason") or finish
    return resp.status, completion, finish


async def _fault_run(url: str):
    """Background streams plus oversized requests sent while they run."""
    cases = {
        # name: (prompt tokens, max_tokens, stream)
        "over context": (MAX_MODEL_LEN + 100, 4, False),
        "prompt over KV cache": (NUM_BLOCKS * BLOCK_SIZE + 200, 4, False),
        "prompt+output over KV cache": (NUM_BLOCKS * BLOCK_SIZE - 500, 1500, False),
        "over KV cache, streamed": (NUM_BLOCKS * BLOCK_SIZE - 500, 1500, True),
    }
    answers = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        background = asyncio.gather(*(_stream_tokens(session, url, i) for i in range(8)))
        await asyncio.sleep(1.0)  # let the background requests reach the engine
        for name, (num_prompt, max_tokens, stream) in cases.items():
            body = {"model": "smol", "prompt": [1000 + j % 20000 for j in range(num_prompt)],
                    "max_tokens": max_tokens, "stream": stream}
            t0 = time.monotonic()
            async with session.post(url + "/v1/completions", json=body) as resp:
                data = await resp.json(content_type=None)
                answers.append((name, resp.status, time.monotonic() - t0, data))
        still_running = not background.done()
        return still_running, await background, answers


def test_oversized_requests_are_400_while_others_flow(soak_server):
    still_running, streams, answers = asyncio.run(_fault_run(soak_server.url))
    for name, status, seconds, data in answers:
        assert status == 400, (name, status, data)
        assert data["error"]["message"], name
        # "At once": not queued behind the running requests.
        assert seconds < 5.0, (name, seconds)
    assert still_running, "the background streams ended before the faults: make them longer"
    assert streams == [(200, BACKGROUND_TOKENS, "length")] * len(streams)
    assert engine_idle(soak_server.url) == (0.0, 0.0, 0.0)
