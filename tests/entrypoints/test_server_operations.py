"""Live server with operations flags: request limits and strict types (400 naming the field),
body-size limit (400 request_too_large), backpressure (503 + Retry-After), --generation-config defaults, the
/dashboard page and its stats under load (behind --api-key) and --shutdown-timeout. One
server for the module; the shutdown test stops it and runs last."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time

import httpx
import pytest

from pagedllm.entrypoints import cli
from tests.entrypoints.remote_server import RemoteServer, assert_children_exit
from tests.entrypoints.test_server import assert_error, metric

CHAT = [{"role": "user", "content": "Write one sentence about the sea."}]
PROMPT = "The capital of France is"
SHUTDOWN_TIMEOUT_S = 2
BODY_LIMIT_MB = 0.01  # 10485 bytes
KEY = "ops-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def ops_server(tmp_path_factory):
    gen_dir = tmp_path_factory.mktemp("genconfig")
    # temperature 0 by default: requests that leave it unset are greedy (and so repeatable).
    (gen_dir / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.0, "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.0,
         "eos_token_id": 2}))
    srv = RemoteServer([
        "--max-num-seqs", "1", "--max-waiting-requests", "1", "--max-n", "4",
        "--max-stop-strings", "2", "--max-logit-bias", "2",
        "--max-request-body-mb", str(BODY_LIMIT_MB), "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S),
        "--generation-config", str(gen_dir), "--disable-log-requests", "--api-key", KEY,
    ])
    yield srv
    children = srv.engine_pids()
    srv.stop()
    assert_children_exit(children)


def post(srv, path: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, timeout=120, headers=AUTH, **kw)


def get(srv, path: str, **kw) -> httpx.Response:
    return httpx.get(srv.url + path, timeout=30, headers=AUTH, **kw)


def chat(**fields) -> dict:
    return {"messages": CHAT, "max_tokens": 2, **fields}


def completion(**fields) -> dict:
    return {"prompt": PROMPT, "max_tokens": 2, **fields}


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", completion(n=5), "n"),
    ("/v1/chat/completions", chat(n=100000), "n"),
    ("/v1/completions", completion(best_of=200), "best_of"),
    ("/v1/completions", completion(n=0), "n"),
    ("/v1/completions", completion(stop=["a", "b", "c"]), "stop"),
    ("/v1/chat/completions", chat(logit_bias={"1": 1, "2": 1, "3": 1}), "logit_bias"),
    ("/v1/completions", completion(seed=2**64), "seed"),
    ("/v1/chat/completions", chat(seed=2**63), "seed"),
    ("/v1/completions", completion(seed=-(2**63) - 1), "seed"),
    ("/v1/completions", completion(max_tokens="10"), "max_tokens"),
    ("/v1/completions", completion(max_tokens=10.5), "max_tokens"),
    ("/v1/chat/completions", chat(max_tokens=True), "max_tokens"),
    ("/v1/chat/completions", chat(max_completion_tokens="3"), "max_completion_tokens"),
    ("/v1/completions", completion(logprobs="2"), "logprobs"),
    ("/v1/completions", completion(logprobs=1.5), "logprobs"),
    ("/v1/chat/completions", chat(logprobs="yes"), "logprobs"),
    ("/v1/chat/completions", chat(logprobs=True, top_logprobs="2"), "top_logprobs"),
    ("/v1/chat/completions", chat(logprobs=True, top_logprobs=2.5), "top_logprobs"),
    ("/v1/chat/completions",
     {"messages": [{"role": "robot", "content": "hi"}], "max_tokens": 2}, "messages.0.role"),
])
def test_bad_field_is_400_naming_it(ops_server, path, body, param):
    err = assert_error(post(ops_server, path, body), 400, param)
    assert err["type"] == "invalid_request_error"


def test_limits_edges_are_accepted(ops_server):
    """The largest allowed values work end to end (a seed of 2^63-1 crosses msgpack)."""
    r = post(ops_server, "/v1/completions", completion(
        n=4, seed=2**63 - 1, stop=["x", "y"], logit_bias={"1": -1, "2": -1}, logprobs=1))
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 4
    r = post(ops_server, "/v1/chat/completions", chat(
        seed=-(2**63), messages=[{"role": "developer", "content": "Be brief."}, *CHAT],
        logprobs=True, top_logprobs=2))
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 2


def test_request_body_over_limit_is_a_400(ops_server):
    big = completion(prompt="word " * 3000)  # ~15 kB > 10485 bytes
    err = assert_error(post(ops_server, "/v1/completions", big), 400, None)
    assert "--max-request-body-mb" in err["message"] and err["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit is enforced while reading
        data = json.dumps(big).encode()
        for i in range(0, len(data), 4096):
            yield data[i:i + 4096]

    r = httpx.post(ops_server.url + "/v1/completions", content=chunks(),
                   headers={"content-type": "application/json", **AUTH}, timeout=60)
    assert assert_error(r, 400, None)["code"] == "request_too_large"
    # Under the limit, still served.
    assert post(ops_server, "/v1/completions", completion()).status_code == 200


def test_generation_config_defaults_apply_when_unset(ops_server):
    assert "default sampling parameters from" in ops_server.read_log()
    kw = {"prompt": PROMPT, "max_tokens": 6, "ignore_eos": True}
    texts = {post(ops_server, "/v1/completions", kw).json()["choices"][0]["text"]
             for _ in range(2)}
    assert len(texts) == 1  # temperature 0 from generation_config.json: greedy
    greedy = post(ops_server, "/v1/completions",
                  {**kw, "temperature": 0, "top_p": 0.9, "top_k": 40}).json()
    assert greedy["choices"][0]["text"] in texts
    # A request that sets temperature overrides the default: n=4 hot samples differ.
    hot = post(ops_server, "/v1/completions", {**kw, "temperature": 1.5, "top_k": 0,
                                               "top_p": 1.0, "n": 3, "seed": 3}).json()
    assert len({c["text"] for c in hot["choices"]}) > 1


def _waiting(srv) -> float:
    return metric(get(srv, "/metrics").text, "pagedllm:num_requests_waiting")


def test_max_waiting_requests_503_with_retry_after(ops_server):
    """--max-num-seqs 1 and --max-waiting-requests 1: one runs, one waits, the next is
    refused at once with a 503 and Retry-After; the waiting one is still served."""
    long = {"prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", ops_server.url + "/v1/completions", json=long, timeout=120,
                      headers=AUTH) as s:
        lines = s.iter_lines()
        assert next(lines).startswith("data: ")  # running
        second: dict = {}
        t = threading.Thread(target=lambda: second.update(
            r=post(ops_server, "/v1/completions", completion(max_tokens=3))))
        t.start()
        deadline = time.monotonic() + 30
        while _waiting(ops_server) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _waiting(ops_server) == 1
        t0 = time.monotonic()
        r = post(ops_server, "/v1/chat/completions", chat())
        assert time.monotonic() - t0 < 5
        err = assert_error(r, 503, None)
        assert err["code"] == "server_overloaded" and "--max-waiting-requests" in err["message"]
        assert int(r.headers["retry-after"]) >= 1
    # Closing the stream aborts the long request; the waiting one then runs.
    t.join(60)
    assert second["r"].status_code == 200, second["r"].text
    assert post(ops_server, "/v1/completions", completion()).status_code == 200


def test_dashboard_page_is_self_contained_and_public(ops_server):
    r = httpx.get(ops_server.url + "/dashboard")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "dashboard/stats" in page and "setInterval(poll, 1000)" in page
    assert "Authorization" in page and 'type="password"' in page  # it asks for the key
    # No external assets: nothing loaded from another origin.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<script src" not in page and "<link" not in page
    assert_error(httpx.get(ops_server.url + "/dashboard/stats"), 401, None)


def test_dashboard_stats_follow_load_and_agree_with_metrics(ops_server):
    # Long enough to still run 1 s after the first token (CPU decode is ~50 tok/s now).
    long = {"prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", ops_server.url + "/v1/completions", json=long, timeout=120,
                      headers=AUTH) as s:
        lines = s.iter_lines()
        assert next(lines).startswith("data: ")
        first = get(ops_server, "/dashboard/stats").json()
        time.sleep(1.0)
        second = get(ops_server, "/dashboard/stats").json()
        for snap in (first, second):
            assert snap["running"] == 1 and snap["kv_cache_usage"] > 0
            rows = [r for r in snap["requests"] if r["max_tokens"] == 200]
            assert len(rows) == 1 and rows[0]["state"] == "running"
            assert rows[0]["prompt_tokens"] > 0
        before = [r for r in first["requests"] if r["max_tokens"] == 200][0]
        after = [r for r in second["requests"] if r["max_tokens"] == 200][0]
        assert after["generated_tokens"] > before["generated_tokens"]
        assert second["generation_tokens_total"] > first["generation_tokens_total"]
        assert second["generation_tokens_per_s"] > 0
        assert second["ttft_s"]["p50"] is not None and second["tpot_s"]["p50"] is not None
        assert second["ttft_s"]["p50"] <= second["ttft_s"]["p99"]
        list(lines)  # to the end
    deadline = time.monotonic() + 10
    while get(ops_server, "/dashboard/stats").json()["requests"] and time.monotonic() < deadline:
        time.sleep(0.2)
    idle = get(ops_server, "/dashboard/stats").json()
    text = get(ops_server, "/metrics").text
    assert idle["requests"] == [] and idle["running"] == 0 and idle["waiting"] == 0
    assert idle["running"] == metric(text, "pagedllm:num_requests_running")
    assert idle["generation_tokens_total"] == metric(text, "pagedllm:generation_tokens_total")
    assert idle["prompt_tokens_total"] == metric(text, "pagedllm:prompt_tokens_total")
    assert idle["num_preemptions_total"] == metric(text, "pagedllm:num_preemptions_total")
    finished = sum(metric(text, "pagedllm:request_success_total", finished_reason=r)
                   for r in ("stop", "length", "abort"))
    assert idle["finished_requests_total"] == finished


def test_dashboard_in_headless_chromium_under_load(ops_server, tmp_path):
    """The real page in Chromium (system package) driven by Playwright: it asks for the key,
    then its figures follow a live request and end equal to /metrics."""
    from playwright.sync_api import expect, sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is not installed (make test installs it as root)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(ops_server.url + "/dashboard")
            expect(page.locator("#status")).to_have_text("API key required", timeout=20_000)
            page.fill("#key", KEY)
            page.click("button[type=submit]")
            expect(page.locator("#status")).to_contain_text("live", timeout=20_000)
            long = {"prompt": PROMPT, "max_tokens": 300, "ignore_eos": True}  # a few polls
            worker = threading.Thread(target=lambda: post(ops_server, "/v1/completions", long))
            worker.start()
            expect(page.locator("#running")).to_have_text("1", timeout=30_000)
            row = page.locator("tr.request").first
            expect(row).to_contain_text("running", timeout=10_000)
            generated = int(row.locator("td").nth(3).inner_text())
            total = int(page.inner_text("#gen_total"))
            page.wait_for_function(
                f"Number(document.getElementById('gen_total').textContent) > {total}",
                timeout=20_000)
            page.wait_for_function(
                "(g) => { const r = document.querySelector('tr.request');"
                " return r !== null && Number(r.children[3].textContent) > g; }",
                arg=generated, timeout=20_000)
            assert float(page.inner_text("#gen_tps")) > 0
            assert "ms" in page.inner_text("#ttft")
            shot = os.environ.get("PAGEDLLM_DASHBOARD_SCREENSHOT") or str(tmp_path / "dash.png")
            page.screenshot(path=shot, full_page=True)
            worker.join(120)
            expect(page.locator("#running")).to_have_text("0", timeout=30_000)
            expect(page.locator("tr.request")).to_have_count(0, timeout=10_000)
            text = get(ops_server, "/metrics").text
            expected = int(metric(text, "pagedllm:generation_tokens_total"))
            expect(page.locator("#gen_total")).to_have_text(str(expected), timeout=10_000)
        finally:
            browser.close()


def test_cli_clients_send_the_api_key(ops_server, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("PAGEDLLM_API_KEY", raising=False)
    url = ops_server.url + "/v1"
    assert cli.main(["complete", "--url", url, "-q", PROMPT, "--max-tokens", "4"]) == 1
    assert "401" in capsys.readouterr().err
    assert cli.main(["complete", "--url", url, "--api-key", KEY, "-q", PROMPT,
                     "--max-tokens", "4", "--temperature", "0"]) == 0
    expected = post(ops_server, "/v1/completions",
                    {"prompt": PROMPT, "max_tokens": 4, "temperature": 0}).json()
    assert capsys.readouterr().out == expected["choices"][0]["text"] + "\n"


def test_zz_sigterm_drains_for_shutdown_timeout_then_exits(ops_server):
    """A request far longer than --shutdown-timeout is in flight: SIGTERM stops the server
    after the drain time, not after the default 30 s nor when the request ends."""
    long = {"prompt": PROMPT, "max_tokens": 1000, "ignore_eos": True, "stream": True}
    received: list[str] = []
    with httpx.stream("POST", ops_server.url + "/v1/completions", json=long, timeout=120,
                      headers=AUTH) as s:
        lines = s.iter_lines()
        received.append(next(lines))
        assert received[0].startswith("data: ")
        children = ops_server.engine_pids()
        t0 = time.monotonic()
        code = ops_server.stop(timeout=60)
        elapsed = time.monotonic() - t0
        try:
            received.extend(lines)
        except httpx.HTTPError:
            pass  # the server cut the stream
    with open(ops_server.log_path) as f:
        log = f.read()
    assert code in (0, -15), log[-2000:]  # uvicorn re-raises SIGTERM once it has shut down
    assert "data: [DONE]" not in received, (elapsed, received[-3:], log[-3000:])
    assert "timeout graceful shutdown exceeded" in log, (elapsed, received[-3:], log[-3000:])
    assert SHUTDOWN_TIMEOUT_S <= elapsed < SHUTDOWN_TIMEOUT_S + 20, elapsed
    assert_children_exit(children)
