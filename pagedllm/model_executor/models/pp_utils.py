"""Pipeline-parallel model pieces: placeholders for layers another stage holds, and the
intermediate tensors that travel between stages."""

from __future__ import annotations

import re

import torch
from torch import nn

# Hidden state and residual stream of every token, [num_tokens, hidden_size] each.
IntermediateTensors = dict[str, torch.Tensor]

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class PPMissingLayer(nn.Module):
    """Stands where a layer of another pipeline stage would be: no parameters, no cache,
    and module names (`model.layers.{i}`) stay those of the whole model."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this layer lives on another pipeline stage")


def layer_index(name: str) -> int | None:
    """The decoder layer a parameter name belongs to (`...layers.{i}....`), or None."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def empty_intermediate_tensors(
    num_tokens: int, hidden_size: int, dtype: torch.dtype, device: torch.device
) -> IntermediateTensors:
    """Receive buffers for what the previous stage sends."""
    return {
        name: torch.empty(num_tokens, hidden_size, dtype=dtype, device=device)
        for name in ("hidden_states", "residual")
    }
