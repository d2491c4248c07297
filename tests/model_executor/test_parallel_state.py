"""parallel_state: identity in one process; TP and PP groups and their collectives over gloo."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from pagedllm.distributed import parallel_state as ps
from tests.entrypoints.remote_server import free_port


def test_single_process_is_identity() -> None:
    assert ps.get_tensor_model_parallel_world_size() == 1
    assert ps.get_tensor_model_parallel_rank() == 0
    assert ps.get_pipeline_model_parallel_world_size() == 1
    x = torch.randn(3, 4)
    assert ps.tensor_model_parallel_all_reduce(x) is x
    assert ps.tensor_model_parallel_all_gather(x, dim=0) is x


def test_layer_ranges_cover_every_layer_once() -> None:
    assert [ps.make_layer_range(30, r, 2) for r in range(2)] == [(0, 15), (15, 30)]
    assert [ps.make_layer_range(7, r, 3) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]
    assert ps._rank_groups(2, 2) == ([[0, 1], [2, 3]], [[0, 2], [1, 3]])
    with pytest.raises(ValueError, match="pipeline_parallel_size=3 exceeds"):
        ps.make_layer_range(2, 0, 3)


def _worker(rank: int, world: int, port: int, results: dict) -> None:
    ps.init_worker_distributed(rank, world, rank, f"tcp://127.0.0.1:{port}", "gloo", 60)
    try:
        # Layout 1: both ranks shard layers (TP=2).
        ps.initialize_model_parallel(2, 1)
        x = torch.full((2, 3), float(rank + 1))
        reduced = ps.tensor_model_parallel_all_reduce(x.clone())
        gathered = ps.tensor_model_parallel_all_gather(x, dim=-1)
        tp = (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size())
        # Layout 2: two pipeline stages (PP=2): stage 0 sends, stage 1 broadcasts back.
        ps.initialize_model_parallel(1, 2)
        pp_rank = ps.get_pipeline_model_parallel_rank()
        if pp_rank == 0:
            ps.send_tensor_dict({"hidden_states": torch.arange(4.0), "residual": -torch.ones(4)})
            received = None
        else:
            received = ps.recv_tensor_dict({"hidden_states": torch.empty(4),
                                            "residual": torch.empty(4)})
        token = torch.tensor([7 if pp_rank == 1 else 0])
        ps.get_pp_group().broadcast(token, src=1)
        results[rank] = (tp, reduced, gathered, pp_rank, received, int(token))
    finally:
        ps.destroy_model_parallel()


def test_two_rank_groups_and_collectives() -> None:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(2, free_port(), results), nprocs=2, join=True)
        results = dict(results)
    expected = torch.cat([torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)], dim=-1)
    for rank in range(2):
        tp, reduced, gathered, pp_rank, received, token = results[rank]
        assert tp == (rank, 2)
        torch.testing.assert_close(reduced, torch.full((2, 3), 3.0))
        torch.testing.assert_close(gathered, expected)
        assert pp_rank == rank and token == 7
    torch.testing.assert_close(results[1][4]["hidden_states"], torch.arange(4.0))
    torch.testing.assert_close(results[1][4]["residual"], -torch.ones(4))
