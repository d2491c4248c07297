"""Logits processors applied before sampling: constraints, biases and penalties.

Everything is batched over rows; no loop over the vocabulary.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from pagedllm.sample.metadata import SamplingMetadata


def _token_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[num_reqs, len] ids padded with vocab_size -> [num_reqs, vocab_size] counts."""
    counts = torch.zeros(
        token_ids.shape[0], vocab_size + 1, dtype=torch.int32, device=token_ids.device
    )
    counts.scatter_add_(1, token_ids, torch.ones_like(token_ids, dtype=torch.int32))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Repetition (HF: over prompt and output), presence and frequency (OpenAI: output only)."""
    vocab_size = logits.shape[1]
    output_counts = None
    if md.output_token_ids is not None:
        output_counts = _token_counts(md.output_token_ids, vocab_size)
    if md.repetition_penalty is not None:
        seen = torch.zeros_like(logits, dtype=torch.bool)
        if md.prompt_token_ids is not None:
            seen |= _token_counts(md.prompt_token_ids, vocab_size) > 0
        if output_counts is not None:
            seen |= output_counts > 0
        penalty = md.repetition_penalty[:, None].expand_as(logits)
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalized, logits)
    if output_counts is not None:
        if md.frequency_penalty is not None:
            logits = logits - md.frequency_penalty[:, None] * output_counts
        if md.presence_penalty is not None:
            logits = logits - md.presence_penalty[:, None] * (output_counts > 0)
    return logits


def apply_constraints(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """allowed_token_ids, banned tokens (min_tokens, bad words) and logit_bias."""
    if md.allowed_token_mask is not None:
        logits = logits.masked_fill(~md.allowed_token_mask, float("-inf"))
    if md.logit_bias:
        rows, cols, vals = zip(*md.logit_bias)
        idx = (torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device))
        logits = logits.index_put(idx, torch.tensor(vals, dtype=logits.dtype, device=logits.device),
                                  accumulate=True)
    if md.banned:
        rows, cols = zip(*md.banned)
        logits = logits.index_put(
            (torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)),
            torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device),
        )
    return logits


def apply_top_k_top_p_min_p(
    logits: torch.Tensor,  # [num_reqs, vocab_size], already divided by temperature
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    min_p: torch.Tensor | None,
) -> torch.Tensor:
    """Masks (to -inf) every token outside each row's top-k / nucleus / min-p set."""
    if min_p is not None:
        probs = logits.softmax(dim=-1)
        threshold = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    if top_k is None and top_p is None:
        return logits
    if top_p is None:
        # top-k alone: threshold at each row's k-th largest value.
        k_max = int(top_k.max())
        top_vals = logits.topk(min(k_max, logits.shape[1]), dim=-1).values
        kth = top_vals.gather(1, (top_k.clamp(max=top_vals.shape[1]) - 1)[:, None])
        return logits.masked_fill(logits < kth, float("-inf"))
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    vocab_size = logits.shape[1]
    if top_k is not None:
        ranks = torch.arange(vocab_size, device=logits.device)[None, :]
        sorted_logits = sorted_logits.masked_fill(ranks >= top_k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    cum_before = probs.cumsum(dim=-1) - probs
    # Keep a token while the mass before it is below top_p (the first token always stays).
    drop = cum_before >= top_p[:, None]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)


def apply_token_bitmask(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Structured outputs: tokens a row's grammar forbids get -inf (in place).

    `md.grammar_bitmask` [num_constrained, ceil(vocab_size / 32)] int32 packs the allowed
    tokens of rows `md.grammar_rows` (None: every row, in order); bit j of word w is token
    32 w + j.
    """
    if md.grammar_bitmask is None:
        return logits
    bitmask, rows = md.grammar_bitmask, md.grammar_rows
    allowed = unpack_bitmask(bitmask, logits.shape[-1])
    if rows is None:  # every row, in order
        return logits.masked_fill_(~allowed, float("-inf"))
    sub = logits.index_select(0, rows).masked_fill_(~allowed, float("-inf"))
    return logits.index_copy_(0, rows, sub)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[n, words] int32 packed -> [n, vocab_size] bool (bit j of word w = token 32 w + j).

    On the CPU numpy's unpackbits (little-endian words, little bit order) is ~20x faster than
    shifting; on the GPU the shifts are one elementwise kernel on the uploaded packed mask."""
    if bitmask.device.type == "cpu" and sys.byteorder == "little":
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")
        return torch.from_numpy(bits).view(torch.bool)[:, :vocab_size]
    return unpack_bitmask_torch(bitmask, vocab_size)


def unpack_bitmask_torch(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    # [n, words, 32] -> [n, words * 32]
    return ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :vocab_size]
