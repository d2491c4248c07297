"""Both Ray backends behind a live server: `--data-parallel-backend ray` runs two
engine-core replicas as Ray actors (a local Ray instance the server starts) and
`--distributed-executor-backend ray` gives each its worker as a Ray actor in the replica's
placement group. Requests spread over both replicas; a killed worker actor fails its
replica (the executor path) and /health, a killed engine-core actor fails the other (the
replica path) and the in-flight stream; stopping the server leaves no process, Ray's included.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from pagedllm.model_executor.loader.resolve import default_model_path
from pagedllm.model_executor.loader.testing import build_random_hf_model_dir
from tests.entrypoints.remote_server import RemoteServer, assert_children_exit
from tests.model_executor.conftest import tiny_config


@pytest.fixture(scope="module", autouse=True)
def _one_ray_module_at_a_time(ray_exclusive):
    """Before any Ray starts here: see `ray_exclusive` in tests/conftest.py."""
    yield



def _actors(server_pid: int, cls: str) -> list[int]:
    """Pids of the Ray worker processes running actors of `cls` (Ray titles them by the call)."""
    found = []
    for child in psutil.Process(server_pid).children(recursive=True):
        try:
            if f"ray::{cls}" in " ".join(child.cmdline()):
                found.append(child.pid)
        except psutil.Error:
            continue
    return found


def _success_by_engine(url: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("pagedllm:request_success_total{engine="):
            engine = line.split('engine="')[1].split('"')[0]
            counts[engine] = counts.get(engine, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def test_ray_replicas_serve_and_fail_fast(tmp_path):
    config = tiny_config("LlamaForCausalLM", vocab_size=49152, max_position_embeddings=4096)
    path = build_random_hf_model_dir(str(tmp_path / "tiny-llama"), config)
    srv = RemoteServer(["--model", path, "--tokenizer", default_model_path(), "-dp", "2",
                        "--data-parallel-backend", "ray", "--distributed-executor-backend", "ray",
                        "--served-model-name", "tiny", "--uvicorn-log-level", "warning"])  # fmt: skip
    try:
        cores, workers = _actors(srv.proc.pid, "RayEngineCore"), _actors(srv.proc.pid, "RayWorker")
        assert len(cores) == 2 and len(workers) == 2, srv.read_log()
        body = {"model": "tiny", "prompt": "Hello there", "max_tokens": 7, "ignore_eos": True}
        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(
                lambda _: httpx.post(srv.url + "/v1/completions", json=body, timeout=120),
                range(16)))  # fmt: skip
        assert [r.status_code for r in responses] == [200] * 16
        assert all(r.json()["usage"]["completion_tokens"] == 7 for r in responses)
        by_engine = _success_by_engine(srv.url)
        assert set(by_engine) == {"0", "1"} and sum(by_engine.values()) == 16
        assert min(by_engine.values()) > 0, by_engine
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=30, json={
                "model": "tiny", "prompt": "Hi", "max_tokens": 4000, "ignore_eos": True,
                "stream": True}) as resp:  # fmt: skip
            assert resp.status_code == 200
            chunks = resp.iter_bytes()
            assert b"data:" in next(chunks)
            os.kill(workers[0], signal.SIGKILL)  # one replica's only rank
            deadline = time.monotonic() + 5
            while httpx.get(srv.url + "/health").status_code != 503:
                assert time.monotonic() < deadline, "/health still healthy after a worker died"
                time.sleep(0.1)
            for pid in cores:  # the replica path for the other (the first one is failed already)
                if psutil.pid_exists(pid):
                    os.kill(pid, signal.SIGKILL)
            t0 = time.monotonic()
            streamed = b"".join(chunks)
        assert time.monotonic() - t0 < 5.0
        assert b'"error"' in streamed and streamed.endswith(b"data: [DONE]\n\n")
        assert httpx.get(srv.url + "/health").status_code == 503
        children = srv.engine_pids()  # the local Ray instance's processes among them
        assert any("raylet" in " ".join(psutil.Process(p).cmdline()) for p in children
                   if psutil.pid_exists(p))  # fmt: skip
    finally:
        srv.stop()
    assert_children_exit(children)
