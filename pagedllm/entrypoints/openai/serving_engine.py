"""What every generation endpoint shares: model check, engine health, prompt checks, errors.

`OpenAIServing.run_errors(...)` maps engine-side exceptions to the OpenAI error shape:
ValueError -> 400, EngineDeadError -> 503, everything else -> 500.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pagedllm.engine.async_llm import AsyncLLM, EngineDeadError, RequestAbortedError
from pagedllm.entrypoints.openai.errors import APIError, bad_request_from_value_error, error_body
from pagedllm.entrypoints.openai.generation_config import apply_sampling_defaults
from pagedllm.entrypoints.openai.limits import RequestLimits
from pagedllm.entrypoints.openai.streaming import ClientDisconnected, sse
from pagedllm.outputs import Logprob

logger = logging.getLogger(__name__)

# JSON has no -inf; OpenAI clients expect a very negative float.
_MIN_LOGPROB = -9999.0


@dataclass
class ServerConfig:
    """Server-level options that shape request handling."""

    served_model_names: list[str]
    chat_template: str | None = None
    trust_request_chat_template: bool = False
    disable_log_requests: bool = False
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    exclude_tools_when_tool_choice_none: bool = False
    reasoning_parser: str | None = None
    limits: RequestLimits = field(default_factory=RequestLimits)
    # Sampling defaults for fields a request leaves unset (--generation-config).
    default_sampling: dict[str, float | int] = field(default_factory=dict)


class OpenAIServing:
    def __init__(self, engine: AsyncLLM, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.tokenizer = engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.config.served_model_names[0]

    def check_request(self, model: str | None) -> str:
        """Returns the model name to report; 404 for an unknown model, 503 if the engine died."""
        if not self.engine.is_healthy:
            raise APIError(
                f"The engine is not running: {self.engine.dead_error or 'engine core exited'}",
                503,
            )
        if model is None or model == "":
            return self.model_name
        if model not in self.config.served_model_names:
            raise APIError(
                f"The model `{model}` does not exist.", 404, param="model", code="model_not_found"
            )
        return model

    def check_generation_request(self, req) -> str:
        """Model, engine health, unsupported fields and stream_options: the checks every
        generation endpoint runs first. Returns the model name to report."""
        model = self.check_request(req.model)
        self.config.limits.check(req, self.engine)
        apply_sampling_defaults(req, self.config.default_sampling)
        req.check_supported()
        if req.stream_options is not None and not req.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return model

    @classmethod
    def stream_error(cls, e: BaseException) -> bytes:
        """The SSE event that ends a stream which failed after its headers were sent."""
        err = cls.to_api_error(e)
        return sse(error_body(err.message, err.err_type, err.param, err.code))

    @classmethod
    def error_response(cls, e: BaseException) -> Response:
        """The HTTP answer for an exception raised while handling a request: 499 when the
        client went away, otherwise the OpenAI error shape."""
        if isinstance(e, ClientDisconnected):
            return Response(status_code=499)
        err = cls.to_api_error(e)
        return JSONResponse(
            error_body(err.message, err.err_type, err.param, err.code), status_code=err.status,
            headers=err.headers,
        )

    def check_context_length(
        self, num_prompt_tokens: int, max_tokens: int | None, what: str = "prompt"
    ) -> None:
        limit = self.engine.max_model_len
        if max_tokens is None:
            if num_prompt_tokens >= limit:
                raise APIError(
                    f"This model's maximum context length is {limit} tokens. However, your "
                    f"{what} resulted in {num_prompt_tokens} tokens, which leaves no room for "
                    "the completion. Please reduce the length of the input.",
                    400, param="messages" if what == "messages" else "prompt",
                    code="context_length_exceeded",
                )
            return
        total = num_prompt_tokens + max_tokens
        if total > limit:
            raise APIError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{total} tokens ({num_prompt_tokens} in the {what}, {max_tokens} in the "
                "completion). Please reduce the length of the input or completion.",
                400, param="max_tokens", code="context_length_exceeded",
            )

    @staticmethod
    def data_parallel_rank(raw: Request) -> int | None:
        """vLLM's `X-data-parallel-rank` header: pins the request to one data-parallel replica
        (range-checked by the engine); absent: the least-loaded replica."""
        value = raw.headers.get("x-data-parallel-rank")
        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            raise APIError(f"X-data-parallel-rank: must be an integer; got {value!r}", 400,
                           param="X-data-parallel-rank") from None

    def log_request(self, request_id: str, params) -> None:
        if not self.config.disable_log_requests:
            logger.info("Received request %s: n=%d max_tokens=%s temperature=%s", request_id,
                        params.n, params.max_tokens, params.temperature)

    @staticmethod
    def new_id(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex}"

    @staticmethod
    def to_api_error(e: BaseException) -> APIError:
        if isinstance(e, APIError):
            return e
        if isinstance(e, EngineDeadError):
            return APIError(f"The engine is not running: {str(e).splitlines()[0]}", 503)
        if isinstance(e, ValueError):
            return bad_request_from_value_error(e)
        if isinstance(e, RequestAbortedError):
            return APIError(str(e), 500)
        logger.exception("request failed", exc_info=e)
        return APIError(f"Internal server error: {type(e).__name__}: {e}", 500)


# ---- logprob formatting ----
def clamp(lp: float) -> float:
    return max(lp, _MIN_LOGPROB)


def top_entries(position: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    """The top-k entries of one position by rank (the sampled token may sit outside them)."""
    ranked = [(t, lp) for t, lp in position.items() if lp.rank is not None and lp.rank <= k]
    ranked.sort(key=lambda e: e[1].rank)
    return ranked[:k]


def token_str(tokenizer, token_id: int, lp: Logprob | None) -> str:
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return tokenizer.decode([token_id])


def chat_logprobs(tokenizer, token_ids: list[int], logprobs, k: int) -> dict:
    """OpenAI chat format: {"content": [{token, logprob, bytes, top_logprobs}], "refusal"}."""
    content = []
    for tid, pos in zip(token_ids, logprobs):
        lp = pos.get(tid)
        tok = token_str(tokenizer, tid, lp)
        top = []
        for t, e in top_entries(pos, k):
            s = token_str(tokenizer, t, e)
            top.append({"token": s, "logprob": clamp(e.logprob), "bytes": list(s.encode())})
        content.append({
            "token": tok,
            "logprob": clamp(lp.logprob) if lp is not None else _MIN_LOGPROB,
            "bytes": list(tok.encode()),
            "top_logprobs": top,
        })
    return {"content": content, "refusal": None}


def legacy_logprobs(
    tokenizer, token_ids: list[int], logprobs, k: int, initial_offset: int
) -> tuple[dict, int]:
    """Completions format: tokens, token_logprobs, top_logprobs, text_offset; and the next offset.

    `logprobs` entries may be None (the first prompt token has no logprob).
    """
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = initial_offset
    for tid, pos in zip(token_ids, logprobs):
        lp = pos.get(tid) if pos is not None else None
        tok = token_str(tokenizer, tid, lp)
        tokens.append(tok)
        offsets.append(offset)
        offset += len(tok)
        if pos is None:
            token_lps.append(None)
            tops.append(None)
            continue
        token_lps.append(clamp(lp.logprob) if lp is not None else _MIN_LOGPROB)
        top = {token_str(tokenizer, t, e): clamp(e.logprob) for t, e in top_entries(pos, k)}
        if lp is not None and k > 0:
            top.setdefault(tok, clamp(lp.logprob))
        tops.append(top)
    body = {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
            "text_offset": offsets}
    return body, offset


def prompt_logprobs_json(prompt_logprobs) -> list | None:
    """vLLM's `prompt_logprobs` field: per position {token_id: {logprob, rank, decoded_token}}."""
    if prompt_logprobs is None:
        return None
    out: list = []
    for pos in prompt_logprobs:
        if pos is None:
            out.append(None)
            continue
        out.append({
            str(t): {"logprob": clamp(e.logprob), "rank": e.rank, "decoded_token": e.decoded_token}
            for t, e in pos.items()
        })
    return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass(slots=True)
class StreamChunks:
    """The chunks of one streamed response: their envelope (id, object, created, model) and
    the token counts the handler keeps up to date, reported on every chunk under
    `stream_options.continuous_usage_stats` and in a final choice-less chunk under
    `include_usage`."""

    request_id: str
    object_name: str  # the chunks' "object"
    model: str
    include_usage: bool = False
    continuous: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @classmethod
    def for_request(cls, request_id: str, object_name: str, model: str, stream_options: Any
                    ) -> StreamChunks:  # fmt: skip
        include = bool(stream_options and stream_options.include_usage)
        continuous = include and bool(stream_options.continuous_usage_stats)
        return cls(request_id, object_name, model, include, continuous)

    def chunk(self, choices: list) -> bytes:
        c = {"id": self.request_id, "object": self.object_name, "created": self.created,
             "model": self.model, "choices": choices}  # fmt: skip
        if self.continuous:
            c["usage"] = usage(self.prompt_tokens, self.completion_tokens)
        return sse(c)

    def final_usage(self) -> bytes | None:
        """The last chunk before [DONE] when the request asked for usage, else None."""
        if not self.include_usage:
            return None
        return sse({"id": self.request_id, "object": self.object_name, "created": self.created,
                    "model": self.model, "choices": [],
                    "usage": usage(self.prompt_tokens, self.completion_tokens)})  # fmt: skip
