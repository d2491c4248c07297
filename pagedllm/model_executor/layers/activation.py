"""Gated activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm import cpu_ops


class SiluAndMul(nn.Module):
    """[num_tokens, 2 * intermediate] (gate | up) -> [num_tokens, intermediate]: silu(gate) * up."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from pagedllm.model_executor.layers.ops.activation import silu_and_mul

            return silu_and_mul(x)
        if x.dim() == 2 and x.stride(-1) == 1 and cpu_ops.supports(x):
            return cpu_ops.silu_and_mul(x)
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]).mul_(x[..., d:])


# HF activation names of the gated GELU MLPs (Gemma) -> torch's `approximate` argument.
_GELU_APPROXIMATIONS: dict[str, str] = {
    "gelu": "none",
    "gelu_pytorch_tanh": "tanh",
    "gelu_new": "tanh",
    "gelu_tanh": "tanh",
}


class GeluAndMul(nn.Module):
    """[num_tokens, 2 * intermediate] (gate | up) -> [num_tokens, intermediate]: gelu(gate) * up."""

    def __init__(self, approximate: str = "tanh") -> None:
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GELU approximation must be 'none' or 'tanh', not {approximate!r}")
        self.approximate = approximate

    @classmethod
    def from_hf_name(cls, name: str) -> GeluAndMul:
        if name not in _GELU_APPROXIMATIONS:
            raise ValueError(
                f"unsupported activation {name!r} for a gated GELU MLP; supported: "
                f"{sorted(_GELU_APPROXIMATIONS)}"
            )
        return cls(_GELU_APPROXIMATIONS[name])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return F.gelu(x[..., :d], approximate=self.approximate) * x[..., d:]
