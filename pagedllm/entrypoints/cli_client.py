"""`pagedllm chat` and `pagedllm complete`: interactive clients of a running server (vLLM's).

Both talk to the OpenAI API of `--url` (default http://localhost:8000/v1) with the standard
library only, stream the answer to stdout as it arrives, and end on EOF (Ctrl-D) or, with
`--quick TEXT`, after one answer. `chat` keeps the conversation (and `--system-prompt`) across
turns. The model defaults to the first one `/v1/models` lists.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import TextIO

DEFAULT_URL = "http://localhost:8000/v1"
TIMEOUT_S = 600.0


class ClientError(Exception):
    """The server answered with an error or could not be reached."""


class APIClient:
    def __init__(self, url: str, api_key: str | None) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key

    def _request(self, path: str, body: dict | None = None):
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers=headers)
        try:
            return urllib.request.urlopen(req, timeout=TIMEOUT_S)
        except urllib.error.HTTPError as e:
            raise ClientError(f"{e.code} from {self.url + path}: {_error_message(e)}") from None
        except urllib.error.URLError as e:
            raise ClientError(f"cannot reach {self.url + path}: {e.reason}") from None

    def first_model(self) -> str:
        with self._request("/models") as resp:
            models = json.load(resp).get("data") or []
        if not models:
            raise ClientError(f"{self.url}/models lists no model")
        return models[0]["id"]

    def stream(self, path: str, body: dict) -> Iterator[dict]:
        """The `data:` events of a streamed answer, parsed, until `[DONE]`."""
        with self._request(path, {**body, "stream": True}) as resp:
            for raw in resp:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                payload = line[len("data:"):].strip()
                if payload == "[DONE]":
                    return
                event = json.loads(payload)
                if "error" in event:
                    raise ClientError(event["error"].get("message", str(event["error"])))
                yield event


def _error_message(e: urllib.error.HTTPError) -> str:
    try:
        return json.loads(e.read())["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return e.reason


def add_client_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=DEFAULT_URL,
                        help="the server's OpenAI API base (default %(default)s)")
    parser.add_argument("--model-name", default=None,
                        help="model to use (default: the first one /v1/models lists)")
    parser.add_argument("--api-key", default=None,
                        help="API key (default: env OPENAI_API_KEY, then PAGEDLLM_API_KEY)")
    parser.add_argument("--max-tokens", type=int, default=None, help="per answer")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("-q", "--quick", default=None, metavar="TEXT",
                        help="send TEXT, print the answer and exit")


def _sampling(args: argparse.Namespace) -> dict:
    out = {}
    if args.max_tokens is not None:
        out["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        out["temperature"] = args.temperature
    return out


def _connect(args: argparse.Namespace) -> tuple[APIClient, str]:
    key = args.api_key or os.environ.get("OPENAI_API_KEY") or os.environ.get("PAGEDLLM_API_KEY")
    client = APIClient(args.url, key)
    return client, args.model_name or client.first_model()


def _inputs(args: argparse.Namespace, stdin: TextIO, prompt: str) -> Iterator[str]:
    if args.quick is not None:
        yield args.quick
        return
    interactive = stdin.isatty()
    while True:
        if interactive:
            print(prompt, end="", flush=True)
        line = stdin.readline()
        if not line:
            return
        line = line.rstrip("\n")
        if line:
            yield line


def run_chat(args: argparse.Namespace, stdin: TextIO | None = None,
             out: TextIO | None = None) -> int:
    stdin, out = stdin or sys.stdin, out or sys.stdout
    client, model = _connect(args)
    messages: list[dict] = []
    if args.system_prompt:
        messages.append({"role": "system", "content": args.system_prompt})
    for text in _inputs(args, stdin, "> "):
        messages.append({"role": "user", "content": text})
        reply = []
        body = {"model": model, "messages": messages, **_sampling(args)}
        for event in client.stream("/chat/completions", body):
            for choice in event.get("choices", ()):
                piece = (choice.get("delta") or {}).get("content") or ""
                reply.append(piece)
                out.write(piece)
                out.flush()
        out.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
    return 0


def run_complete(args: argparse.Namespace, stdin: TextIO | None = None,
                 out: TextIO | None = None) -> int:
    stdin, out = stdin or sys.stdin, out or sys.stdout
    client, model = _connect(args)
    for text in _inputs(args, stdin, "> "):
        body = {"model": model, "prompt": text, **_sampling(args)}
        for event in client.stream("/completions", body):
            for choice in event.get("choices", ()):
                out.write(choice.get("text") or "")
                out.flush()
        out.write("\n")
    return 0


def _guarded(run):
    def func(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except ClientError as e:
            print(f"pagedllm {args.command}: error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
    return func


def register_subcommand(subparsers) -> None:
    chat = subparsers.add_parser("chat", help="chat with a running server",
                                 description="Interactive chat with a running pagedllm server.")
    add_client_args(chat)
    chat.add_argument("--system-prompt", default=None, help="a system message first")
    chat.set_defaults(func=_guarded(run_chat))
    complete = subparsers.add_parser(
        "complete", help="text completion with a running server",
        description="Interactive text completion with a running pagedllm server.")
    add_client_args(complete)
    complete.set_defaults(func=_guarded(run_complete))
