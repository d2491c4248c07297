"""Pooling: per-token hidden states of whole prompts -> one embedding vector per request.

Requests are laid out back to back, as the model runner flattens them: request i owns rows
sum(prompt_lens[:i]) .. sum(prompt_lens[:i+1]) - 1, and every row of its prompt is present
(pooling requests are never split into chunks and never hit the prefix cache).

Several pooling types may be combined; their vectors are concatenated in the order
sentence-transformers uses (cls, max, mean, mean_sqrt_len, last), then optionally
L2-normalized as a whole.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class PoolingType(enum.Enum):
    CLS = "cls"  # first token
    MAX = "max"  # element-wise max over tokens
    MEAN = "mean"  # mean over tokens
    MEAN_SQRT_LEN = "mean_sqrt_len"  # sum over tokens / sqrt(len)
    LAST = "last"  # last token (the default for causal LMs)


@dataclass(frozen=True, slots=True)
class PoolerConfig:
    pooling_types: tuple[PoolingType, ...] = (PoolingType.LAST,)
    normalize: bool = True

    def __post_init__(self) -> None:
        if not self.pooling_types:
            raise ValueError("PoolerConfig needs at least one pooling type")


def _segment_ids(prompt_lens: torch.Tensor) -> torch.Tensor:
    """[num_tokens] request index of every row."""
    idx = torch.arange(prompt_lens.shape[0], device=prompt_lens.device)
    return torch.repeat_interleave(idx, prompt_lens)


def _pool_one(
    kind: PoolingType,
    hidden: torch.Tensor,  # [num_tokens, hidden_size] float32, padding rows removed
    prompt_lens: torch.Tensor,  # [num_reqs] int64
    ends: torch.Tensor,  # [num_reqs] int64, exclusive end row of each request
) -> torch.Tensor:  # [num_reqs, hidden_size]
    if kind is PoolingType.CLS:
        return hidden.index_select(0, ends - prompt_lens)
    if kind is PoolingType.LAST:
        return hidden.index_select(0, ends - 1)
    num_reqs, dim = prompt_lens.shape[0], hidden.shape[1]
    seg = _segment_ids(prompt_lens)
    if kind is PoolingType.MAX:
        out = torch.full((num_reqs, dim), float("-inf"), dtype=hidden.dtype, device=hidden.device)
        return out.scatter_reduce_(0, seg[:, None].expand(-1, dim), hidden, "amax")
    sums = torch.zeros((num_reqs, dim), dtype=hidden.dtype, device=hidden.device)
    sums.index_add_(0, seg, hidden)
    lens = prompt_lens.to(hidden.dtype)[:, None]
    if kind is PoolingType.MEAN:
        return sums / lens
    if kind is PoolingType.MEAN_SQRT_LEN:
        return sums / lens.sqrt()
    raise ValueError(f"unknown pooling type {kind}")


class Pooler(nn.Module):
    """forward(hidden [num_tokens, hidden_size], prompt_lens [num_reqs]) -> [num_reqs, dim].

    The result is float32; rows of `hidden` past sum(prompt_lens) (padding) are ignored.
    Every prompt length must be at least 1.
    """

    def __init__(self, config: PoolerConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, hidden: torch.Tensor, prompt_lens: torch.Tensor) -> torch.Tensor:
        prompt_lens = prompt_lens.to(device=hidden.device, dtype=torch.int64)
        ends = torch.cumsum(prompt_lens, 0)
        total = int(ends[-1]) if ends.numel() else 0
        rows = hidden[:total].float()
        order = list(PoolingType)
        kinds = sorted(set(self.config.pooling_types), key=order.index)
        parts = [_pool_one(kind, rows, prompt_lens, ends) for kind in kinds]
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        if self.config.normalize:
            out = F.normalize(out, p=2.0, dim=-1)
        return out


# sentence-transformers 1_Pooling/config.json keys -> our types.
_ST_MODES: dict[str, PoolingType] = {
    "pooling_mode_cls_token": PoolingType.CLS,
    "pooling_mode_max_tokens": PoolingType.MAX,
    "pooling_mode_mean_tokens": PoolingType.MEAN,
    "pooling_mode_mean_sqrt_len_tokens": PoolingType.MEAN_SQRT_LEN,
    "pooling_mode_lasttoken": PoolingType.LAST,
}
# Modes we cannot reproduce; a model using one is refused rather than embedded differently.
_ST_UNSUPPORTED = ("pooling_mode_weightedmean_tokens",)


def pooling_types_from_sentence_transformers(
    pooling_config: dict[str, object],
) -> tuple[PoolingType, ...]:
    """Our pooling types for a sentence-transformers Pooling module config; ValueError if none
    is set or one we do not implement is."""
    bad = [k for k in _ST_UNSUPPORTED if pooling_config.get(k)]
    if bad:
        raise ValueError(f"sentence-transformers pooling {', '.join(bad)} is not supported")
    mode = pooling_config.get("pooling_mode")
    if isinstance(mode, str):  # newer sentence-transformers write one "pooling_mode" string
        key = {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens",
               "mean": "pooling_mode_mean_tokens",
               "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
               "lasttoken": "pooling_mode_lasttoken"}.get(mode)
        if key is None:
            raise ValueError(f"sentence-transformers pooling_mode {mode!r} is not supported")
        return (_ST_MODES[key],)
    kinds = tuple(kind for key, kind in _ST_MODES.items() if pooling_config.get(key))
    if not kinds:
        raise ValueError("the sentence-transformers pooling config enables no pooling mode")
    return kinds
