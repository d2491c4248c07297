"""Live OpenAI-compatible server, driven by the real `openai` SDK (issue #4's test list)."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import openai
import pytest

MODEL = "smol"
CHAT = [{"role": "user", "content": "Write one sentence about the sea."}]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def aclient_factory(server):
    def make() -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                                  timeout=120)
    return make


def assert_error(resp: httpx.Response, status: int, param: str | None = "<any>") -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param != "<any>":
        assert err["param"] == param
    return err


def metric(text: str, name: str, **labels) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} {labels} not found")


# ---- basics ----
def test_startup_and_meta_endpoints(server):
    assert "Application startup complete" in server.read_log()
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/ping").status_code == 200
    assert httpx.post(server.url + "/ping").status_code == 200
    assert httpx.get(server.url + "/version").json()["version"]


def test_models(client, server):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["smol", "alias-smol"]
    assert client.models.retrieve("alias-smol").id == "alias-smol"
    err = assert_error(httpx.get(server.url + "/v1/models/nope"), 404, "model")
    assert "nope" in err["message"]


def test_completion_length_and_usage(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "length"
    assert r.usage.completion_tokens == 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5
    tok = httpx.post(str(client.base_url).replace("/v1/", "/tokenize"),
                     json={"prompt": PROMPT}).json()
    assert r.usage.prompt_tokens == tok["count"]
    # The alias works, and an empty `model` means the default.
    assert client.completions.create(model="alias-smol", prompt=PROMPT, max_tokens=1).model == "alias-smol"


def test_chat_basic(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0)
    assert r.object == "chat.completion"
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content
    assert r.usage.completion_tokens <= 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # Text-part content renders the same prompt as a plain string.
    parts = [{"role": "user", "content": [{"type": "text", "text": CHAT[0]["content"]}]}]
    r2 = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=6, temperature=0)
    assert r2.choices[0].message.content == msg.content
    assert r2.usage.prompt_tokens == r.usage.prompt_tokens


def test_streamed_equals_non_streamed(client):
    kw = dict(model=MODEL, max_tokens=6, temperature=0)
    full = client.chat.completions.create(messages=CHAT, **kw).choices[0].message.content
    chunks = list(client.chat.completions.create(messages=CHAT, stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    full_c = client.completions.create(prompt=PROMPT, **kw).choices[0].text
    streamed = client.completions.create(prompt=PROMPT, stream=True, **kw)
    assert "".join(c.choices[0].text for c in streamed) == full_c


def test_stream_usage_options(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=5, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
    ))
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 5
    assert last.usage.total_tokens == last.usage.prompt_tokens + 5
    assert all(c.usage is not None for c in chunks)
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts)
    no_usage = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3,
                                              stream=True))
    assert all(c.usage is None for c in no_usage)
    final_only = list(client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=3, stream=True,
        stream_options={"include_usage": True},
    ))
    assert all(c.usage is None for c in final_only[:-1])
    assert final_only[-1].choices == [] and final_only[-1].usage.completion_tokens == 3
    assert final_only[-1].id == final_only[0].id and final_only[-1].object == "text_completion"


def test_n_and_seed(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=1.0, n=3, seed=1234)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1
    assert 3 <= a.usage.completion_tokens <= 18
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, n=2,
                                                 seed=7, stream=True))
    by_index: dict[int, str] = {}
    for ch in chunks:
        for choice in ch.choices:
            by_index[choice.index] = by_index.get(choice.index, "") + (choice.delta.content or "")
    assert set(by_index) == {0, 1}


def test_multiple_prompts_and_token_ids(client):
    ids = httpx.post(str(client.base_url).replace("/v1/", "/tokenize"),
                     json={"prompt": PROMPT}).json()["tokens"]
    by_text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    many = client.completions.create(model=MODEL, prompt=[PROMPT, "Hello"], max_tokens=3,
                                     temperature=0, n=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text  # greedy: both samples agree
    ids_list = client.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=4,
                                         temperature=0)
    assert [c.text for c in ids_list.choices] == [by_text.choices[0].text] * 2


def test_echo_and_legacy_logprobs(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0,
                                  echo=True, logprobs=2)
    c = r.choices[0]
    assert c.text.startswith(PROMPT)
    lp = c.logprobs
    n = len(lp.tokens)
    assert n == r.usage.prompt_tokens + 3
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == c.text
    assert lp.text_offset == sorted(lp.text_offset)
    # Greedy: the chosen token is the most likely one.
    for tok, val, top in zip(lp.tokens[-3:], lp.token_logprobs[-3:], lp.top_logprobs[-3:]):
        assert max(top.values()) == pytest.approx(val, abs=1e-4)
        assert tok in top


def test_echo_with_max_tokens_0_scores_the_prompt(client):
    # The legacy scoring idiom (lm-evaluation-harness loglikelihood): echo + logprobs and no
    # completion. Same prompt logprobs as an echo request that also generates.
    scored = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, temperature=0,
                                       echo=True, logprobs=1)
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0,
                                     echo=True, logprobs=1)
    c = scored.choices[0]
    n = scored.usage.prompt_tokens
    assert c.text == PROMPT and scored.usage.completion_tokens == 0
    assert c.finish_reason == "length"
    assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) == n
    assert c.logprobs.token_logprobs[0] is None
    want = full.choices[0].logprobs.token_logprobs[1:n]
    assert c.logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0,
                                            echo=True, logprobs=1, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == PROMPT
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0)


def test_chat_echo_continues_the_final_message(client):
    # vLLM's chat echo: with continue_final_message, the answer starts with the partial
    # assistant message it continues, streamed or not.
    messages = CHAT + [{"role": "assistant", "content": "The sea is"}]
    kw = dict(model=MODEL, messages=messages, max_tokens=5, temperature=0,
              extra_body={"echo": True, "add_generation_prompt": False,
                          "continue_final_message": True})
    plain = client.chat.completions.create(**kw)
    bare = client.chat.completions.create(**{**kw, "extra_body": {
        "add_generation_prompt": False, "continue_final_message": True}})
    assert plain.choices[0].message.content == "The sea is" + bare.choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == plain.choices[0].message.content
    # The last message is the user's: nothing to echo.
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, temperature=0,
                                       extra_body={"echo": True})
    ref = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, temperature=0)
    assert r.choices[0].message.content == ref.choices[0].message.content


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)
        assert bytes(entry.bytes).decode(errors="replace") or entry.token == ""
    assert "".join(e.token for e in content) == r.choices[0].message.content


def test_stop_strings(client):
    kw = dict(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=10)
    base = client.completions.create(**kw).choices[0].text
    words = re.findall(r"[A-Za-z]{3,}", base)
    assert len(words) >= 2, base
    stop = words[1]
    cut = base[: base.index(stop)]
    r = client.completions.create(stop=[stop], **kw)
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(stop=[stop], stream=True, **kw))
    pieces = [c.choices[0].text for c in streamed]
    assert "".join(pieces) == cut
    assert all(stop not in p for p in pieces)
    inc = client.completions.create(stop=[stop], extra_body={"include_stop_str_in_output": True},
                                    **kw)
    assert inc.choices[0].text == cut + stop


def test_vllm_extras_accepted(client):
    r = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4,
        extra_body=dict(top_k=5, min_p=0.05, repetition_penalty=1.1, min_tokens=4,
                        ignore_eos=True, stop_token_ids=[0], include_stop_str_in_output=False,
                        skip_special_tokens=True, prompt_logprobs=1, seed=3, priority=0),
    )
    assert r.usage.completion_tokens == 4
    # Like vLLM under its default first-come-first-served policy: a priority is refused.
    with pytest.raises(openai.BadRequestError, match="priority scheduling is not enabled") as e:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4,
                                  extra_body={"priority": 1})
    assert e.value.body["param"] == "priority"


# ---- errors ----
def test_error_cases(server):
    url = server.url
    chat = url + "/v1/chat/completions"
    base = {"model": MODEL, "messages": CHAT, "max_tokens": 2}
    err = assert_error(httpx.post(chat, json={**base, "bogus_field": 1}), 400, "bogus_field")
    assert "bogus_field" in err["message"]
    assert_error(httpx.post(chat, content=b'{"messages": [', headers={"content-type": "application/json"}), 400)
    assert_error(httpx.post(chat, json={"model": MODEL}), 400, "messages")
    assert_error(httpx.post(chat, json={**base, "temperature": -1}), 400, "temperature")
    assert_error(httpx.post(chat, json={**base, "max_tokens": "many"}), 400, "max_tokens")
    assert_error(httpx.post(chat, json={**base, "model": "gpt-4"}), 404, "model")
    assert_error(httpx.post(chat, json={**base, "chat_template": "{{ 1 }}"}), 400, "chat_template")
    assert_error(httpx.post(chat, json={**base, "response_format": {"type": "xml"}}), 400,
                 "response_format.type")
    assert_error(httpx.get(url + "/v1/nothing-here"), 404)
    assert_error(httpx.get(url + "/v1/chat/completions"), 405)
    comp = url + "/v1/completions"
    err = assert_error(httpx.post(comp, json={"prompt": "hi", "best_of": 3}), 400, "best_of")
    assert "best_of" in err["message"]
    assert_error(httpx.post(comp, json={"prompt": "hi", "suffix": "end"}), 400, "suffix")
    assert_error(httpx.post(comp, json={"prompt": []}), 400, "prompt")
    assert_error(httpx.post(comp, json={"prompt": [10**9]}), 400)
    # Context length: names the limit and the request's token count.
    long_prompt = "hello " * 9000
    err = assert_error(httpx.post(comp, json={"prompt": long_prompt, "max_tokens": 1}), 400)
    assert "8192" in err["message"] and err["code"] == "context_length_exceeded"
    ntok = httpx.post(url + "/tokenize", json={"prompt": long_prompt}).json()["count"]
    assert str(ntok) in err["message"]
    err = assert_error(httpx.post(comp, json={"prompt": "hi", "max_tokens": 100000}), 400)
    assert "8192" in err["message"] and "100000" in err["message"]
    # Streaming errors are reported before the stream starts, as plain errors.
    assert_error(httpx.post(comp, json={"prompt": "hi", "stream": True, "temperature": -2}), 400)


def test_tokenize_detokenize_info(server):
    url = server.url
    t = httpx.post(url + "/tokenize", json={"prompt": "Hello world", "return_token_strs": True})
    body = t.json()
    assert body["count"] == len(body["tokens"]) == len(body["token_strs"]) > 0
    assert body["max_model_len"] == 8192
    d = httpx.post(url + "/detokenize", json={"tokens": body["tokens"]}).json()
    assert d["prompt"].strip() == "Hello world"
    chat = httpx.post(url + "/tokenize", json={"messages": CHAT}).json()
    assert chat["count"] > body["count"]
    info = httpx.get(url + "/tokenizer_info").json()
    assert info["eos_token"] and info["chat_template"]
    assert_error(httpx.post(url + "/detokenize", json={"tokens": [-5]}), 400, "tokens")


# ---- concurrency, cancellation, metrics ----
def test_64_concurrent_streams(client, aclient_factory):
    expected = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8,
                                         temperature=0).choices[0].text

    async def one(ac: openai.AsyncOpenAI) -> tuple[str, str | None]:
        stream = await ac.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8,
                                             temperature=0, stream=True)
        text, reason = "", None
        async for ch in stream:
            text += ch.choices[0].text
            reason = ch.choices[0].finish_reason or reason
        return text, reason

    async def main():
        ac = aclient_factory()
        async with ac:
            return await asyncio.gather(*[one(ac) for _ in range(64)])

    results = asyncio.run(main())
    assert len(results) == 64
    assert all(r == (expected, "length") for r in results)


def test_cancellation_frees_everything(server, client, aclient_factory):
    async def start_and_drop(ac: openai.AsyncOpenAI) -> None:
        stream = None
        try:
            async with asyncio.timeout(0.5):
                stream = await ac.completions.create(
                    model=MODEL, prompt=PROMPT, max_tokens=2000, temperature=0.7, stream=True,
                    extra_body={"ignore_eos": True},
                )
                async for _ in stream:
                    pass
        except TimeoutError:
            pass
        if stream is not None:
            await stream.close()

    async def main():
        ac = aclient_factory()
        async with ac:
            await asyncio.gather(*[start_and_drop(ac) for _ in range(100)])

    asyncio.run(main())
    t0 = time.monotonic()
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0)
    assert r.choices[0].text
    running = kv = None
    while time.monotonic() - t0 < 5.0:
        text = httpx.get(server.url + "/metrics").text
        running = metric(text, "pagedllm:num_requests_running", model_name=MODEL)
        kv = metric(text, "pagedllm:kv_cache_usage_perc", model_name=MODEL)
        if running == 0 and kv == 0:
            break
        time.sleep(0.2)
    assert time.monotonic() - t0 < 5.0, (running, kv)
    assert running == 0 and kv == 0


def test_non_streaming_disconnect_aborts(server):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", timeout=1.0,
                   json={"prompt": PROMPT, "max_tokens": 4000, "ignore_eos": True})
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        text = httpx.get(server.url + "/metrics").text
        if metric(text, "pagedllm:num_requests_running", model_name=MODEL) == 0:
            break
        time.sleep(0.2)
    assert metric(httpx.get(server.url + "/metrics").text, "pagedllm:num_requests_running",
                  model_name=MODEL) == 0


def test_metrics_names(server, client):
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    text = httpx.get(server.url + "/metrics").text
    for name in [
        "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
        "prompt_tokens_total", "generation_tokens_total", "prefix_cache_queries_total",
        "prefix_cache_hits_total", "num_preemptions_total",
    ]:
        metric(text, f"pagedllm:{name}", model_name=MODEL)
    assert metric(text, "pagedllm:request_success_total", model_name=MODEL,
                  finished_reason="length") >= 1
    for hist in [
        "time_to_first_token_seconds", "inter_token_latency_seconds",
        "e2e_request_latency_seconds", "request_queue_time_seconds", "request_prompt_tokens",
        "request_generation_tokens", "iteration_tokens_total",
    ]:
        assert metric(text, f"pagedllm:{hist}_count", model_name=MODEL) >= 1, hist
    assert metric(text, "pagedllm:generation_tokens_total", model_name=MODEL) >= 2
