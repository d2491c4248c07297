"""The `pagedllm` command: `pagedllm serve [MODEL] [flags]`, `bench`, `chat`, `complete`,
`collect-env` (more subcommands register here).

Each subcommand module exposes `register_subcommand(subparsers)` that adds its parser and sets
`func` (called with the parsed args, returns an exit code).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import pagedllm


def _register_serve(subparsers) -> None:
    from pagedllm.entrypoints.openai.cli_args import add_server_args

    parser = subparsers.add_parser(
        "serve", help="start the OpenAI-compatible API server",
        description="Start the OpenAI-compatible API server (vLLM's flags).",
    )
    add_server_args(parser, model_positional=True)
    parser.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from pagedllm.entrypoints.openai.api_server import run_server

    return run_server(args)


# Add a module's register function here to add a subcommand (e.g. bench).
SUBCOMMANDS: list[Callable] = [
    _register_serve,
    __import__("pagedllm.entrypoints.bench").entrypoints.bench.register_subcommand,
    __import__("pagedllm.entrypoints.cli_client").entrypoints.cli_client.register_subcommand,
    __import__("pagedllm.entrypoints.collect_env").entrypoints.collect_env.register_subcommand,
]


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedllm", description="pagedllm LLM inference engine")
    parser.add_argument("--version", action="version", version=f"pagedllm {pagedllm.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in SUBCOMMANDS:
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
