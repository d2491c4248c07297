"""Command-line flags of `pagedllm serve` / `python -m pagedllm.entrypoints.openai.api_server`.

Names, defaults and meaning follow vLLM. A flag we accept but cannot honour yet fails at
start-up (`validate_args` or EngineArgs.create_engine_config), never silently.
"""

from __future__ import annotations

import argparse
import os

from pagedllm import envs
from pagedllm.config import (
    DATA_PARALLEL_BACKENDS,
    DISTRIBUTED_EXECUTOR_BACKENDS,
    SCHEDULING_POLICIES,
)
from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.entrypoints.openai import limits


def add_server_args(parser: argparse.ArgumentParser, model_positional: bool = False) -> None:
    """Every flag of `pagedllm serve`: server, engine, parallelism, features, operations."""
    if model_positional:
        parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                            help="model path, .gguf file or name (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--model", default=None, help="model path, .gguf file or name")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model's)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", nargs="+", default=None,
                        help="one or more names the API accepts for the model; the first is reported")
    parser.add_argument("--api-key", default=None,
                        help="require `Authorization: Bearer KEY` (also env PAGEDLLM_API_KEY)")
    add_engine_args(parser)
    add_parallel_args(parser)
    add_feature_args(parser)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--task", default="auto", choices=["auto", "generate", "embed"],
                        help="generate text or embed (default: auto, embed for encoder models)")
    parser.add_argument("--uvicorn-log-level", default="info",
                        choices=["debug", "info", "warning", "error", "critical", "trace"])
    parser.add_argument("--disable-log-requests", action="store_true")
    parser.add_argument("--disable-log-stats", action="store_true")
    parser.add_argument("--disable-uvicorn-access-log", action="store_true")
    add_operations_args(parser)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Model dtype, batch limits and the KV cache."""
    parser.add_argument("--dtype", default="auto",
                        choices=["auto", "float32", "float", "bfloat16", "float16", "half"])
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                        default=True)
    parser.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction,
                        default=True)
    parser.add_argument("--block-size", type=int, default=16, choices=[8, 16, 32, 64, 128])
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--num-gpu-blocks-override", type=int, default=None)
    parser.add_argument("--disable-hybrid-kv-cache-manager", action="store_true",
                        help="one block table for every layer: sliding-window layers keep "
                        "every block of a request instead of freeing those out of the window")


def add_parallel_args(parser: argparse.ArgumentParser) -> None:
    """Tensor, pipeline and data parallelism; quantization and weight loading."""
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    parser.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    parser.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                        help="engine-core replicas behind this server, each a full engine on "
                        "its own tp x pp GPUs; requests go to the least-loaded one")
    parser.add_argument("--distributed-executor-backend", default=None,
                        choices=list(DISTRIBUTED_EXECUTOR_BACKENDS),
                        help="how workers of one engine run: uni (in-process), mp (a process "
                        "per rank, the default for more than one), ray (Ray actors)")
    parser.add_argument("--data-parallel-backend", "-dpb", default="mp",
                        choices=list(DATA_PARALLEL_BACKENDS),
                        help="how replicas run: mp (a process each, on this machine); ray (Ray "
                        "actors placed on the cluster's GPUs)")
    parser.add_argument("--quantization", "-q", default=None)
    parser.add_argument("--load-format", default="auto",
                        choices=["auto", "safetensors", "gguf", "dummy"],
                        help="dummy: random weights made in place (nothing read from disk)")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3"])


def add_feature_args(parser: argparse.ArgumentParser) -> None:
    """Sampling seed, chat templates, logprobs, graphs, scheduling, structured outputs,
    tools and reasoning."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chat-template", default=None,
                        help="a chat template file, or the template itself")
    parser.add_argument("--trust-request-chat-template", action="store_true",
                        help="allow requests to carry their own chat_template")
    parser.add_argument("--max-logprobs", type=int, default=20)
    parser.add_argument("--enforce-eager", action="store_true",
                        help="never capture CUDA graphs (run every step eagerly)")
    parser.add_argument("--scheduling-policy", choices=SCHEDULING_POLICIES, default="fcfs",
                        help="fcfs: arrival order; priority: lowest request `priority` first "
                        "(then arrival), preempting the largest first")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction,
                        default=None,
                        help="schedule step N+1 while the GPU runs step N (default: on with CUDA)")
    parser.add_argument("--structured-outputs-backend", default="auto",
                        choices=["auto", "xgrammar", "guidance"],
                        help="grammar library for structured outputs (auto: xgrammar)")
    parser.add_argument("--enable-auto-tool-choice", action="store_true",
                        help='allow tool_choice "auto" (needs --tool-call-parser)')
    parser.add_argument("--tool-call-parser", default=None,
                        help="how tool calls are read from the output: hermes, llama3_json, "
                        "mistral, pythonic, or one registered by --tool-parser-plugin")
    parser.add_argument("--tool-parser-plugin", default=None,
                        help="a Python file registering tool parsers (@register_tool_parser)")
    parser.add_argument("--exclude-tools-when-tool-choice-none", action="store_true",
                        help='leave tools out of the prompt when tool_choice is "none"')
    parser.add_argument("--reasoning-parser", default=None,
                        help="split reasoning from the answer: deepseek_r1, qwen3")


def add_operations_args(parser: argparse.ArgumentParser) -> None:
    """Request limits, backpressure, shutdown and generation defaults."""
    parser.add_argument("--max-n", type=int, default=limits.DEFAULT_MAX_N,
                        help="largest n (and best_of) a request may ask for (default 128, "
                        "OpenAI's limit); above it a 400")
    parser.add_argument("--max-stop-strings", type=int, default=limits.DEFAULT_MAX_STOP_STRINGS,
                        help="most stop strings per request (default %(default)s)")
    parser.add_argument("--max-logit-bias", type=int, default=limits.DEFAULT_MAX_LOGIT_BIAS,
                        help="most logit_bias entries per request (default %(default)s)")
    parser.add_argument("--max-request-body-mb", type=float,
                        default=limits.DEFAULT_MAX_REQUEST_BODY_MB,
                        help="largest request body in MiB (default %(default)s); above it a 400 (request_too_large)")
    parser.add_argument("--max-waiting-requests", type=int, default=None,
                        help="refuse new requests with a 503 and Retry-After while this many "
                        "are waiting for the engine (default: unbounded)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="seconds SIGTERM waits for in-flight requests before stopping "
                        "(default %(default)s)")
    parser.add_argument("--generation-config", default="auto",
                        help="sampling defaults: auto (the model's generation_config.json), "
                        "vllm (none: pagedllm's own defaults) or a directory holding a "
                        "generation_config.json")


def make_arg_parser(prog: str = "pagedllm.entrypoints.openai.api_server") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="pagedllm OpenAI-compatible server")
    add_server_args(parser)
    return parser


def resolve_model(args: argparse.Namespace) -> str | None:
    tag = getattr(args, "model_tag", None)
    if tag is not None and args.model is not None and tag != args.model:
        raise ValueError(f"model given twice: positional {tag!r} and --model {args.model!r}")
    return tag or args.model


def validate_args(args: argparse.Namespace) -> None:
    """Checks that need no model; raises ValueError/NotImplementedError with a message."""
    if args.quantization is not None:
        from pagedllm.model_executor.layers.quantization import get_quantization_config_cls

        get_quantization_config_cls(args.quantization)  # unknown or unimplemented: refused
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if not 0.0 < args.gpu_memory_utilization <= 1.0:
        raise ValueError("--gpu-memory-utilization must be in (0, 1]")
    if args.max_logprobs < -1:
        raise ValueError("--max-logprobs must be >= -1")
    for flag in ("max_n", "max_stop_strings", "max_logit_bias"):
        if getattr(args, flag) < (1 if flag == "max_n" else 0):
            raise ValueError(f"--{flag.replace('_', '-')} must be >= {1 if flag == 'max_n' else 0}")
    if args.max_request_body_mb <= 0:
        raise ValueError("--max-request-body-mb must be > 0")
    if args.max_waiting_requests is not None and args.max_waiting_requests < 0:
        raise ValueError("--max-waiting-requests must be >= 0")
    if args.shutdown_timeout < 0:
        raise ValueError("--shutdown-timeout must be >= 0")
    validate_tool_and_reasoning_args(args)


def validate_tool_and_reasoning_args(args: argparse.Namespace) -> None:
    """Loads the tool-parser plugin and checks the parser names (ValueError if unknown)."""
    from pagedllm.entrypoints.openai.reasoning_parsers import get_reasoning_parser
    from pagedllm.entrypoints.openai.tool_parsers import get_tool_parser, load_tool_parser_plugin

    if args.tool_parser_plugin:
        if not os.path.isfile(args.tool_parser_plugin):
            raise ValueError(f"--tool-parser-plugin {args.tool_parser_plugin!r}: no such file")
        load_tool_parser_plugin(args.tool_parser_plugin)
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise ValueError("--enable-auto-tool-choice requires --tool-call-parser")
    if args.tool_call_parser:
        get_tool_parser(args.tool_call_parser)
    if args.reasoning_parser:
        get_reasoning_parser(args.reasoning_parser)


def request_limits_from_args(args: argparse.Namespace) -> limits.RequestLimits:
    return limits.RequestLimits(
        max_n=args.max_n, max_stop_strings=args.max_stop_strings,
        max_logit_bias=args.max_logit_bias, max_waiting_requests=args.max_waiting_requests,
    )


def load_chat_template(value: str | None) -> str | None:
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{" not in value:
        raise ValueError(f"--chat-template {value!r} is neither a file nor a jinja template")
    return value


def api_key_from_args(args: argparse.Namespace) -> str | None:
    return args.api_key or envs.api_key()


def engine_args_from_cli(args: argparse.Namespace) -> EngineArgs:
    return EngineArgs(
        model=resolve_model(args),
        tokenizer=args.tokenizer,
        served_model_name=args.served_model_name,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        enable_prefix_caching=args.enable_prefix_caching,
        disable_hybrid_kv_cache_manager=args.disable_hybrid_kv_cache_manager,
        enable_chunked_prefill=args.enable_chunked_prefill,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        seed=args.seed,
        gpu_memory_utilization=args.gpu_memory_utilization,
        num_gpu_blocks_override=args.num_gpu_blocks_override,
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        data_parallel_size=args.data_parallel_size,
        distributed_executor_backend=args.distributed_executor_backend,
        data_parallel_backend=args.data_parallel_backend,
        quantization=args.quantization,
        load_format=args.load_format,
        kv_cache_dtype=args.kv_cache_dtype,
        enforce_eager=args.enforce_eager,
        async_scheduling=args.async_scheduling,
        scheduling_policy=args.scheduling_policy,
        structured_outputs_backend=args.structured_outputs_backend,
        device=args.device,
        max_logprobs=args.max_logprobs,
        trust_remote_code=args.trust_remote_code,
        disable_log_stats=args.disable_log_stats,
        task=args.task,
        usage_context="server",
    )
