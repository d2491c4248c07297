"""How one step's sampled tokens update one request (the scheduler's `update_from_output`):
stop checks in vLLM's order, grammar acceptance, logprobs trimmed to the kept tokens, pooling
results. Each function sets the request's status when it finishes and returns its
`EngineCoreOutput` (None when there is nothing to report yet)."""

from __future__ import annotations

import logging

from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.scheduler_output import ModelRunnerOutput
from pagedllm.engine.protocol import EngineCoreOutput, LogprobsLists

logger = logging.getLogger(__name__)


def check_stop(req: Request, tok: int, max_model_len: int) -> bool:
    """After appending `tok`: vLLM's order, length, then min_tokens, then EOS, then
    stop_token_ids. Sets the status (and stop_reason) and returns True when finished."""
    num_out = len(req.output_token_ids)
    if len(req.all_token_ids) >= max_model_len or num_out >= req.max_tokens:
        req.status = RequestStatus.FINISHED_LENGTH_CAPPED
        return True
    sp = req.sampling_params
    if num_out < sp.min_tokens:
        return False
    if not sp.ignore_eos and req.eos_token_id is not None and tok == req.eos_token_id:
        req.status = RequestStatus.FINISHED_STOPPED
        return True
    if sp.stop_token_ids and tok in sp.stop_token_ids:
        req.status = RequestStatus.FINISHED_STOPPED
        req.stop_reason = tok
        return True
    return False


def update_one(req: Request, tok: int, max_model_len: int) -> EngineCoreOutput:
    """`update_generation` for the common case: one token, no grammar, no logprobs, the
    request's prompt computed."""
    req.append_output_token_id(tok)
    cached = max(req.num_cached_tokens, 0)
    if not check_stop(req, tok, max_model_len):
        return EngineCoreOutput(req.request_id, [tok], None, None, None, None, cached)
    return EngineCoreOutput(req.request_id, [tok], None, None, req.status.finish_reason,
                            req.stop_reason, cached)


def update_pooling(req: Request, mro: ModelRunnerOutput) -> EngineCoreOutput | None:
    if req.num_computed_tokens < req.num_tokens:
        return None  # more prompt chunks to go
    req.status = RequestStatus.FINISHED_STOPPED
    return EngineCoreOutput(
        request_id=req.request_id,
        new_token_ids=[],
        finish_reason=req.finish_reason,
        num_cached_tokens=max(req.num_cached_tokens, 0),
        pooling_output=mro.pooler_output.get(req.request_id),
    )


def update_generation(
    req: Request, sampled: list[int], mro: ModelRunnerOutput, max_model_len: int
) -> EngineCoreOutput | None:
    """Appends the sampled tokens up to the first stop (grammar first: a token it rejects
    aborts the request), with their logprobs and, on the first output, prompt logprobs."""
    rid = req.request_id
    if req.num_computed_tokens < req.num_tokens:
        sampled = []  # a partial prefill chunk: any sample is meaningless
    first_output = req.num_output_tokens == 0
    new_token_ids: list[int] = []
    grammar = req.grammar
    if grammar is not None and grammar.error is not None:
        logger.warning("request %s aborted: %s", rid, grammar.error)
        req.status = RequestStatus.FINISHED_ABORTED
        sampled = []
    for tok in sampled:
        if grammar is not None and not grammar.accept(tok):
            logger.warning("request %s: token %d violates its grammar; aborted", rid, tok)
            req.status = RequestStatus.FINISHED_ABORTED
            break
        req.append_output_token_ids(tok)
        new_token_ids.append(tok)
        if check_stop(req, tok, max_model_len):
            break
        if grammar is not None and grammar.is_terminated:
            req.status = RequestStatus.FINISHED_STOPPED  # the grammar has ended
            if tok in req.sampling_params.stop_token_ids:
                req.stop_reason = tok
            break
    prompt_logprobs = mro.prompt_logprobs.get(rid) if first_output else None
    if not new_token_ids and prompt_logprobs is None and not req.is_finished:
        return None
    logprobs = mro.logprobs.get(rid)
    if logprobs is not None and len(logprobs.sampled_token_ranks) > len(new_token_ids):
        n = len(new_token_ids)
        logprobs = LogprobsLists(
            logprobs.logprob_token_ids[:n],
            logprobs.logprobs[:n],
            logprobs.sampled_token_ranks[:n],
        )
    return EngineCoreOutput(
        request_id=rid,
        new_token_ids=new_token_ids,
        new_logprobs=logprobs,
        new_prompt_logprobs=prompt_logprobs,
        finish_reason=req.finish_reason,
        stop_reason=req.stop_reason,
        num_cached_tokens=max(req.num_cached_tokens, 0),
    )
