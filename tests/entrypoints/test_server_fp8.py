"""A live server on the default model with `--quantization fp8` (its GGUF weights quantized
at load): it answers a chat request, and the start-up log, /v1/models and /metrics name the
quantization and the KV-cache dtype. (fp8 weights and an fp8 KV cache together flip this
135M model's first token, whose top two candidates are 0.08 nats apart unquantized, so the
fp8 KV cache is checked end to end offline, in tests/engine/test_fp8_kv_engine.py.)"""

from __future__ import annotations

import re

import httpx
import pytest

from tests.entrypoints.remote_server import RemoteServer, assert_children_exit


@pytest.fixture(scope="module")
def fp8_server():
    srv = RemoteServer(["--quantization", "fp8", "--max-num-seqs", "8",
                        "--served-model-name", "smol-fp8"])
    yield srv
    children = srv.engine_pids()
    srv.stop()
    assert_children_exit(children)


def test_fp8_server_answers_a_chat_request(fp8_server):
    body = {"model": "smol-fp8", "temperature": 0, "max_tokens": 12,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    r = httpx.post(fp8_server.url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert "Paris" in out["choices"][0]["message"]["content"]  # as unquantized
    assert 0 < out["usage"]["completion_tokens"] <= 12


def test_fp8_server_names_quantization_and_kv_dtype(fp8_server):
    card = httpx.get(fp8_server.url + "/v1/models/smol-fp8", timeout=10).json()
    assert card["quantization"] == "fp8" and card["kv_cache_dtype"] == "auto"
    metrics = httpx.get(fp8_server.url + "/metrics", timeout=10).text
    info = re.search(r"^pagedllm:model_config_info\{(.*)\} 1\.0$", metrics, re.M)
    assert info and 'quantization="fp8"' in info[1] and 'kv_cache_dtype="auto"' in info[1]
    cache = re.search(r"^pagedllm:cache_config_info\{(.*)\} 1\.0$", metrics, re.M)
    assert cache and 'cache_dtype="auto"' in cache[1]
    assert re.search(r'num_gpu_blocks="[1-9]\d*"', cache[1])
    log = fp8_server.read_log()
    assert "quantization fp8 (quantized at load" in log
    assert "KV cache dtype: auto (float32)" in log
