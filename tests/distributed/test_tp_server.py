"""A live server with --tensor-parallel-size 2: it answers, and a killed worker fails the
in-flight request and /health within seconds, leaving no process behind."""

from __future__ import annotations

import os
import signal
import time

import httpx
import psutil

from pagedllm.model_executor.loader.resolve import default_model_path
from pagedllm.model_executor.loader.testing import build_random_hf_model_dir
from tests.entrypoints.remote_server import RemoteServer, assert_children_exit
from tests.model_executor.conftest import tiny_config


def _spawned_children(pid: int) -> list[int]:
    return [c.pid for c in psutil.Process(pid).children()
            if "spawn_main" in " ".join(c.cmdline())]


def test_tp2_server_answers_then_fails_fast_when_a_worker_dies(tmp_path):
    # A tiny random Llama over SmolLM2's vocabulary, so the server can use its tokenizer.
    config = tiny_config("LlamaForCausalLM", vocab_size=49152, max_position_embeddings=4096)
    path = build_random_hf_model_dir(str(tmp_path / "tiny-llama"), config)
    srv = RemoteServer(["--model", path, "--tokenizer", default_model_path(), "-tp", "2",
                        "--served-model-name", "tiny", "--uvicorn-log-level", "warning"])
    children = srv.engine_pids()
    try:
        (core,) = srv.engine_core_pids()
        workers = _spawned_children(core)
        assert len(workers) == 2
        r = httpx.post(srv.url + "/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": "Hello there", "max_tokens": 5, "temperature": 0,
            "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 5
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=30, json={
                "model": "tiny", "prompt": "Hi", "max_tokens": 4000, "ignore_eos": True,
                "stream": True}) as resp:
            assert resp.status_code == 200
            chunks = resp.iter_bytes()
            assert b"data:" in next(chunks)  # generation is under way
            os.kill(workers[1], signal.SIGKILL)
            t0 = time.monotonic()
            body = b"".join(chunks)
        assert time.monotonic() - t0 < 5.0
        assert b'"error"' in body and body.endswith(b"data: [DONE]\n\n")
        deadline = time.monotonic() + 5
        while httpx.get(srv.url + "/health").status_code != 503:
            assert time.monotonic() < deadline, "/health still healthy after a worker died"
            time.sleep(0.1)
    finally:
        srv.stop()
    assert_children_exit(children)
