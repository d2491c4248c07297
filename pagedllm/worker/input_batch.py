"""Per-request state the worker keeps between steps, and the sampling metadata built from it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pagedllm.sample.metadata import SamplingMetadata
from pagedllm.sampling_params import SamplingParams

_SEED_MULT = 6364136223846793005
_SEED_INC = 1442695040888963407


@dataclass(slots=True)
class CachedRequestState:
    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams | None
    block_ids: list[int]
    num_computed_tokens: int
    # Prompt logprobs accumulated over prefill chunks: per position [ids], [logprobs], rank.
    prompt_lp_ids: list[list[int]] = field(default_factory=list)
    prompt_lp_vals: list[list[float]] = field(default_factory=list)
    prompt_lp_ranks: list[int] = field(default_factory=list)
    want_prompt_logprobs: bool = False
    # Block tables of KV cache groups 1.. (models with sliding-window groups).
    extra_block_ids: tuple[list[int], ...] = ()
    # Tokens sampled by submitted steps whose values the host has not read yet (async
    # scheduling): they exist only on the device until the step's output is resolved.
    num_pending: int = 0
    # Its row in the newest submitted step's sampled tensor (where a pending id is read).
    sample_row: int = -1

    @property
    def num_tokens(self) -> int:
        """Tokens whose ids the host knows: the prompt and the resolved outputs."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_outputs(self) -> int:
        """Output tokens sampled so far, resolved or pending."""
        return len(self.output_token_ids) + self.num_pending

    @property
    def needs_host_tokens(self) -> bool:
        """Whether sampling for this request reads its output token ids on the host
        (penalties, bias, allowed/banned tokens, min_tokens suppression)."""
        p = self.sampling_params
        return not (_no_token_dependent_params(p) and self.num_outputs >= p.min_tokens)

    def token_slice(self, start: int, end: int) -> list[int]:
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]


def _no_token_dependent_params(p: SamplingParams) -> bool:
    """No penalty, bias or token filter that reads the request's tokens (min_tokens aside)."""
    return (
        p.repetition_penalty == 1.0
        and p.frequency_penalty == 0.0
        and p.presence_penalty == 0.0
        and not p.logit_bias
        and not p.allowed_token_ids
        and not p.bad_words_token_ids
    )


def may_need_host_tokens(p: SamplingParams) -> bool:
    """Whether `CachedRequestState.needs_host_tokens` can ever be true for these params."""
    return not (_no_token_dependent_params(p) and p.min_tokens <= 0)


def step_seed(seed: int, num_output_tokens: int) -> int:
    """A per-draw seed that depends only on the request seed and the output position."""
    return (seed * _SEED_MULT + (num_output_tokens + 1) * _SEED_INC) % (1 << 63)


def _padded(rows: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    out = torch.full((len(rows), width), pad, dtype=torch.int64)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
    return out.to(device)


def _bad_word_bans(state: CachedRequestState, row: int) -> list[tuple[int, int]]:
    bans = []
    out = state.output_token_ids
    for seq in state.sampling_params.bad_words_token_ids or []:
        prefix = seq[:-1]
        if not prefix or (len(out) >= len(prefix) and out[len(out) - len(prefix) :] == prefix):
            bans.append((row, seq[-1]))
    return bans


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a device tensor; on CUDA through pinned memory, without a host sync."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _basic_metadata(
    states: list[CachedRequestState], vocab_size: int, device: torch.device
) -> SamplingMetadata:
    """Temperature, top-k/top-p/min-p, seeds and logprob counts: what every step needs."""
    params = [s.sampling_params for s in states]
    temps = [p.temperature for p in params]
    all_greedy = not temps or max(temps) < 1e-5
    any_greedy = bool(temps) and min(temps) < 1e-5
    top_p = top_k = min_p = None
    if not all_greedy:
        if any(p.top_p < 1.0 for p in params):
            top_p = to_device([p.top_p for p in params], torch.float32, device)
        if any(p.top_k > 0 for p in params):
            top_k = to_device(
                [p.top_k if p.top_k > 0 else vocab_size for p in params], torch.int64, device
            )
        if any(p.min_p > 0 for p in params):
            min_p = to_device([p.min_p for p in params], torch.float32, device)
    step_seeds = {}
    if not all_greedy:
        for i in [i for i, p in enumerate(params) if p.seed is not None]:
            if temps[i] >= 1e-5:
                step_seeds[i] = step_seed(params[i].seed, states[i].num_outputs)
    lp_counts = [p.logprobs for p in params if p.logprobs is not None]
    return SamplingMetadata(
        temperature=to_device(temps, torch.float32, device),
        all_greedy=all_greedy,
        all_random=not any_greedy,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        step_seeds=step_seeds,
        max_num_logprobs=max(lp_counts) if lp_counts else None,
    )


def build_sampling_metadata(
    states: list[CachedRequestState],
    vocab_size: int,
    device: torch.device,
    host_tokens: bool | None = None,
) -> SamplingMetadata:
    """Rows = `states` (the requests sampling this step), in order.

    Batches without penalties, biases, allowed/banned tokens or min_tokens suppression upload
    through pinned memory and never block the host; the others read each request's output
    token ids, which must all be resolved on the host (`num_pending == 0`).
    """
    md = _basic_metadata(states, vocab_size, device)
    if host_tokens is None:  # the caller may have computed it already
        host_tokens = any(s.needs_host_tokens for s in states)
    if not host_tokens:
        return md
    params = [s.sampling_params for s in states]
    f32 = dict(dtype=torch.float32, device=device)
    if any(p.repetition_penalty != 1.0 for p in params):
        md.repetition_penalty = torch.tensor([p.repetition_penalty for p in params], **f32)
        md.prompt_token_ids = _padded([s.prompt_token_ids for s in states], vocab_size, device)
    if any(p.frequency_penalty != 0.0 for p in params):
        md.frequency_penalty = torch.tensor([p.frequency_penalty for p in params], **f32)
    if any(p.presence_penalty != 0.0 for p in params):
        md.presence_penalty = torch.tensor([p.presence_penalty for p in params], **f32)
    if md.repetition_penalty is not None or md.frequency_penalty is not None or (
        md.presence_penalty is not None
    ):
        md.output_token_ids = _padded([s.output_token_ids for s in states], vocab_size, device)
    bias = [(i, t, b) for i, p in enumerate(params) for t, b in (p.logit_bias or {}).items()]
    md.logit_bias = bias or None
    if any(p.allowed_token_ids for p in params):
        mask = torch.ones(len(states), vocab_size, dtype=torch.bool)
        for i, p in enumerate(params):
            if p.allowed_token_ids:
                mask[i] = False
                mask[i, torch.tensor(p.allowed_token_ids, dtype=torch.int64)] = True
        md.allowed_token_mask = mask.to(device)
    banned: list[tuple[int, int]] = []
    for i, (s, p) in enumerate(zip(states, params)):
        if len(s.output_token_ids) < p.min_tokens:
            # all_stop_token_ids: stop_token_ids plus EOS unless ignore_eos (input processor).
            banned.extend((i, t) for t in p.all_stop_token_ids if t < vocab_size)
        if p.bad_words_token_ids:
            banned.extend(_bad_word_bans(s, i))
    md.banned = banned or None
    return md
