"""Tensor- and pipeline-parallel process groups and the collectives model layers call.

Ranks are laid out pipeline-major: global rank = pp_rank * tp_size + tp_rank, so the ranks of
one tensor-parallel group are consecutive (one node, one NVLink domain) and pipeline stage s
holds ranks [s * tp_size, (s + 1) * tp_size). Each tensor-parallel group shards every layer of
its stage; each pipeline group links the same tp_rank across stages (hidden states go along it).

Without `initialize_model_parallel` (one process) every size is 1 and every collective is the
identity, so models and layers never branch on whether they are distributed.

gloo on CPU, NCCL on CUDA (one device per rank: the local rank). NCCL all-reduce is capturable
in CUDA graphs once its communicator exists; `initialize_model_parallel` runs one warm-up
collective per group so no communicator is created inside a capture.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# NVLink multicast (NVLS) stays off: the multi-GPU machines this runs on forbid it; set in
# every rank before NCCL or torch symmetric memory initialise.
NO_MULTICAST_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def apply_no_multicast_env(env: dict[str, str] | None = None) -> None:
    """Forces the no-NVLink-multicast settings into `env` (default: this process')."""
    target = os.environ if env is None else env
    target.update(NO_MULTICAST_ENV)


@dataclass(slots=True)
class GroupCoordinator:
    """One process group and this rank's place in it. `ranks` are global ranks."""

    ranks: list[int]
    rank_in_group: int
    group: dist.ProcessGroup | None

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def is_first_rank(self) -> bool:
        return self.rank_in_group == 0

    @property
    def is_last_rank(self) -> bool:
        return self.rank_in_group == self.world_size - 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sums `x` over the group, in place."""
        if self.world_size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenates every rank's `x` along `dim`, in rank order."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        if x.is_cuda:
            # One contiguous buffer along dim 0 (capturable), then moved to `dim`.
            out = torch.empty((self.world_size, *x.shape), dtype=x.dtype, device=x.device)
            dist.all_gather_into_tensor(out, x, group=self.group)
            return torch.cat(out.unbind(0), dim=dim)
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=dim)

    def broadcast(self, x: torch.Tensor, src: int) -> torch.Tensor:
        """`x` of rank `src` (in-group index) onto every rank, in place."""
        if self.world_size > 1:
            dist.broadcast(x, src=self.ranks[src], group=self.group)
        return x

    def send(self, x: torch.Tensor, dst: int) -> None:
        dist.send(x.contiguous(), dst=self.ranks[dst], group=self.group)

    def recv(self, x: torch.Tensor, src: int) -> torch.Tensor:
        dist.recv(x, src=self.ranks[src], group=self.group)
        return x


_SINGLE = GroupCoordinator(ranks=[0], rank_in_group=0, group=None)
_TP: GroupCoordinator = _SINGLE
_PP: GroupCoordinator = _SINGLE


def init_worker_distributed(
    rank: int,
    world_size: int,
    local_rank: int,
    init_method: str,
    backend: str,
    timeout_s: float = 600.0,
) -> None:
    """Joins the default process group (every rank of one engine; a Ray actor calls this too).

    `timeout_s` bounds every collective wait, so a rank whose peer died fails instead of
    hanging forever (the executor usually notices the death first and ends the rank).
    """
    apply_no_multicast_env()
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )  # fmt: skip


def _rank_groups(tp_size: int, pp_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """(tensor-parallel groups, pipeline groups) as lists of global ranks."""
    tp_groups = [list(range(s * tp_size, (s + 1) * tp_size)) for s in range(pp_size)]
    pp_groups = [list(range(t, tp_size * pp_size, tp_size)) for t in range(tp_size)]
    return tp_groups, pp_groups


def initialize_model_parallel(tp_size: int, pp_size: int = 1) -> None:
    """Creates the TP and PP groups over the initialised default group (world = tp x pp).
    Every rank must call it (group creation is collective)."""
    global _TP, _PP
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != tp_size * pp_size:
        raise ValueError(f"world size {world} != tensor_parallel_size {tp_size} x "
                         f"pipeline_parallel_size {pp_size}")
    tp_groups, pp_groups = _rank_groups(tp_size, pp_size)
    for ranks in tp_groups:
        group = dist.new_group(ranks)
        if rank in ranks:
            _TP = GroupCoordinator(ranks, ranks.index(rank), group)
    for ranks in pp_groups:
        group = dist.new_group(ranks)
        if rank in ranks:
            _PP = GroupCoordinator(ranks, ranks.index(rank), group)
    if dist.get_backend() == "nccl":
        # Creates the communicators now: never lazily inside a CUDA graph capture.
        probe = torch.ones(1, device=torch.device("cuda", torch.cuda.current_device()))
        _TP.all_reduce(probe)
        _PP.all_reduce(probe)
        torch.cuda.synchronize()


def destroy_model_parallel() -> None:
    global _TP, _PP
    _TP = _PP = _SINGLE
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def get_tp_group() -> GroupCoordinator:
    return _TP


def get_pp_group() -> GroupCoordinator:
    return _PP


def get_tensor_model_parallel_world_size() -> int:
    """Number of ranks that shard each layer (1 without torch.distributed)."""
    return _TP.world_size


def get_tensor_model_parallel_rank() -> int:
    """This process' rank in its tensor-parallel group (0 without torch.distributed)."""
    return _TP.rank_in_group


def get_pipeline_model_parallel_world_size() -> int:
    """Number of pipeline stages."""
    return _PP.world_size


def get_pipeline_model_parallel_rank() -> int:
    """This process' stage (0: holds the embedding; last: the final norm and LM head)."""
    return _PP.rank_in_group


def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sums `x` over the tensor-parallel ranks (in place when distributed)."""
    return _TP.all_reduce(x)


def tensor_model_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenates every tensor-parallel rank's `x` along `dim`, rank order."""
    return _TP.all_gather(x, dim)


def send_tensor_dict(tensors: dict[str, torch.Tensor]) -> None:
    """Sends this stage's intermediate tensors to the next stage (sorted by name; the
    receiver knows their shapes from the step, so nothing but the data travels)."""
    pp = _PP
    for name in sorted(tensors):
        pp.send(tensors[name], pp.rank_in_group + 1)


def recv_tensor_dict(empty: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fills `empty` (preallocated, the sender's shapes) from the previous stage."""
    pp = _PP
    for name in sorted(empty):
        pp.recv(empty[name], pp.rank_in_group - 1)
    return empty


def make_layer_range(num_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    """[start, end) of the decoder layers on stage `pp_rank`; earlier stages take the
    remainder one layer each (stage 0 also holds the embedding, the last the LM head)."""
    if pp_size > num_layers:
        raise ValueError(f"pipeline_parallel_size={pp_size} exceeds the model's {num_layers} "
                         "layers; lower --pipeline-parallel-size")
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return start, start + base + (1 if pp_rank < extra else 0)


def get_pp_layer_range(num_layers: int) -> tuple[int, int]:
    return make_layer_range(num_layers, _PP.rank_in_group, _PP.world_size)
