"""SamplingMetadata: the per-step, batched view of every sampling request's parameters."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class SamplingMetadata:
    """Rows are the requests that sample this step, in batch order.

    Optional tensors are None when no row needs them, so the common case pays nothing.
    """

    temperature: torch.Tensor  # [num_reqs] float32; 0 marks greedy rows
    all_greedy: bool
    all_random: bool
    top_p: torch.Tensor | None  # [num_reqs] float32, 1.0 = off
    top_k: torch.Tensor | None  # [num_reqs] int64, vocab_size = off
    min_p: torch.Tensor | None  # [num_reqs] float32, 0.0 = off
    # Seeded rows: row -> seed for this step's draw (derived from the request seed and the
    # output position, so the draw is independent of batch composition and preemption).
    step_seeds: dict[int, int] = field(default_factory=dict)
    max_num_logprobs: int | None = None  # None: no logprobs this step
    # Penalties (None when every row is neutral).
    repetition_penalty: torch.Tensor | None = None  # [num_reqs]
    presence_penalty: torch.Tensor | None = None  # [num_reqs]
    frequency_penalty: torch.Tensor | None = None  # [num_reqs]
    prompt_token_ids: torch.Tensor | None = None  # [num_reqs, max_prompt_len], padded with vocab_size
    output_token_ids: torch.Tensor | None = None  # [num_reqs, max_output_len], padded with vocab_size
    # Token-level constraints.
    logit_bias: list[tuple[int, int, float]] | None = None  # (row, token id, bias)
    allowed_token_mask: torch.Tensor | None = None  # [num_reqs, vocab_size] bool, True = allowed
    # (row, token id) pairs forced to -inf: min_tokens suppression and bad words.
    banned: list[tuple[int, int]] | None = None
    # Structured outputs: rows under a grammar and their packed allowed-token bitmask
    # (bit j of word w allows token 32 w + j).
    grammar_rows: torch.Tensor | None = None  # [num_constrained] int64; None: all rows
    grammar_bitmask: torch.Tensor | None = None  # [num_constrained, ceil(vocab_size / 32)] int32
