"""The batched sampler: logprobs, constraints, penalties, temperature, top-k/p, min-p, draw."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedllm.sample.logits_processors import (
    apply_constraints,
    apply_penalties,
    apply_token_bitmask,
    apply_top_k_top_p_min_p,
)
from pagedllm.sample.metadata import SamplingMetadata


@dataclass(slots=True)
class LogprobsTensors:
    token_ids: torch.Tensor  # [num_reqs, 1 + k]: sampled token first, then the top-k
    logprobs: torch.Tensor  # [num_reqs, 1 + k] float32
    ranks: torch.Tensor  # [num_reqs] rank of the sampled token (1 = most likely)


@dataclass(slots=True)
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [num_reqs] int64
    logprobs: LogprobsTensors | None


def compute_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: int
) -> LogprobsTensors:
    """logprobs [n, vocab] (log-softmaxed); token_ids [n] -> the chosen token + top-num_top."""
    chosen = logprobs.gather(1, token_ids[:, None])
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    if num_top > 0:
        top_vals, top_ids = logprobs.topk(num_top, dim=-1)
        ids = torch.cat([token_ids[:, None], top_ids], dim=1)
        vals = torch.cat([chosen, top_vals], dim=1)
    else:
        ids, vals = token_ids[:, None], chosen
    return LogprobsTensors(ids, vals.float(), ranks)


def _draw(probs: torch.Tensor, step_seeds: dict[int, int]) -> torch.Tensor:
    """Sample one token per row with the exponential race (argmax of p / Exp(1))."""
    q = torch.empty_like(probs)
    if len(step_seeds) < probs.shape[0]:
        q.exponential_()
    if step_seeds:
        gen = torch.Generator(device=probs.device)
        for row, seed in step_seeds.items():
            gen.manual_seed(seed)
            q[row].exponential_(generator=gen)
    return probs.div(q).argmax(dim=-1)


class Sampler:
    """Samples one token per row of `logits` [num_reqs, vocab_size] (float32).

    Logprobs are "raw": computed from the model's logits before any processing, like vLLM's
    default; for a constrained request they are of the unconstrained distribution. Greedy-only batches skip every random-sampling step.
    """

    def __call__(self, logits: torch.Tensor, md: SamplingMetadata) -> SamplerOutput:
        logits = logits.float()
        raw_logprobs = None
        if md.max_num_logprobs is not None:
            raw_logprobs = logits.log_softmax(dim=-1)
        logits = apply_token_bitmask(logits, md)
        logits = apply_constraints(logits, md)
        logits = apply_penalties(logits, md)
        greedy = logits.argmax(dim=-1)
        if md.all_greedy:
            sampled = greedy
        else:
            temp = md.temperature.clamp(min=1e-5)[:, None]
            scaled = apply_top_k_top_p_min_p(logits / temp, md.top_k, md.top_p, md.min_p)
            random = _draw(scaled.softmax(dim=-1), md.step_seeds)
            sampled = random if md.all_random else torch.where(md.temperature < 1e-5, greedy, random)
        lp = None
        if raw_logprobs is not None:
            lp = compute_logprobs(raw_logprobs, sampled, md.max_num_logprobs)
        return SamplerOutput(sampled, lp)
