"""`pagedllm serve --data-parallel-size 2` on the default model: two engine-core replicas behind
one server. Routing spreads a burst, aborts reach the owning replica, /metrics is per replica
with totals, and a replica's death fails its requests fast and turns /health to 503.

The death test runs last on the module's server (it kills a replica); the fixture's teardown
then proves no process outlives the server.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import psutil
import pytest
import torch

from pagedllm.engine.async_llm import FinishedRequestStats, IterationStats
from pagedllm.engine.protocol import SchedulerStats
from pagedllm.entrypoints.openai.metrics import LoggingStatLogger, PrometheusStatLogger
from tests.entrypoints.remote_server import RemoteServer, assert_children_exit

MODEL = "smol"


def series(text: str, name: str, **labels) -> dict[str | None, float]:
    """engine label value (None for the total) -> value, for series matching `labels`."""
    out: dict[str | None, float] = {}
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        body, value = line.rsplit(" ", 1)
        pairs = dict(p.split("=", 1) for p in body[len(name) + 1 : -1].split(","))
        pairs = {k: v.strip('"') for k, v in pairs.items()}
        if all(pairs.get(k) == str(v) for k, v in labels.items()):
            engine = pairs.pop("engine", None)
            assert engine not in out, f"duplicate series {line}"
            out[engine] = float(value)
    return out


# ---- metrics, no server ----
def test_per_engine_series_and_totals():
    logger = PrometheusStatLogger(MODEL, 128, num_engines=2)
    logger.record(SchedulerStats(num_running_reqs=3, num_waiting_reqs=1, kv_cache_usage=0.5,
                                 num_generation_tokens=7), IterationStats(), 0)
    finished = FinishedRequestStats("length", 1.0, 0.1, 5, 7)
    logger.record(SchedulerStats(num_running_reqs=2, kv_cache_usage=0.25,
                                 num_generation_tokens=4),
                  IterationStats(time_to_first_tokens=[0.2], finished_requests=[finished]), 1)
    text = logger.render().decode()
    assert series(text, "pagedllm:num_requests_running") == {"0": 3, "1": 2, None: 5}
    assert series(text, "pagedllm:num_requests_waiting") == {"0": 1, "1": 0, None: 1}
    assert series(text, "pagedllm:generation_tokens_total") == {"0": 7, "1": 4, None: 11}
    # A fraction of each replica's own cache has no total.
    assert series(text, "pagedllm:kv_cache_usage_perc") == {"0": 0.5, "1": 0.25}
    assert series(text, "pagedllm:request_success_total", finished_reason="length") == {
        "0": 0, "1": 1, None: 1}
    assert series(text, "pagedllm:time_to_first_token_seconds_count") == {"0": 0, "1": 1, None: 1}
    assert series(text, "pagedllm:time_to_first_token_seconds_bucket", le="0.25") == {
        "0": 0, "1": 1, None: 1}
    # One replica: vLLM's series exactly (engine="0"), no duplicate totals.
    one = PrometheusStatLogger(MODEL, 128).render().decode()
    assert series(one, "pagedllm:num_requests_running") == {"0": 0}


def test_log_line_per_replica():
    logger = LoggingStatLogger(num_engines=2)
    logger.record(SchedulerStats(num_running_reqs=3, num_generation_tokens=7), IterationStats(), 1)
    line = logger.maybe_log()
    assert line is not None and line.startswith("Engine 001: ") and "Running: 3 reqs" in line
    assert "Engine 000" not in line  # idle replicas stay quiet
    one = LoggingStatLogger()
    one.record(SchedulerStats(num_waiting_reqs=2), IterationStats())
    assert one.maybe_log().startswith("Avg prompt throughput")  # vLLM's line without DP


# ---- live server ----
@pytest.fixture(scope="module")
def dp_server():
    srv = RemoteServer(["--data-parallel-size", "2", "--max-model-len", "512",
                        "--served-model-name", MODEL, "--uvicorn-log-level", "warning",
                        "--disable-log-requests"])
    yield srv
    children = srv.engine_pids()
    srv.stop()
    assert_children_exit(children)


def engine_processes(srv: RemoteServer) -> list[psutil.Process]:
    return [psutil.Process(p) for p in srv.engine_core_pids()]


def test_two_replica_processes_with_split_threads(dp_server):
    engines = engine_processes(dp_server)
    assert len(engines) == 2
    expected = os.environ.get("OMP_NUM_THREADS") or str(max(1, torch.get_num_threads() // 2))
    assert [p.environ().get("OMP_NUM_THREADS") for p in engines] == [expected] * 2


def test_64_concurrent_requests_spread_over_both_replicas(dp_server):
    url = dp_server.url
    before = httpx.get(url + "/metrics").text
    ok0 = series(before, "pagedllm:request_success_total", finished_reason="length")
    gen0 = series(before, "pagedllm:generation_tokens_total")
    max_tokens = [3 + i % 6 for i in range(64)]

    async def one(ac: httpx.AsyncClient, n: int) -> dict:
        r = await ac.post("/v1/completions", json={
            "model": MODEL, "prompt": f"Count to {n}:", "max_tokens": n, "ignore_eos": True,
            "temperature": 0.8, "seed": n})
        assert r.status_code == 200, r.text
        return r.json()

    async def burst() -> list[dict]:
        async with httpx.AsyncClient(base_url=url, timeout=300) as ac:
            return await asyncio.gather(*(one(ac, n) for n in max_tokens))

    results = asyncio.run(burst())
    for n, body in zip(max_tokens, results):
        assert body["usage"]["completion_tokens"] == n
        assert body["choices"][0]["finish_reason"] == "length"
    after = httpx.get(url + "/metrics").text
    ok1 = series(after, "pagedllm:request_success_total", finished_reason="length")
    per_engine = {e: ok1[e] - ok0[e] for e in ("0", "1")}
    assert per_engine["0"] + per_engine["1"] == 64
    # The router counts requests it sent but whose stats are not back: the burst splits at
    # once instead of piling onto one replica.
    assert min(per_engine.values()) >= 16, per_engine
    assert ok1[None] - ok0[None] == 64
    gen1 = series(after, "pagedllm:generation_tokens_total")
    assert gen1[None] - gen0[None] == sum(max_tokens)
    assert gen1["0"] - gen0["0"] + gen1["1"] - gen0["1"] == sum(max_tokens)


def test_data_parallel_rank_header_pins_the_replica(dp_server):
    """vLLM's X-data-parallel-rank: every request lands on the named replica."""
    url = dp_server.url
    before = series(httpx.get(url + "/metrics").text, "pagedllm:request_success_total",
                    finished_reason="length")
    for rank in (1, 1, 1, 0):
        r = httpx.post(url + "/v1/chat/completions", headers={"X-data-parallel-rank": str(rank)},
                       json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                             "ignore_eos": True}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    after = series(httpx.get(url + "/metrics").text, "pagedllm:request_success_total",
                   finished_reason="length")
    assert after["1"] - before["1"] == 3 and after["0"] - before["0"] == 1
    for bad, words in (("2", "out of range"), ("one", "must be an integer")):
        r = httpx.post(url + "/v1/completions", headers={"X-data-parallel-rank": bad},
                       json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text


def test_n_children_stay_on_one_replica(dp_server):
    """n > 1 fans out into n engine requests that share the prompt's blocks: one replica."""
    url = dp_server.url
    for _ in range(2):
        before = series(httpx.get(url + "/metrics").text, "pagedllm:request_success_total",
                        finished_reason="length")
        r = httpx.post(url + "/v1/completions", timeout=60, json={
            "prompt": "Once upon a time", "max_tokens": 3, "n": 3, "ignore_eos": True,
            "seed": 1})
        assert r.status_code == 200
        assert sorted(c["index"] for c in r.json()["choices"]) == [0, 1, 2]
        assert r.json()["usage"]["completion_tokens"] == 9
        after = series(httpx.get(url + "/metrics").text, "pagedllm:request_success_total",
                       finished_reason="length")
        assert sorted(after[e] - before[e] for e in ("0", "1")) == [0, 3]


def test_aborts_reach_the_owning_replica(dp_server):
    """Cancelled streams on both replicas stop running at once (a misrouted abort would leave
    them generating up to their max_tokens)."""
    url = dp_server.url
    seen: dict = {}

    async def start_and_drop(ac: httpx.AsyncClient, streaming: list[int],
                             all_streaming: asyncio.Event, drop: asyncio.Event) -> None:
        async with ac.stream("POST", "/v1/completions", json={
                "model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 450,
                "ignore_eos": True, "stream": True}) as resp:
            assert resp.status_code == 200
            first = True
            # Keep reading (leaving the line iterator early would close the connection).
            async for line in resp.aiter_lines():
                if line.startswith("data: {") and first:
                    first = False  # one token streamed: the request runs
                    streaming[0] += 1
                    if streaming[0] == 8:
                        all_streaming.set()
                if drop.is_set():
                    return  # leaving the block closes the stream: the server aborts

    async def main() -> None:
        streaming, all_streaming, drop = [0], asyncio.Event(), asyncio.Event()
        async with httpx.AsyncClient(base_url=url, timeout=120) as ac:
            tasks = [asyncio.create_task(start_and_drop(ac, streaming, all_streaming, drop))
                     for _ in range(8)]
            await asyncio.wait_for(all_streaming.wait(), 60)
            seen.update(series((await ac.get("/metrics")).text, "pagedllm:num_requests_running"))
            drop.set()
            await asyncio.gather(*tasks)

    asyncio.run(main())
    assert seen["0"] >= 1 and seen["1"] >= 1 and seen[None] == 8, seen
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = httpx.get(url + "/metrics").text
        running = series(text, "pagedllm:num_requests_running")
        kv = series(text, "pagedllm:kv_cache_usage_perc")
        if running == {"0": 0, "1": 0, None: 0} and kv == {"0": 0, "1": 0}:
            break
        time.sleep(0.2)
    assert running == {"0": 0, "1": 0, None: 0} and kv == {"0": 0, "1": 0}


async def _stream_tokens(ac: httpx.AsyncClient, started: asyncio.Event, counter: list[int],
                         total: int) -> tuple[int, bool, float]:
    """Streams one completion; returns (completion tokens, ended in an error, end time)."""
    tokens, errored = 0, False
    async with ac.stream("POST", "/v1/completions", json={
            "model": MODEL, "prompt": "Hello", "max_tokens": 24, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}) as resp:
        assert resp.status_code == 200
        first = True
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                errored = True
            elif chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first:
                first = False
                counter[0] += 1
                if counter[0] == total:
                    started.set()
    return tokens, errored, time.monotonic()


def test_replica_death_fails_its_requests_and_health(dp_server):
    """Runs last: kills replica processes of the module's server."""
    url = dp_server.url
    victim = engine_processes(dp_server)[0]

    async def main() -> tuple[list[tuple[int, bool, float]], float]:
        started, counter = asyncio.Event(), [0]
        async with httpx.AsyncClient(base_url=url, timeout=60) as ac:
            tasks = [asyncio.create_task(_stream_tokens(ac, started, counter, 8))
                     for _ in range(8)]
            await asyncio.wait_for(started.wait(), 60)
            os.kill(victim.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            return await asyncio.gather(*tasks), killed_at

    results, killed_at = asyncio.run(main())
    failed = [r for r in results if r[1]]
    survived = [r for r in results if not r[1]]
    # The 8 streams were spread over both replicas: the dead one's fail, within seconds...
    assert failed and survived, results
    assert all(end - killed_at < 5.0 for _, _, end in failed)
    # ...and the survivor's finish whole.
    assert all(tokens == 24 for tokens, _, _ in survived)
    health = httpx.get(url + "/health")
    assert health.status_code == 503
    assert "data-parallel engine" in health.json()["error"]["message"]
    r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=10)
    assert r.status_code == 503
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
