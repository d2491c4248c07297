"""A live server with `--quantization bitsandbytes` (in-flight 4-bit) on the default model."""

from __future__ import annotations

import httpx
import pytest

from tests.entrypoints.remote_server import RemoteServer, assert_children_exit


@pytest.fixture(scope="module")
def bnb_server():
    srv = RemoteServer(["--quantization", "bitsandbytes", "--max-model-len", "512",
                        "--max-num-seqs", "4", "--served-model-name", "smol-nf4"])
    yield srv
    children = srv.engine_pids()
    srv.stop()
    assert_children_exit(children)


def test_bitsandbytes_server_answers_a_chat(bnb_server):
    r = httpx.post(bnb_server.url + "/v1/chat/completions", timeout=120, json={
        "model": "smol-nf4", "temperature": 0, "max_tokens": 16,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
    })
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert "Paris" in choice["message"]["content"]
    assert 1 <= body["usage"]["completion_tokens"] <= 16
    assert "quantization bitsandbytes (in-flight 4-bit nf4, double quant)" in bnb_server.read_log()
