"""POST /v1/chat/completions: render the chat template, generate, answer or stream (SSE)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pagedllm.entrypoints.chat_utils import render_chat
from pagedllm.entrypoints.openai.errors import APIError, error_body
from pagedllm.entrypoints.openai.protocol import ChatCompletionRequest
from pagedllm.entrypoints.openai.serving_engine import (
    OpenAIServing,
    chat_logprobs,
    prompt_logprobs_json,
    usage,
)
from pagedllm.entrypoints.openai.streaming import (
    SSE_DONE,
    run_until_disconnected,
    sse,
)
from pagedllm.outputs import RequestOutput


class OpenAIServingChat(OpenAIServing):
    def render(self, req: ChatCompletionRequest) -> str:
        if req.chat_template is not None and not self.config.trust_request_chat_template:
            raise APIError(
                "chat_template in the request is refused: start the server with "
                "--trust-request-chat-template to allow it", 400, param="chat_template",
            )
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        try:
            return render_chat(
                self.tokenizer, messages, req.chat_template or self.config.chat_template,
                req.add_generation_prompt, req.continue_final_message,
                req.chat_template_kwargs, req.tools,
            )
        except ValueError:
            raise
        except Exception as e:  # jinja2 errors raised by the template itself
            raise APIError(f"Error rendering the chat template: {e}", 400, param="messages") from e

    async def create(self, req: ChatCompletionRequest, raw: Request) -> Response:
        try:
            model = self.check_generation_request(req)
            text = self.render(req)
            ids = self.tokenizer.encode(text, add_special_tokens=bool(req.add_special_tokens))
            params = req.to_sampling_params(default_max_tokens=None)
            if params.truncate_prompt_tokens is not None:
                ids = ids[-params.truncate_prompt_tokens:]
            self.check_context_length(len(ids), params.max_tokens, "messages")
            request_id = req.request_id or self.new_id("chatcmpl")
            rank = self.data_parallel_rank(raw)
            self.log_request(request_id, params)
            gen = self.engine.generate(
                {"prompt_token_ids": ids, "prompt": text}, params, request_id,
                add_special_tokens=False, priority=req.priority, data_parallel_rank=rank,
            )
            if req.stream:
                first = await run_until_disconnected(raw, gen.__anext__())
                return StreamingResponse(
                    self.stream(req, model, request_id, gen, first, params.logprobs),
                    media_type="text/event-stream",
                )
            final = await run_until_disconnected(raw, _last(gen))
            return JSONResponse(self.full_response(req, model, request_id, final, params.logprobs))
        except Exception as e:
            return self.error_response(e)

    def full_response(self, req, model: str, request_id: str, out: RequestOutput,
                      num_logprobs: int | None) -> dict:
        choices = []
        completion_tokens = 0
        prefix = req.echo_prefix()
        for c in out.outputs:
            completion_tokens += len(c.token_ids)
            choices.append({
                "index": c.index,
                "message": {"role": "assistant", "content": prefix + c.text, "tool_calls": []},
                "logprobs": (
                    chat_logprobs(self.tokenizer, c.token_ids, c.logprobs, num_logprobs or 0)
                    if c.logprobs is not None else None
                ),
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            })
        body = {
            "id": request_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": usage(len(out.prompt_token_ids), completion_tokens),
            "system_fingerprint": None,
        }
        if req.prompt_logprobs is not None:
            body["prompt_logprobs"] = prompt_logprobs_json(out.prompt_logprobs)
        return body

    async def stream(
        self, req: ChatCompletionRequest, model: str, request_id: str,
        gen: AsyncIterator[RequestOutput], first: RequestOutput, num_logprobs: int | None,
    ) -> AsyncIterator[bytes]:
        created = int(time.time())
        opts = req.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = include_usage and bool(opts and opts.continuous_usage_stats)
        prompt_tokens = len(first.prompt_token_ids)
        completion_tokens = 0

        def chunk(choices: list) -> dict:
            c = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                 "model": model, "choices": choices}
            if continuous:
                c["usage"] = usage(prompt_tokens, completion_tokens)
            return c

        try:
            for i in range(req.n):
                yield sse(chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                  "logprobs": None, "finish_reason": None}]))
            prefix = req.echo_prefix()
            for i in range(req.n if prefix else 0):
                yield sse(chunk([{"index": i, "delta": {"content": prefix}, "logprobs": None,
                                  "finish_reason": None}]))
            out: RequestOutput | None = first
            while out is not None:
                for c in out.outputs:
                    completion_tokens += len(c.token_ids)
                    finished = c.finish_reason is not None
                    if not c.text and not finished and not c.logprobs:
                        continue
                    logprobs = None
                    if c.logprobs:
                        logprobs = chat_logprobs(
                            self.tokenizer, c.token_ids, c.logprobs, num_logprobs or 0
                        )
                    choice = {"index": c.index, "delta": {"content": c.text} if c.text else {},
                              "logprobs": logprobs, "finish_reason": c.finish_reason}
                    if finished:
                        choice["stop_reason"] = c.stop_reason
                    yield sse(chunk([choice]))
                out = None if out.finished else await _next(gen)
            if include_usage:
                yield sse({"id": request_id, "object": "chat.completion.chunk",
                           "created": created, "model": model, "choices": [],
                           "usage": usage(prompt_tokens, completion_tokens)})
        except Exception as e:
            err = self.to_api_error(e)
            yield sse(error_body(err.message, err.err_type, err.param, err.code))
        finally:
            await gen.aclose()
        yield SSE_DONE


async def _next(gen: AsyncIterator[RequestOutput]) -> RequestOutput | None:
    try:
        return await gen.__anext__()
    except StopAsyncIteration:
        return None


async def _last(gen: AsyncIterator[RequestOutput]) -> RequestOutput:
    final = None
    async for out in gen:
        final = out
    if final is None:
        raise RuntimeError("the engine returned no output")
    return final
