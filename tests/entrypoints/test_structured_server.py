"""Structured outputs and tool calling through a live server and the real `openai` SDK
(issue #14). The grammar, not the 135M model, makes the outputs valid. The server is the
session one (tests/entrypoints/conftest.py), started with --enable-auto-tool-choice."""

from __future__ import annotations

import json
import re
from typing import Annotated

import httpx
import openai
import pydantic
import pytest

MODEL = "smol"
ASK = [{"role": "user", "content": "Describe a person called Ann, aged 31, as JSON."}]

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}}
PING = {"type": "function", "function": {"name": "ping", "description": "No arguments"}}


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=16)
    age: int = pydantic.Field(ge=0, le=150)
    tags: list[Annotated[str, pydantic.Field(max_length=8)]] = pydantic.Field(max_length=2)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=300)


def test_parse_with_pydantic_model(client):
    completion = client.chat.completions.parse(
        model=MODEL, messages=ASK, response_format=Person, max_tokens=80, temperature=0)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    person = choice.message.parsed
    assert isinstance(person, Person)
    assert Person.model_validate_json(choice.message.content) == person
    # Compact separators: no whitespace outside strings (nothing to loop on).
    assert not re.search(r'[:,]\s', re.sub(r'"(?:[^"\\]|\\.)*"', '""', choice.message.content))


def test_streamed_json_schema_and_n3_high_temperature(client):
    rf = {"type": "json_schema", "json_schema": {
        "name": "person", "schema": Person.model_json_schema(), "strict": True}}
    stream = client.chat.completions.create(
        model=MODEL, messages=ASK, response_format=rf, max_tokens=80, temperature=0, stream=True)
    parts, finish = [], None
    for chunk in stream:
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert finish == "stop" and len([p for p in parts if p]) > 3
    Person.model_validate_json("".join(parts))
    many = client.chat.completions.create(model=MODEL, messages=ASK, response_format=rf,
                                          max_tokens=150, temperature=1.5, n=3, seed=7)
    texts = [c.message.content for c in many.choices]
    assert [c.finish_reason for c in many.choices] == ["stop"] * 3
    for t in texts:
        Person.model_validate_json(t)
    assert len(set(texts)) > 1  # really sampled, still valid


def test_choice_regex_json_object_and_completions(client):
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Is the sea wet?"}], max_tokens=8,
        temperature=1.0, n=3, extra_body={"structured_outputs": {"choice": ["yes", "no", "maybe so"]}})
    assert all(c.message.content in ("yes", "no", "maybe so") for c in out.choices)
    comp = client.completions.create(model=MODEL, prompt="My phone number is", max_tokens=20,
                                     temperature=1.0,
                                     extra_body={"structured_outputs": {"regex": r"\d{3}-\d{4}"}})
    assert re.fullmatch(r"\d{3}-\d{4}", comp.choices[0].text)
    assert comp.choices[0].finish_reason == "stop"
    obj = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=60, temperature=0,
                                         response_format={"type": "json_object"})
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    else:  # cut at max_tokens: still a prefix of one compact object
        assert obj.choices[0].message.content.startswith("{")


def _assemble(stream) -> tuple[dict[int, dict], str | None]:
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for tc in c.delta.tool_calls or []:
                if tc.index not in calls:
                    assert tc.id and tc.type == "function" and tc.function.name
                    calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
                else:
                    assert tc.id is None and not tc.function.name
                calls[tc.index]["arguments"] += tc.function.arguments or ""
    return calls, finish


def test_required_and_named_tool_calls(client):
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    out = client.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER, PING],
                                         tool_choice="required", max_tokens=60, temperature=0)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        args = json.loads(call.function.arguments)
        if call.function.name == "get_weather":
            assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit")
        else:
            assert call.function.name == "ping" and args == {}
    named = client.chat.completions.create(
        model=MODEL, messages=msgs, tools=[WEATHER, PING], max_tokens=60, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = named.choices[0].message.tool_calls[0]
    assert named.choices[0].finish_reason == "stop" and call.function.name == "get_weather"
    assert set(json.loads(call.function.arguments)) == {"city", "unit"}
    # An empty-argument call survives (named, streamed).
    calls, _ = _assemble(client.chat.completions.create(
        model=MODEL, messages=msgs, tools=[WEATHER, PING], max_tokens=10, temperature=0,
        stream=True, tool_choice={"type": "function", "function": {"name": "ping"}}))
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [("ping", {})]


def test_streamed_required_tool_calls_assemble(client):
    msgs = [{"role": "user", "content": "Weather in Rome and in Oslo?"}]
    stream = client.chat.completions.create(
        model=MODEL, messages=msgs, tools=[WEATHER], tool_choice="required", max_tokens=150,
        temperature=0.8, seed=3, stream=True)
    calls, finish = _assemble(stream)
    assert finish == "tool_calls" and calls
    for c in calls.values():
        assert c["name"] == "get_weather"
        assert set(json.loads(c["arguments"])) == {"city", "unit"}
    whole = client.chat.completions.create(
        model=MODEL, messages=msgs, tools=[WEATHER], tool_choice="required", max_tokens=150,
        temperature=0.8, seed=3)
    assert [(c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls] \
        == [(c["name"], c["arguments"]) for c in calls.values()]


def test_tool_history_and_auto_choice(client):
    msgs = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Paris","unit":"celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees and sunny"},
    ]
    out = client.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER],
                                         tool_choice="auto", max_tokens=30, temperature=0)
    choice = out.choices[0]
    # hermes on a model that answers in prose: plain content, no calls, finish "stop"/"length".
    assert choice.message.content and choice.finish_reason in ("stop", "length")
    assert not choice.message.tool_calls


def test_constrained_and_unconstrained_in_one_batch(client):
    import concurrent.futures as cf

    plain = {"model": MODEL, "messages": [{"role": "user", "content": "Name three rivers."}],
             "max_tokens": 24, "temperature": 0}
    alone = client.chat.completions.create(**plain).choices[0].message.content
    with cf.ThreadPoolExecutor(6) as pool:
        constrained = [pool.submit(client.chat.completions.parse, model=MODEL, messages=ASK,
                                   response_format=Person, max_tokens=80, temperature=0)
                       for _ in range(4)]
        mixed = [pool.submit(client.chat.completions.create, **plain) for _ in range(2)]
        assert all(f.result().choices[0].message.content == alone for f in mixed)
        assert all(isinstance(f.result().choices[0].message.parsed, Person) for f in constrained)


def _err(resp: httpx.Response, param: str) -> str:
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == param, err
    return err["message"]


def test_bad_requests_are_400_naming_the_field(server):
    chat = server.url + "/v1/chat/completions"
    base = {"model": MODEL, "messages": ASK, "max_tokens": 4}
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}
    assert "schema" in _err(httpx.post(chat, json={**base, "response_format": bad_schema}),
                            "response_format.json_schema.schema")
    _err(httpx.post(chat, json={**base, "structured_outputs": {"regex": "a(b"}}),
         "structured_outputs.regex")
    _err(httpx.post(chat, json={**base, "structured_outputs": {"grammar": "root ::= foo"}}),
         "structured_outputs.grammar")
    msg = _err(httpx.post(chat, json={**base, "structured_outputs": {"regex": "a", "choice": ["b"]}}),
               "structured_outputs")
    assert "regex and choice" in msg
    msg = _err(httpx.post(chat, json={**base, "response_format": {"type": "json_object"},
                                      "structured_outputs": {"regex": "a"}}), "response_format")
    assert "response_format and structured_outputs" in msg
    assert "removed" in _err(httpx.post(chat, json={**base, "guided_json": {"type": "object"}}),
                             "guided_json")
    _err(httpx.post(chat, json={**base, "guided_choice": ["a"]}), "guided_choice")
    tool = {"tools": [WEATHER]}
    assert "not in tools" in _err(httpx.post(chat, json={
        **base, **tool, "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
        "tool_choice")
    assert "requires tools" in _err(httpx.post(chat, json={**base, "tool_choice": "required"}),
                                    "tool_choice")
    _err(httpx.post(chat, json={**base, **tool, "tool_choice": "required",
                                "response_format": {"type": "json_object"}}), "response_format")
    comp = server.url + "/v1/completions"
    _err(httpx.post(comp, json={"prompt": "hi", "guided_regex": "a"}), "guided_regex")
    _err(httpx.post(comp, json={"prompt": "hi", "response_format": {"type": "json_schema"}}),
         "response_format.json_schema")


def test_bench_serve_sends_structured_requests(server, tmp_path):
    from pagedllm.entrypoints.cli import main as cli_main

    out = tmp_path / "result.json"
    n = 4
    rc = cli_main(["bench", "serve", "--base-url", server.url, "--result-file", str(out),
                   "--disable-tqdm", "--dataset", "random", "--num-prompts", str(n),
                   "--random-input-len", "16", "--random-output-len", "30",
                   "--structured-outputs", "choice"])
    res = json.loads(out.read_text())
    assert rc == 0 and (res["completed"], res["failed"]) == (n, 0)
    # Every answer is one of three short words: the grammar ended each request early.
    assert res["total_output_tokens"] <= n * 4 and res["output_len_mismatches"] == n
