"""Tensor-parallel group state and the collectives model layers call.

Until tensor parallelism lands the world size is 1 and every collective is the identity.
When `torch.distributed` is initialised with more than one rank, the default process group
is the tensor-parallel group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _tp_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_tensor_model_parallel_world_size() -> int:
    """Number of ranks that shard each layer (1 without torch.distributed)."""
    return dist.get_world_size() if _tp_active() else 1


def get_tensor_model_parallel_rank() -> int:
    """This process' rank in the tensor-parallel group (0 without torch.distributed)."""
    return dist.get_rank() if _tp_active() else 0


def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sums `x` over the tensor-parallel ranks (in place when distributed)."""
    if not _tp_active():
        return x
    dist.all_reduce(x)
    return x


def tensor_model_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenates every rank's `x` along `dim`, rank order."""
    if not _tp_active():
        return x
    world = dist.get_world_size()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=dim)
