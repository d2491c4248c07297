"""The OpenAI-compatible HTTP server: FastAPI app, routes, auth, lifespan, uvicorn runner.

Run: `python -m pagedllm.entrypoints.openai.api_server --model M [flags]` or `pagedllm serve`.
The engine core runs in its own process (AsyncLLM); this process validates, tokenizes,
detokenizes and streams. SIGTERM drains in-flight requests for up to `--shutdown-timeout`
seconds (default 30), then stops the engine process.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import sys
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

import pagedllm
from pagedllm.config import EngineConfig
from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.entrypoints.openai import cli_args
from pagedllm.entrypoints.openai.body_limit import BodySizeLimitMiddleware
from pagedllm.entrypoints.openai.dashboard import DashboardStats, install_dashboard_routes
from pagedllm.entrypoints.openai.errors import (
    APIError,
    error_body,
    error_response,
    install_error_handlers,
)
from pagedllm.entrypoints.openai.generation_config import load_sampling_defaults
from pagedllm.entrypoints.openai.metrics import (
    PROMETHEUS_CONTENT_TYPE,
    LoggingStatLogger,
    PrometheusStatLogger,
)
from pagedllm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from pagedllm.entrypoints.openai.serving_chat import OpenAIServingChat
from pagedllm.entrypoints.openai.serving_completion import OpenAIServingCompletion
from pagedllm.entrypoints.openai.serving_engine import ServerConfig
from pagedllm.entrypoints.openai.serving_models import OpenAIServingModels
from pagedllm.entrypoints.openai.serving_tokenization import OpenAIServingTokenization

logger = logging.getLogger("pagedllm.api_server")

STATS_LOG_INTERVAL_S = 10.0
# Reachable without the API key (vLLM guards only /v1/*; we deny by default). The dashboard
# page holds no data: it asks for the key and sends it with /dashboard/stats.
PUBLIC_PATHS = frozenset({"/health", "/ping", "/version", "/dashboard"})


class APIKeyMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware): keeps streaming and disconnect detection intact."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                given = value
                break
        if hmac.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        message = "Incorrect API key provided." if given else "Missing API key: send Authorization: Bearer KEY."
        response = JSONResponse(
            error_body(message, "invalid_request_error", None, "invalid_api_key"), status_code=401
        )
        await response(scope, receive, send)


def build_app(
    config: EngineConfig,
    server_config: ServerConfig,
    api_key: str | None = None,
    log_stats: bool = True,
    log_level: str = "INFO",
    max_request_body_bytes: int | None = None,
) -> FastAPI:
    model_name = server_config.served_model_names[0]
    num_engines = config.parallel_config.data_parallel_size
    prometheus = PrometheusStatLogger(model_name, config.model_config.max_model_len, num_engines)
    log_stats_logger = LoggingStatLogger(num_engines)
    dashboard_stats = DashboardStats(num_engines)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine = AsyncLLM(config, stat_loggers=[prometheus, log_stats_logger, dashboard_stats], log_level=log_level)
        await engine.start()
        state = app.state
        state.engine = engine
        state.models = OpenAIServingModels(
            server_config.served_model_names, config.model_config.model, engine.max_model_len,
            quantization=config.model_config.quantization,
            kv_cache_dtype=config.cache_config.kv_cache_dtype,
        )
        prometheus.set_config_info(config, engine.num_blocks)
        state.chat = OpenAIServingChat(engine, server_config)
        state.completion = OpenAIServingCompletion(engine, server_config)
        state.tokenization = OpenAIServingTokenization(engine, server_config)
        stats_task = asyncio.create_task(_log_stats_forever(log_stats_logger)) if log_stats else None
        try:
            yield
        finally:
            if stats_task is not None:
                stats_task.cancel()
            await engine.shutdown_async()
            logger.info("engine core stopped")

    app = FastAPI(title="pagedllm", version=pagedllm.__version__, lifespan=lifespan)
    app.state.prometheus = prometheus
    app.state.server_config = server_config
    install_error_handlers(app)
    _add_routes(app)
    from pagedllm.entrypoints.openai.serving_embedding import install_embedding_routes

    install_embedding_routes(app, config)
    install_dashboard_routes(app, dashboard_stats)
    if max_request_body_bytes is not None:
        app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_request_body_bytes)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    return app


async def _log_stats_forever(stat_logger: LoggingStatLogger) -> None:
    while True:
        await asyncio.sleep(STATS_LOG_INTERVAL_S)
        stat_logger.maybe_log()


def _add_routes(app: FastAPI) -> None:
    def health_response(request: Request) -> Response:
        engine: AsyncLLM = request.app.state.engine
        if engine.is_healthy:
            return Response(status_code=200)
        return error_response(f"The engine is not running: {engine.dead_error or 'exited'}", 503)

    @app.get("/health")
    async def health(request: Request) -> Response:
        return health_response(request)

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping(request: Request) -> Response:
        return health_response(request)

    @app.get("/version")
    async def version() -> dict:
        return {"version": pagedllm.__version__}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        return request.app.state.models.list_models()

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict:
        return request.app.state.models.get_model(model_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await request.app.state.chat.create(body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await request.app.state.completion.create(body, request)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, request: Request) -> dict:
        try:
            return request.app.state.tokenization.tokenize(body)
        except ValueError as e:
            raise APIError(str(e), 400) from e

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
        return request.app.state.tokenization.detokenize(body)

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request) -> dict:
        return request.app.state.tokenization.tokenizer_info()

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(request.app.state.prometheus.render(), media_type=PROMETHEUS_CONTENT_TYPE)


def _setup_logging() -> None:
    from pagedllm import envs

    logging.basicConfig(
        level=envs.logging_level(),
        format="%(levelname)s %(asctime)s %(name)s: %(message)s",
    )


def run_server(args: argparse.Namespace) -> int:
    """Validates flags, builds the engine config, serves until SIGINT/SIGTERM. Returns an exit code."""
    import uvicorn

    _setup_logging()
    try:
        cli_args.validate_args(args)
        engine_args = cli_args.engine_args_from_cli(args)
        config = engine_args.create_engine_config()
        chat_template = cli_args.load_chat_template(args.chat_template)
        sampling_defaults = load_sampling_defaults(
            args.generation_config, config.model_config.model_path
        )
    except (ValueError, NotImplementedError, OSError) as e:
        print(f"pagedllm serve: error: {e}", file=sys.stderr)
        return 2
    server_config = ServerConfig(
        served_model_names=list(config.model_config.served_model_name),
        chat_template=chat_template,
        trust_request_chat_template=args.trust_request_chat_template,
        disable_log_requests=args.disable_log_requests,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        tool_call_parser=args.tool_call_parser,
        exclude_tools_when_tool_choice_none=args.exclude_tools_when_tool_choice_none,
        reasoning_parser=args.reasoning_parser,
        limits=cli_args.request_limits_from_args(args),
        default_sampling=sampling_defaults,
    )
    app = build_app(
        config, server_config, api_key=cli_args.api_key_from_args(args),
        log_stats=not args.disable_log_stats,
        max_request_body_bytes=int(args.max_request_body_mb * 2**20),
    )
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    uv_config = uvicorn.Config(
        app, host=args.host, port=args.port, loop=loop,
        log_level=args.uvicorn_log_level, access_log=not args.disable_uvicorn_access_log,
        timeout_graceful_shutdown=args.shutdown_timeout, timeout_keep_alive=5,
    )
    server = uvicorn.Server(uv_config)
    logger.info("starting pagedllm %s API server for %s on http://%s:%d",
                pagedllm.__version__, server_config.served_model_names[0], args.host, args.port)
    try:
        server.run()
    except SystemExit as e:  # uvicorn exits 3 when the lifespan start-up failed
        return int(e.code or 0)
    if not server.started:
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = cli_args.make_arg_parser()
    args = parser.parse_args(argv)
    return run_server(args)


if __name__ == "__main__":
    sys.exit(main())
