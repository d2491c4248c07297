"""POST /v1/completions: one or many prompts (text or token ids), echo, legacy logprobs, SSE.

Choice index = prompt_index * n + sample_index, as in OpenAI's API.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pagedllm.entrypoints.openai.errors import APIError
from pagedllm.entrypoints.openai.protocol import CompletionRequest
from pagedllm.entrypoints.openai.serving_engine import (
    OpenAIServing,
    StreamChunks,
    legacy_logprobs,
    prompt_logprobs_json,
    usage,
)
from pagedllm.entrypoints.openai.streaming import (
    SSE_DONE,
    ClientDisconnected,
    merge,
    run_until_disconnected,
)
from pagedllm.outputs import RequestOutput


def normalize_prompts(prompt) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError("prompt: must not be empty", 400, param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if any(isinstance(p, list) and not p for p in prompt):
        raise APIError("prompt: token-id lists must not be empty", 400, param="prompt")
    return list(prompt)


class OpenAIServingCompletion(OpenAIServing):
    def _prepare(self, prompt: str | list[int], add_special_tokens: bool, truncate: int | None):
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        else:
            text, ids = None, prompt
        if truncate is not None:
            ids = ids[-truncate:]
        return text, ids

    async def create(self, req: CompletionRequest, raw: Request) -> Response:
        gens: list = []
        try:
            model = self.check_generation_request(req)
            prompts = normalize_prompts(req.prompt)
            params = req.to_sampling_params(default_max_tokens=None)
            add_special = True if req.add_special_tokens is None else req.add_special_tokens
            request_id = req.request_id or self.new_id("cmpl")
            rank = self.data_parallel_rank(raw)
            self.log_request(request_id, params)
            prepared = []
            for p in prompts:
                text, ids = self._prepare(p, add_special, params.truncate_prompt_tokens)
                self.check_context_length(len(ids), params.max_tokens, "prompt")
                prepared.append((text, ids))
            for i, (text, ids) in enumerate(prepared):
                rid = request_id if len(prepared) == 1 else f"{request_id}-{i}"
                gens.append(self.engine.generate(
                    {"prompt_token_ids": ids, "prompt": text}, params, rid,
                    add_special_tokens=False, priority=req.priority, data_parallel_rank=rank,
                ))
            merged = merge(gens)
            if req.stream:
                first = await run_until_disconnected(raw, merged.__anext__())
                return StreamingResponse(
                    self.stream(req, model, request_id, merged, first, len(prepared)),
                    media_type="text/event-stream",
                )
            finals = await run_until_disconnected(raw, _collect(merged, len(prepared)))
            return JSONResponse(self.full_response(req, model, request_id, finals))
        except Exception as e:
            if not isinstance(e, ClientDisconnected):
                for g in gens:
                    await g.aclose()
            return self.error_response(e)

    def _prompt_text(self, out: RequestOutput) -> str:
        if out.prompt is not None:
            return out.prompt
        return self.tokenizer.decode(out.prompt_token_ids)

    def full_response(self, req: CompletionRequest, model: str, request_id: str,
                      finals: list[RequestOutput]) -> dict:
        choices = []
        prompt_tokens = completion_tokens = 0
        k = req.logprobs or 0
        for pi, out in enumerate(finals):
            prompt_tokens += len(out.prompt_token_ids)
            prompt_text = self._prompt_text(out) if req.echo else ""
            for c in out.outputs:
                text, token_ids, lps = _generated(req, c)
                completion_tokens += len(token_ids)
                logprobs = None
                if req.logprobs is not None:
                    if req.echo:
                        plp = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
                        token_ids = list(out.prompt_token_ids) + token_ids
                        lps = list(plp) + lps
                    logprobs, _ = legacy_logprobs(self.tokenizer, token_ids, lps, k, 0)
                choices.append({
                    "index": pi * req.n + c.index,
                    "text": prompt_text + text,
                    "logprobs": logprobs,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                })
                if req.prompt_logprobs is not None:
                    choices[-1]["prompt_logprobs"] = prompt_logprobs_json(out.prompt_logprobs)
        choices.sort(key=lambda c: c["index"])
        return {
            "id": request_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens),
            "system_fingerprint": None,
        }

    async def stream(self, req: CompletionRequest, model: str, request_id: str,
                     merged: AsyncIterator[tuple[int, RequestOutput]],
                     first: tuple[int, RequestOutput], num_prompts: int) -> AsyncIterator[bytes]:
        chunks = StreamChunks.for_request(request_id, "text_completion", model,
                                          req.stream_options)  # fmt: skip
        k = req.logprobs or 0
        seen_prompts: set[int] = set()
        echoed: set[int] = set()
        offsets: dict[int, int] = {}

        try:
            item: tuple[int, RequestOutput] | None = first
            while item is not None:
                pi, out = item
                if pi not in seen_prompts:
                    seen_prompts.add(pi)
                    chunks.prompt_tokens += len(out.prompt_token_ids)
                for c in out.outputs:
                    index = pi * req.n + c.index
                    text, token_ids, lps = _generated(req, c)
                    chunks.completion_tokens += len(token_ids)
                    if req.echo and index not in echoed:
                        echoed.add(index)
                        text = self._prompt_text(out) + text
                        if req.logprobs is not None:
                            plp = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
                            token_ids = list(out.prompt_token_ids) + token_ids
                            lps = list(plp) + lps
                    finished = c.finish_reason is not None
                    if not text and not finished and not token_ids:
                        continue
                    logprobs = None
                    if req.logprobs is not None:
                        logprobs, offsets[index] = legacy_logprobs(
                            self.tokenizer, token_ids, lps, k, offsets.get(index, 0)
                        )
                    elif not text and not finished:
                        continue
                    choice = {"index": index, "text": text, "logprobs": logprobs,
                              "finish_reason": c.finish_reason}
                    if finished:
                        choice["stop_reason"] = c.stop_reason
                    yield chunks.chunk([choice])
                try:
                    item = await merged.__anext__()
                except StopAsyncIteration:
                    item = None
            if (last := chunks.final_usage()) is not None:
                yield last
        except Exception as e:
            yield self.stream_error(e)
        finally:
            await merged.aclose()
        yield SSE_DONE


def _generated(req: CompletionRequest, c) -> tuple[str, list[int], list]:
    """A choice's generated text, token ids and logprobs (none for echo with max_tokens=0)."""
    if req.echo_only:
        return "", [], []
    return c.text, list(c.token_ids), list(c.logprobs or [])


async def _collect(merged: AsyncIterator[tuple[int, RequestOutput]], n: int) -> list[RequestOutput]:
    finals: list[RequestOutput | None] = [None] * n
    async for i, out in merged:
        if out.finished:
            finals[i] = out
    if any(f is None for f in finals):
        raise RuntimeError("the engine returned no final output")
    return finals  # type: ignore[return-value]
