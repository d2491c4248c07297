"""API-key auth, schema fuzzing (schemathesis) and engine death, each on its own live server."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.entrypoints.remote_server import RemoteServer, assert_children_exit

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def auth_server():
    # A short context bounds every fuzzed generation; the key comes from the environment.
    srv = RemoteServer(["--max-model-len", "48", "--disable-log-requests"],
                       env={"PAGEDLLM_API_KEY": KEY})
    yield srv
    srv.stop()


def test_auth(auth_server):
    url = auth_server.url
    for path in ("/health", "/ping", "/version"):
        assert httpx.get(url + path).status_code == 200, path
    for method, path in [("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/tokenize"),
                         ("GET", "/tokenizer_info"), ("POST", "/v1/completions"),
                         ("POST", "/v1/chat/completions"), ("GET", "/openapi.json"),
                         ("GET", "/does-not-exist")]:
        r = httpx.request(method, url + path, json={})
        assert r.status_code == 401, (path, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        wrong = httpx.request(method, url + path, json={}, headers={"Authorization": "Bearer x"})
        assert wrong.status_code == 401
    ok = httpx.get(url + "/v1/models", headers=AUTH)
    assert ok.status_code == 200
    r = httpx.post(url + "/v1/completions", headers=AUTH,
                   json={"prompt": "Hi", "max_tokens": 1})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def _bound(body):
    """Keep fuzzed generations tiny on a 2-core machine (the shape stays fuzzed)."""
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int) and body[key] > 2:
                body[key] = 2
        if "max_tokens" not in body and "messages" in body:
            body["max_tokens"] = 2
        if isinstance(body.get("n"), int) and body["n"] > 2:
            body["n"] = 2
        if isinstance(body.get("min_tokens"), int) and body["min_tokens"] > 2:
            body["min_tokens"] = 2
        if isinstance(body.get("prompt"), list) and len(body["prompt"]) > 2:
            body["prompt"] = body["prompt"][:2]
    return body


def test_fuzz_generation_endpoints(auth_server):
    """Schemathesis cases from the server's own OpenAPI schema: no 5xx, no hang."""
    api = schemathesis.openapi.from_url(auth_server.url + "/openapi.json", headers=AUTH)
    for path in ("/v1/completions", "/v1/chat/completions"):
        operation = api[path]["POST"]

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case):
            case.body = _bound(case.body)
            response = case.call(headers=AUTH, timeout=60)
            assert response.status_code < 500, (case.body, response.text)
            if response.status_code >= 400:
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}

        check()


def test_engine_death_and_sigterm_cleanup():
    srv = RemoteServer(["--max-model-len", "64", "--uvicorn-log-level", "warning"])
    try:
        children = srv.engine_pids()
        engine = srv.engine_core_pids()
        assert len(engine) == 1
        os.kill(engine[0], signal.SIGKILL)
        deadline = time.monotonic() + 5
        status = None
        while time.monotonic() < deadline:
            status = httpx.get(srv.url + "/health").status_code
            if status == 503:
                break
            time.sleep(0.1)
        assert status == 503
        t0 = time.monotonic()
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                       timeout=10)
        assert time.monotonic() - t0 < 2.0
        assert r.status_code == 503
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    finally:
        code = srv.stop()
    assert code is not None
    assert_children_exit(children)


def test_in_flight_request_fails_fast_when_engine_dies():
    srv = RemoteServer(["--max-model-len", "64"])
    try:
        engine = srv.engine_core_pids()[0]
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=30,
                          json={"prompt": "Hi", "max_tokens": 50, "ignore_eos": True,
                                "stream": True}) as resp:
            assert resp.status_code == 200
            os.kill(engine, signal.SIGKILL)
            t0 = time.monotonic()
            body = b"".join(resp.iter_bytes())
        assert time.monotonic() - t0 < 5.0
        assert b'"error"' in body and body.endswith(b"data: [DONE]\n\n")
    finally:
        srv.stop()


def test_priority_scheduling_policy_server():
    """--scheduling-policy priority through the whole server: the request field reaches the
    scheduler, and with one sequence at a time a later, more urgent request overtakes a
    waiting one."""
    from concurrent.futures import ThreadPoolExecutor

    srv = RemoteServer(["--max-model-len", "128", "--max-num-seqs", "1",
                        "--scheduling-policy", "priority"])  # fmt: skip
    done: dict[str, float] = {}

    def complete(name: str, priority: int, max_tokens: int) -> int:
        r = httpx.post(srv.url + "/v1/completions", timeout=60, json={
            "prompt": "Hi", "max_tokens": max_tokens, "ignore_eos": True, "priority": priority})
        done[name] = time.monotonic()
        return r.status_code

    try:
        with ThreadPoolExecutor(3) as pool:
            busy = pool.submit(complete, "busy", 0, 100)  # holds the only sequence slot
            time.sleep(0.5)
            low = pool.submit(complete, "low", 10, 4)
            time.sleep(0.3)
            high = pool.submit(complete, "high", -1, 4)
            assert [f.result() for f in (busy, low, high)] == [200, 200, 200]
        assert done["busy"] < done["high"] < done["low"]
    finally:
        srv.stop()
