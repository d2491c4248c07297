"""POST /v1/embeddings, and keeping generation and embedding endpoints apart.

`install_embedding_routes(app, config)` adds the route and, on a server whose model runs with
task="embed", a guard answering the generation endpoints with 400 (a generation server answers
/v1/embeddings with 400 from the handler itself).

Inputs: a string, a list of strings, a list of token ids, or a list of token-id lists; each is
one pooling request, all submitted at once so the scheduler batches them. Response items keep
input order. `encoding_format="base64"` is the little-endian float32 bytes of the vector, as
OpenAI sends it. `truncate_prompt_tokens` (vLLM): text keeps its first k tokens (special tokens
included, the tokenizer's truncation), token ids keep their last k; -1 means max_model_len.
Without it, an input over max_model_len is a 400.
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field

from pagedllm.config import EngineConfig
from pagedllm.entrypoints.openai.errors import APIError, error_response
from pagedllm.entrypoints.openai.protocol import OpenAIBaseModel
from pagedllm.entrypoints.openai.serving_engine import OpenAIServing
from pagedllm.entrypoints.openai.streaming import run_until_disconnected
from pagedllm.outputs import EmbeddingRequestOutput

GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


class EmbeddingRequest(OpenAIBaseModel):
    """OpenAI's embeddings request plus vLLM's extras (truncate_prompt_tokens,
    add_special_tokens, request_id)."""

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)
    add_special_tokens: bool = True
    request_id: str | None = None


def normalize_inputs(value: str | list) -> list[str | list[int]]:
    """One entry per embedding: a text or a token-id list; APIError for empty input."""
    if isinstance(value, str):
        return [value]
    if not value:
        raise APIError("input: must not be empty", 400, param="input")
    if all(isinstance(v, int) for v in value):
        return [list(value)]
    if any(isinstance(v, list) and not v for v in value):
        raise APIError("input: token-id lists must not be empty", 400, param="input")
    return list(value)


def encode_embedding(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


class OpenAIServingEmbedding(OpenAIServing):
    def _truncate_len(self, value: int | None) -> int | None:
        if value is None:
            return None
        limit = self.engine.max_model_len
        if value == -1:
            return limit
        if value == 0:
            raise APIError("truncate_prompt_tokens: must be -1 or at least 1", 400,
                           param="truncate_prompt_tokens")
        if value > limit:
            raise APIError(
                f"truncate_prompt_tokens value ({value}) is greater than max_model_len "
                f"({limit}). Please select a smaller truncation size.",
                400, param="truncate_prompt_tokens",
            )
        return value

    def _tokenize(self, item: str | list[int], add_special: bool, truncate: int | None) -> list[int]:
        if isinstance(item, list):
            return item[-truncate:] if truncate is not None else item
        if truncate is None:
            return self.tokenizer.encode(item, add_special_tokens=add_special)
        return self.tokenizer(
            item, add_special_tokens=add_special, truncation=True, max_length=truncate
        )["input_ids"]

    def _check_length(self, num_tokens: int) -> None:
        limit = self.engine.max_model_len
        if num_tokens > limit:
            raise APIError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{num_tokens} tokens in the input for embedding generation. Please reduce the "
                "length of the input, or set truncate_prompt_tokens.",
                400, param="input", code="context_length_exceeded",
            )

    async def create(self, req: EmbeddingRequest, raw: Request) -> Response:
        try:
            model = self.check_request(req.model)
            if self.engine.model_config.task != "embed":
                raise APIError(
                    f"The model `{model}` does not support embeddings: it is served for text "
                    "generation. Serve an embedding model (encoder models are detected; use "
                    "--task embed for a decoder) to use /v1/embeddings.",
                    400, param="model",
                )
            if req.dimensions is not None:
                raise APIError(
                    "dimensions: this model does not support matryoshka representation; "
                    "changing the output dimensions is not supported",
                    400, param="dimensions",
                )
            truncate = self._truncate_len(req.truncate_prompt_tokens)
            prompts = [self._tokenize(item, req.add_special_tokens, truncate)
                       for item in normalize_inputs(req.input)]
            for ids in prompts:
                self._check_length(len(ids))
            request_id = req.request_id or self.new_id("embd")
            rank = self.data_parallel_rank(raw)
            outputs = await run_until_disconnected(raw, self._run(request_id, prompts, rank))
            return JSONResponse(self.response(model, request_id, outputs, req.encoding_format))
        except Exception as e:
            return self.error_response(e)

    async def _run(self, request_id: str, prompts: list[list[int]],
                   rank: int | None = None) -> list[EmbeddingRequestOutput]:
        """All inputs in flight at once; the first failure cancels (aborts) the rest."""
        tasks = [
            asyncio.ensure_future(self.engine.encode(
                {"prompt_token_ids": ids}, request_id if len(prompts) == 1 else f"{request_id}-{i}",
                add_special_tokens=False, data_parallel_rank=rank,
            ))
            for i, ids in enumerate(prompts)
        ]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    @staticmethod
    def response(model: str, request_id: str, outputs: list[EmbeddingRequestOutput],
                 encoding_format: str) -> dict:
        num_tokens = sum(len(o.prompt_token_ids) for o in outputs)
        return {
            "id": request_id,
            "object": "list",
            "created": int(time.time()),
            "model": model,
            "data": [
                {"index": i, "object": "embedding",
                 "embedding": encode_embedding(o.outputs.embedding, encoding_format)}
                for i, o in enumerate(outputs)
            ],
            "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens,
                      "completion_tokens": 0},
        }


class GenerationGuard:
    """Pure ASGI middleware for an embedding server: generation endpoints answer 400."""

    def __init__(self, app, model_name: str) -> None:
        self.app = app
        self.model_name = model_name

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] in GENERATION_PATHS:
            response = error_response(
                f"The model `{self.model_name}` is an embedding model (task 'embed') and does "
                f"not support {scope['path']}; use /v1/embeddings.",
                400, param="model",
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def install_embedding_routes(app: FastAPI, config: EngineConfig) -> None:
    """Adds POST /v1/embeddings, and the generation guard when the model embeds."""

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
        state = request.app.state
        serving = getattr(state, "embedding", None)
        if serving is None:
            serving = state.embedding = OpenAIServingEmbedding(state.engine, state.server_config)
        return await serving.create(body, request)

    if config.model_config.task == "embed":
        app.add_middleware(GenerationGuard, model_name=config.model_config.name)
