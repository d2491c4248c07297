"""POST /v1/chat/completions: render the chat template, generate, answer or stream (SSE)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pagedllm.entrypoints.chat_utils import render_chat
from pagedllm.entrypoints.openai.chat_output import ChoiceOutput
from pagedllm.entrypoints.openai.errors import APIError
from pagedllm.entrypoints.openai.protocol import ChatCompletionRequest
from pagedllm.entrypoints.openai.reasoning_parsers import get_reasoning_parser
from pagedllm.entrypoints.openai.serving_engine import (
    OpenAIServing,
    StreamChunks,
    chat_logprobs,
    prompt_logprobs_json,
    usage,
)
from pagedllm.entrypoints.openai.streaming import (
    SSE_DONE,
    run_until_disconnected,
)
from pagedllm.entrypoints.openai.tool_choice import (
    NamedToolParser,
    RequiredToolParser,
    ToolChoice,
    resolve_tool_choice,
    tool_constraint,
    tools_for_template,
)
from pagedllm.entrypoints.openai.tool_parsers import get_tool_parser
from pagedllm.outputs import RequestOutput


class OpenAIServingChat(OpenAIServing):
    def render(self, req: ChatCompletionRequest, tools: list | None) -> str:
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
                req.chat_template_kwargs, tools,
            )
        except ValueError:
            raise
        except Exception as e:  # jinja2 errors raised by the template itself
            raise APIError(f"Error rendering the chat template: {e}", 400, param="messages") from e

    async def create(self, req: ChatCompletionRequest, raw: Request) -> Response:
        try:
            model = self.check_generation_request(req)
            cfg = self.config
            choice = resolve_tool_choice(req.tools, req.tool_choice, req.parallel_tool_calls,
                                         cfg.enable_auto_tool_choice)
            text = self.render(req, tools_for_template(
                req.tools, choice, cfg.exclude_tools_when_tool_choice_none))
            ids = self.tokenizer.encode(text, add_special_tokens=bool(req.add_special_tokens))
            params = req.to_sampling_params(
                default_max_tokens=None, tool_constraint=tool_constraint(req.tools, choice)
            )
            parsers = self._output_parsers(req, choice)
            self._constrain_after_reasoning(params, parsers)
            tools = parsers().tools
            if tools is not None and tools.keep_special_tokens:
                params.skip_special_tokens = False
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
                    self.stream(req, model, request_id, gen, first, params.logprobs, parsers),
                    media_type="text/event-stream",
                )
            final = await run_until_disconnected(raw, _last(gen))
            return JSONResponse(self.full_response(req, model, request_id, final,
                                                   params.logprobs, parsers))
        except Exception as e:
            return self.error_response(e)

    def _output_parsers(self, req: ChatCompletionRequest, choice: ToolChoice
                        ) -> Callable[[], ChoiceOutput]:
        """A factory of per-choice output parsers for this request."""
        cfg = self.config
        reasoning_cls = get_reasoning_parser(cfg.reasoning_parser) if cfg.reasoning_parser else None
        tool_cls = None
        if choice.mode == "auto":
            tool_cls = get_tool_parser(cfg.tool_call_parser)

        def make() -> ChoiceOutput:
            reasoning = reasoning_cls(req.chat_template_kwargs) if reasoning_cls else None
            if choice.mode == "required":
                tools = RequiredToolParser()
            elif choice.mode == "named":
                tools = NamedToolParser(choice.name)
            else:
                tools = tool_cls(self.tokenizer) if tool_cls else None
            return ChoiceOutput(reasoning, tools, choice.parallel)

        return make

    def _constrain_after_reasoning(self, params, parsers: Callable[[], ChoiceOutput]) -> None:
        """With a reasoning parser, an output constraint starts once the reasoning ends
        (the engine watches for the end marker's tokens)."""
        so = params.structured_outputs
        reasoning = parsers().reasoning
        if so is None or reasoning is None or not reasoning.thinks():
            return
        so.reasoning_end = self.tokenizer.encode(reasoning.end_marker, add_special_tokens=False)

    def full_response(self, req, model: str, request_id: str, out: RequestOutput,
                      num_logprobs: int | None, parsers: Callable[[], ChoiceOutput]) -> dict:
        choices = []
        completion_tokens = 0
        prefix = req.echo_prefix()
        for c in out.outputs:
            completion_tokens += len(c.token_ids)
            message, has_calls = parsers().message(c.text)
            if message["content"] is not None:
                message["content"] = prefix + message["content"]
            finish_reason = _finish_reason(c.finish_reason, has_calls, req)
            choices.append({
                "index": c.index,
                "message": message,
                "logprobs": (
                    chat_logprobs(self.tokenizer, c.token_ids, c.logprobs, num_logprobs or 0)
                    if c.logprobs is not None else None
                ),
                "finish_reason": finish_reason,
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
        parsers: Callable[[], ChoiceOutput],
    ) -> AsyncIterator[bytes]:
        chunks = StreamChunks.for_request(request_id, "chat.completion.chunk", model,
                                          req.stream_options)  # fmt: skip
        chunks.prompt_tokens = len(first.prompt_token_ids)
        try:
            for i in range(req.n):
                yield chunks.chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                     "logprobs": None, "finish_reason": None}])
            prefix = req.echo_prefix()
            for i in range(req.n if prefix else 0):
                yield chunks.chunk([{"index": i, "delta": {"content": prefix}, "logprobs": None,
                                     "finish_reason": None}])
            outputs = [parsers() for _ in range(req.n)]
            out: RequestOutput | None = first
            while out is not None:
                for c in out.outputs:
                    chunks.completion_tokens += len(c.token_ids)
                    finished = c.finish_reason is not None
                    parsed = outputs[c.index]
                    delta = parsed.delta(c.text, finished)
                    if delta is None and not finished and not c.logprobs:
                        continue
                    logprobs = None
                    if c.logprobs:
                        logprobs = chat_logprobs(
                            self.tokenizer, c.token_ids, c.logprobs, num_logprobs or 0
                        )
                    reason = _finish_reason(c.finish_reason, parsed.has_tool_calls, req)
                    choice = {"index": c.index, "delta": delta or {},
                              "logprobs": logprobs, "finish_reason": reason}
                    if finished:
                        choice["stop_reason"] = c.stop_reason
                    yield chunks.chunk([choice])
                out = None if out.finished else await _next(gen)
            if (last := chunks.final_usage()) is not None:
                yield last
        except Exception as e:
            yield self.stream_error(e)
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


def _finish_reason(reason: str | None, has_tool_calls: bool, req: ChatCompletionRequest
                   ) -> str | None:
    """"tool_calls" when the model chose to call (auto or required); a named function
    keeps "stop", as OpenAI answers."""
    if has_tool_calls and reason == "stop" and not isinstance(req.tool_choice, dict):
        return "tool_calls"
    return reason
