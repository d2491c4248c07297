"""Parameter attribute helpers shared by layers and loaders."""

from __future__ import annotations

from typing import Any

import torch


def set_weight_attrs(param: torch.Tensor, attrs: dict[str, Any] | None) -> None:
    """Attaches loader metadata (`output_dim`, `input_dim`, `weight_loader`) to a parameter."""
    if not attrs:
        return
    for key, value in attrs.items():
        if hasattr(param, key) and key != "weight_loader":
            raise AttributeError(f"parameter already has attribute {key!r}")
        setattr(param, key, value)


def default_weight_loader(
    param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Any = None
) -> None:
    """Copies a whole checkpoint tensor into a parameter of the same shape."""
    if tuple(param.shape) != tuple(loaded_weight.shape):
        raise ValueError(
            f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint "
            f"{tuple(loaded_weight.shape)}"
        )
    param.data.copy_(loaded_weight)
