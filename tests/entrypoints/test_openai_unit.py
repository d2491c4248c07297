"""Server pieces that need no model: CLI flags, request schema, SSE framing, error shapes."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from pagedllm.engine.core_proc import decode_add_request
from pagedllm.engine.protocol import EngineCoreRequest
from pagedllm.entrypoints.cli import make_parser
from pagedllm.entrypoints.openai import cli_args
from pagedllm.entrypoints.openai.errors import install_error_handlers
from pagedllm.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from pagedllm.entrypoints.openai.serving_completion import normalize_prompts
from pagedllm.entrypoints.openai.serving_engine import legacy_logprobs
from pagedllm.entrypoints.openai.streaming import SSE_DONE, merge, sse
from pagedllm.outputs import Logprob
from pagedllm.sampling_params import RequestOutputKind, SamplingParams


def test_serve_flags_vllm_names_and_defaults():
    args = make_parser().parse_args(["serve", "m.gguf", "--served-model-name", "a", "b",
                                     "--no-enable-prefix-caching", "-tp", "1"])
    assert cli_args.resolve_model(args) == "m.gguf"
    assert (args.host, args.port, args.served_model_name) == ("127.0.0.1", 8000, ["a", "b"])
    assert args.enable_prefix_caching is False and args.enable_chunked_prefill is True
    ea = cli_args.engine_args_from_cli(args)
    assert ea.model == "m.gguf" and ea.enable_prefix_caching is False and ea.block_size == 16
    assert ea.scheduling_policy == "fcfs"
    prio = make_parser().parse_args(["serve", "--scheduling-policy", "priority"])
    assert cli_args.engine_args_from_cli(prio).scheduling_policy == "priority"
    cli_args.validate_args(args)
    with pytest.raises(ValueError, match="unknown quantization method 'int3'"):
        cli_args.validate_args(make_parser().parse_args(["serve", "--quantization", "int3"]))
    par = make_parser().parse_args(["serve", "-tp", "2", "-pp", "2", "-dp", "2",
                                    "--distributed-executor-backend", "ray",
                                    "--load-format", "dummy", "--kv-cache-dtype", "fp8"])
    ea = cli_args.engine_args_from_cli(par)
    assert (ea.tensor_parallel_size, ea.pipeline_parallel_size, ea.data_parallel_size) == (2, 2, 2)
    assert (ea.distributed_executor_backend, ea.load_format, ea.kv_cache_dtype) == (
        "ray", "dummy", "fp8")


def test_api_key_from_env(monkeypatch):
    args = make_parser().parse_args(["serve"])
    monkeypatch.setenv("PAGEDLLM_API_KEY", "k1")
    assert cli_args.api_key_from_args(args) == "k1"
    args = make_parser().parse_args(["serve", "--api-key", "k2"])
    assert cli_args.api_key_from_args(args) == "k2"


def test_request_models_map_to_sampling_params():
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], logprobs=True,
                                top_logprobs=3, max_completion_tokens=7, stream=True, top_k=5)
    p = req.to_sampling_params(None)
    assert (p.logprobs, p.max_tokens, p.top_k) == (3, 7, 5)
    assert p.output_kind == RequestOutputKind.DELTA
    c = CompletionRequest(prompt="x", echo=True, logprobs=2)
    p = c.to_sampling_params(None)
    assert p.max_tokens == 16 and p.prompt_logprobs == 2
    assert p.output_kind == RequestOutputKind.FINAL_ONLY
    with pytest.raises(ValueError, match="best_of"):
        CompletionRequest(prompt="x", best_of=2).check_supported()
    with pytest.raises(ValueError, match="suffix"):
        CompletionRequest(prompt="x", suffix="y").check_supported()


def test_normalize_prompts():
    assert normalize_prompts("a") == ["a"]
    assert normalize_prompts([1, 2]) == [[1, 2]]
    assert normalize_prompts([[1], [2, 3]]) == [[1], [2, 3]]
    assert normalize_prompts(["a", "b"]) == ["a", "b"]


def test_sse_framing_and_merge():
    assert sse({"a": 1}) == b'data: {"a":1}\n\n'
    assert SSE_DONE == b"data: [DONE]\n\n"

    async def gen(xs, delay):
        for x in xs:
            await asyncio.sleep(delay)
            yield x

    async def run():
        return [item async for item in merge([gen([1, 2], 0.001), gen(["a"], 0.0)])]

    got = asyncio.run(run())
    assert sorted(got, key=str) == sorted([(0, 1), (0, 2), (1, "a")], key=str)


def test_legacy_logprobs_format():
    class Tok:
        def decode(self, ids):
            return "?"

    pos = {5: Logprob(-0.5, 2, "b"), 4: Logprob(-0.1, 1, "a")}
    body, end = legacy_logprobs(Tok(), [7, 5], [None, pos], 1, 10)
    assert body["tokens"] == ["?", "b"]
    assert body["token_logprobs"] == [None, -0.5]
    assert body["top_logprobs"] == [None, {"a": -0.1, "b": -0.5}]
    assert body["text_offset"] == [10, 11] and end == 12


def test_error_shapes_for_validation():
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/c")
    async def c(body: CompletionRequest) -> dict:
        return {}

    client = TestClient(app)
    for payload, param in [({"prompt": "x", "nope": 1}, "nope"), ({}, "prompt"),
                           ({"prompt": "x", "n": "many"}, "n")]:
        r = client.post("/c", json=payload)
        assert r.status_code == 400
        assert r.json()["error"]["param"] == param, r.json()
    r = client.post("/c", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "Malformed JSON" in r.json()["error"]["message"]
    r = client.get("/missing")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_add_request_decode_restores_stop_ids():
    sp = SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=[9])
    sp.all_stop_token_ids = {9, 2}
    req = EngineCoreRequest("r", [1, 2, 3], sp, 2, 0.0)
    decoded = decode_add_request(msgspec.msgpack.Decoder(EngineCoreRequest),
                                 msgspec.msgpack.encode(req))
    assert decoded.sampling_params.all_stop_token_ids == {2, 9}
