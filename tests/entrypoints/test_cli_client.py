"""`pagedllm chat`, `pagedllm complete` against the shared live server; `collect-env`."""

from __future__ import annotations

import argparse
import io

import httpx
import torch

from pagedllm.entrypoints import cli
from pagedllm.entrypoints.cli_client import run_chat, run_complete

GREEDY = ["--temperature", "0", "--max-tokens", "8"]


def api_chat(server, messages: list[dict]) -> str:
    r = httpx.post(server.url + "/v1/chat/completions", timeout=120,
                   json={"messages": messages, "temperature": 0, "max_tokens": 8})
    return r.json()["choices"][0]["message"]["content"]


def api_complete(server, prompt: str) -> str:
    r = httpx.post(server.url + "/v1/completions", timeout=120,
                   json={"prompt": prompt, "temperature": 0, "max_tokens": 8})
    return r.json()["choices"][0]["text"]


def client_args(server, **kw) -> argparse.Namespace:
    base = dict(url=server.url + "/v1", model_name=None, api_key=None, max_tokens=8,
                temperature=0.0, quick=None, system_prompt=None)
    return argparse.Namespace(**{**base, **kw})


def test_chat_quick_prints_the_servers_answer(server, capsys):
    assert cli.main(["chat", "--url", server.url + "/v1", "--quick", "Name a colour.",
                     *GREEDY]) == 0
    expected = api_chat(server, [{"role": "user", "content": "Name a colour."}])
    assert expected and capsys.readouterr().out == expected + "\n"


def test_chat_interactive_keeps_the_conversation(server):
    out = io.StringIO()
    args = client_args(server, system_prompt="You are terse.", model_name="alias-smol")
    assert run_chat(args, io.StringIO("Hi there.\n\nName a fruit.\n"), out) == 0
    first, second = out.getvalue().rstrip("\n").split("\n")[-2:]
    history = [{"role": "system", "content": "You are terse."},
               {"role": "user", "content": "Hi there."}]
    assert api_chat(server, history) == first
    history += [{"role": "assistant", "content": first},
                {"role": "user", "content": "Name a fruit."}]
    assert api_chat(server, history) == second


def test_complete_interactive_and_quick(server, capsys):
    out = io.StringIO()
    assert run_complete(client_args(server), io.StringIO("The sky is\nOne, two,\n"), out) == 0
    assert out.getvalue() == (api_complete(server, "The sky is") + "\n"
                              + api_complete(server, "One, two,") + "\n")
    assert cli.main(["complete", "--url", server.url + "/v1", "-q", "The sky is",
                     "--model-name", "smol", *GREEDY]) == 0
    assert capsys.readouterr().out == api_complete(server, "The sky is") + "\n"


def test_client_errors_are_messages_not_tracebacks(server, capsys):
    assert cli.main(["chat", "--url", server.url + "/v1", "--model-name", "nope",
                     "--quick", "hi"]) == 1
    err = capsys.readouterr().err
    assert "404" in err and "The model `nope` does not exist." in err
    assert cli.main(["complete", "--url", "http://127.0.0.1:9/v1", "-q", "hi"]) == 1
    assert "cannot reach" in capsys.readouterr().err


def test_collect_env_lists_versions_and_hides_secrets(monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_supersecret")
    monkeypatch.setenv("PAGEDLLM_CPU_KVCACHE_SPACE", "3")
    assert cli.main(["collect-env"]) == 0
    out = capsys.readouterr().out
    assert f"torch: {torch.__version__}" in out
    assert f"CUDA available: {torch.cuda.is_available()}" in out
    assert "PAGEDLLM_CPU_KVCACHE_SPACE: 3" in out
    assert "HF_TOKEN: ***" in out and "hf_supersecret" not in out
