"""parallel_state: identity at world size 1, real collectives over a 2-rank gloo group."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pagedllm.distributed import parallel_state as ps


def test_single_process_is_identity() -> None:
    assert ps.get_tensor_model_parallel_world_size() == 1
    assert ps.get_tensor_model_parallel_rank() == 0
    x = torch.randn(3, 4)
    assert ps.tensor_model_parallel_all_reduce(x) is x
    assert ps.tensor_model_parallel_all_gather(x, dim=0) is x


def _worker(rank: int, world: int, port: int, results: dict) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x = torch.full((2, 3), float(rank + 1))
        reduced = ps.tensor_model_parallel_all_reduce(x.clone())
        gathered = ps.tensor_model_parallel_all_gather(x, dim=-1)
        results[rank] = (
            ps.get_tensor_model_parallel_rank(),
            ps.get_tensor_model_parallel_world_size(),
            reduced,
            gathered,
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rank_collectives() -> None:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(2, _free_port(), results), nprocs=2, join=True)
        results = dict(results)
    for rank in range(2):
        got_rank, world, reduced, gathered = results[rank]
        assert (got_rank, world) == (rank, 2)
        torch.testing.assert_close(reduced, torch.full((2, 3), 3.0))
        expected = torch.cat([torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)], dim=-1)
        torch.testing.assert_close(gathered, expected)
