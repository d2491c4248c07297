"""Parameter attribute helpers shared by layers and loaders, and the dense linear of 16-bit layers."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


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


class WeightLoadTracker:
    """Feeds checkpoint tensors to parameters through their `weight_loader` and records which
    parameters are complete: a fused parameter (QKV, gate/up) once all its shards arrived."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.params = dict(module.named_parameters())
        self.loaded: set[str] = set()
        self._seen_shards: dict[str, set] = {}

    def load(
        self,
        target: str,
        tensor: torch.Tensor,
        shard_id=None,
        expected_shards: set | None = None,
        source_name: str | None = None,
    ) -> None:
        param = self.params.get(target)
        if param is None:
            logger.warning(
                "checkpoint tensor %s has no matching parameter; skipped", source_name or target
            )
            return
        loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            with torch.no_grad():
                loader(param, tensor, shard_id) if shard_id is not None else loader(param, tensor)
        except ValueError as e:
            # Name the checkpoint tensor (a shape or dtype mismatch says nothing of which).
            raise ValueError(f"tensor {source_name or target}: {e}") from e
        if shard_id is None:
            self.loaded.add(target)
            return
        seen = self._seen_shards.setdefault(target, set())
        seen.add(shard_id)
        if seen == expected_shards:
            self.loaded.add(target)


# Tests set this to run the dense GEMV's dispatch on CPU (the Triton interpreter).
DENSE_GEMV_ON_CPU = False


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """F.linear, except decode-sized CUDA calls of shapes where the tuned GEMV beat cuBLAS
    (`ops/fp8_gemv.dense_gemv_linear`)."""
    if (x.is_cuda or DENSE_GEMV_ON_CPU) and x.dim() == 2 and x.shape[0] <= 2:
        from pagedllm.model_executor.layers.ops.fp8_gemv import dense_gemv_linear

        out = dense_gemv_linear(x, weight, bias)
        if out is not None:
            return out
    return F.linear(x, weight, bias)
