"""POST /v1/embeddings through the `openai` SDK against live servers (one process each)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import numpy as np
import openai
import pytest

from pagedllm.tokenizer import get_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(args: list[str], timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pagedllm.entrypoints.openai.api_server", *args,
         "--port", str(port), "--disable-uvicorn-access-log", "--disable-log-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise RuntimeError(f"server exited with {proc.returncode}:\n{out[-3000:]}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=1) as r:
                if r.status == 200:
                    return proc, base
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("server did not become healthy in time")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def embed_client(minilm_path: str) -> Iterator[openai.OpenAI]:
    proc, base = _start_server(["--model", minilm_path, "--served-model-name", "minilm"])
    try:
        yield openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    finally:
        _stop(proc)


def _vec(item) -> np.ndarray:
    return np.asarray(item.embedding, dtype=np.float64)


def test_inputs_shapes_usage_and_order(embed_client, minilm_path: str, st_model) -> None:
    texts = ["hello world", "", "Ünïcödé 日本語 🚀", "a much longer sentence " * 30]
    res = embed_client.embeddings.create(model="minilm", input=texts, encoding_format="float")
    assert res.object == "list" and res.model == "minilm"
    assert [d.index for d in res.data] == [0, 1, 2, 3]
    assert all(len(d.embedding) == 384 for d in res.data)
    tok = get_tokenizer(minilm_path)
    assert res.usage.prompt_tokens == sum(len(tok.encode(t)) for t in texts)
    assert res.usage.total_tokens == res.usage.prompt_tokens
    for d, ref in zip(res.data, st_model.encode(texts)):
        v = _vec(d)
        assert float(v @ ref / np.linalg.norm(v) / np.linalg.norm(ref)) >= 0.999
    # A single string, token ids and a list of token-id lists give the same vectors.
    one = embed_client.embeddings.create(model="minilm", input=texts[0], encoding_format="float")
    ids = tok.encode(texts[0])
    by_ids = embed_client.embeddings.create(model="minilm", input=ids, encoding_format="float")
    by_lists = embed_client.embeddings.create(
        model="minilm", input=[ids, tok.encode(texts[2])], encoding_format="float"
    )
    assert len(one.data) == len(by_ids.data) == 1 and len(by_lists.data) == 2
    np.testing.assert_allclose(_vec(one.data[0]), _vec(res.data[0]), atol=1e-5)
    np.testing.assert_allclose(_vec(by_ids.data[0]), _vec(res.data[0]), atol=1e-5)
    np.testing.assert_allclose(_vec(by_lists.data[1]), _vec(res.data[2]), atol=1e-5)
    assert by_ids.usage.prompt_tokens == len(ids)


def test_base64_encoding(embed_client) -> None:
    flt = embed_client.embeddings.create(model="minilm", input="base64 check",
                                         encoding_format="float")
    # The SDK asks for base64 when no format is given and decodes it itself.
    dflt = embed_client.embeddings.create(model="minilm", input="base64 check")
    np.testing.assert_allclose(_vec(dflt.data[0]), _vec(flt.data[0]), rtol=1e-6, atol=1e-7)
    raw = embed_client.embeddings.with_raw_response.create(
        model="minilm", input="base64 check", encoding_format="base64"
    )
    body = raw.http_response.json()
    assert isinstance(body["data"][0]["embedding"], str)


def test_errors_and_truncation(embed_client, minilm_path: str) -> None:
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        embed_client.embeddings.create(model="minilm", input="x", dimensions=8)
    too_long = "word " * 600
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        embed_client.embeddings.create(model="minilm", input=too_long)
    with pytest.raises(openai.BadRequestError, match="input"):
        embed_client.embeddings.create(model="minilm", input=[])
    with pytest.raises(openai.NotFoundError):
        embed_client.embeddings.create(model="other", input="x")
    res = embed_client.embeddings.create(
        model="minilm", input=too_long, encoding_format="float",
        extra_body={"truncate_prompt_tokens": 10},
    )
    assert res.usage.prompt_tokens == 10
    ids = get_tokenizer(minilm_path)(too_long, truncation=True, max_length=10)["input_ids"]
    assert ids[0] == 101 and ids[-1] == 102  # [CLS] ... [SEP] kept
    same = embed_client.embeddings.create(model="minilm", input=ids, encoding_format="float")
    np.testing.assert_allclose(_vec(res.data[0]), _vec(same.data[0]), atol=1e-5)
    res = embed_client.embeddings.create(
        model="minilm", input=list(range(1000, 1600)), encoding_format="float",
        extra_body={"truncate_prompt_tokens": -1},  # -1: max_model_len, keeping the last ids
    )
    assert res.usage.prompt_tokens == embed_client.models.list().data[0].max_model_len


def test_embedding_server_rejects_generation(embed_client) -> None:
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        embed_client.chat.completions.create(
            model="minilm", messages=[{"role": "user", "content": "hi"}]
        )
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        embed_client.completions.create(model="minilm", prompt="hi")


def test_generation_server_rejects_embeddings() -> None:
    proc, base = _start_server(["--max-model-len", "512"])  # the default SmolLM2 GGUF
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="does not support embeddings"):
            client.embeddings.create(model="SmolLM2-135M-Instruct", input="hello")
    finally:
        _stop(proc)
