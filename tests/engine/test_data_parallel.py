"""Data parallelism without processes: the router's choice, each replica's devices, refusals."""

from __future__ import annotations

import asyncio
import time

import pytest

from pagedllm.config import (
    CacheConfig,
    DeviceConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)
from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.engine.client import EngineDeadError
from pagedllm.engine.data_parallel import check_gpu_count, replica_env
from pagedllm.engine.dp_client import REPLICA_CLIENTS, DPEngineClient
from pagedllm.engine.load_balancer import LoadBalancer
from pagedllm.engine.protocol import (
    EngineCoreOutputs,
    EngineCoreReady,
    EngineCoreRequest,
    SchedulerStats,
)


def stats(waiting: int, running: int, kv: float = 0.0) -> SchedulerStats:
    return SchedulerStats(num_waiting_reqs=waiting, num_running_reqs=running, kv_cache_usage=kv)


# ---- the router ----
def test_least_loaded_by_waiting_plus_running():
    lb = LoadBalancer(3)
    lb.on_routed(0, 5)
    lb.on_routed(1, 3)
    lb.on_routed(2, 4)
    lb.on_stats(0, stats(waiting=4, running=1), num_received=5)  # load 5
    lb.on_stats(1, stats(waiting=0, running=3), num_received=3)  # load 3
    lb.on_stats(2, stats(waiting=2, running=2), num_received=4)  # load 4
    assert lb.pick() == 1
    # Waiting and running count alike: 1 waiting + 1 running beats 3 running.
    lb.on_stats(2, stats(waiting=1, running=1), num_received=4)
    assert lb.pick() == 2


def test_kv_usage_breaks_ties_then_index():
    lb = LoadBalancer(3)
    for i in range(3):
        lb.on_routed(i, 2)
    lb.on_stats(0, stats(0, 2, kv=0.50), num_received=2)
    lb.on_stats(1, stats(1, 1, kv=0.20), num_received=2)
    lb.on_stats(2, stats(0, 2, kv=0.35), num_received=2)
    assert lb.pick() == 1
    lb.on_stats(1, stats(1, 1, kv=0.50), num_received=2)
    assert lb.pick() == 2
    lb.on_stats(2, stats(0, 2, kv=0.50), num_received=2)
    assert lb.pick() == 0  # all equal: the lowest index


def test_burst_spreads_before_any_stats_come_back():
    """64 requests routed with no stats in between land 32 / 32, not all on one replica."""
    lb = LoadBalancer(2)
    counts = [0, 0]
    for _ in range(64):
        i = lb.pick()
        lb.on_routed(i)
        counts[i] += 1
    assert counts == [32, 32]
    assert [r.num_pending for r in lb.replicas] == [32, 32]


def test_pending_counts_only_what_stats_have_not_seen():
    lb = LoadBalancer(2)
    for _ in range(6):
        lb.on_routed(0)
    lb.on_routed(1, 2)
    # Replica 0's stats have seen 4 of its 6 (2 still in flight); 3 of those 4 are done.
    lb.on_stats(0, stats(waiting=0, running=1), num_received=4)
    assert lb.replicas[0].num_pending == 2 and lb.replicas[0].load == 3
    # Replica 1 has seen both of its 2 and still runs them.
    lb.on_stats(1, stats(waiting=0, running=2), num_received=2)
    assert lb.replicas[1].load == 2
    assert lb.pick() == 1
    # Stats that arrive out of date (older count) never un-see requests.
    lb.on_stats(0, stats(waiting=0, running=0), num_received=3)
    assert lb.replicas[0].num_received == 4 and lb.replicas[0].load == 2
    # n > 1 fans out into n engine requests, all counted.
    lb.on_routed(1, 4)
    assert lb.replicas[1].load == 6 and lb.pick() == 0


def test_dead_replica_is_never_picked():
    lb = LoadBalancer(2)
    lb.on_routed(1, 10)
    lb.mark_dead(0)
    assert lb.pick() == 1
    lb.mark_dead(1)
    with pytest.raises(LookupError):
        lb.pick()


# ---- where replicas run ----
def _config(device: str, dp: int, tp: int = 1, pp: int = 1) -> EngineConfig:
    return EngineConfig(
        model_config=ModelConfig(model="m", model_path="m", model_format="hf", hf_config=None),
        cache_config=CacheConfig(),
        scheduler_config=SchedulerConfig(),
        parallel_config=ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp,
                                       data_parallel_size=dp),
        device_config=DeviceConfig(device),
    )


def test_replica_gpus_follow_index_times_world_size(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cfg = _config("cuda", dp=2)
    assert [replica_env(cfg, i, 2, 16) for i in range(2)] == [
        {"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}]
    cfg = _config("cuda", dp=2, tp=2, pp=2)  # W = 4 GPUs a replica
    assert replica_env(cfg, 1, 8, 16) == {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    assert replica_env(_config("cuda", dp=1), 0, 8, 16) == {}


def test_replica_gpus_respect_the_users_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, 5,GPU-abc,7")
    cfg = _config("cuda", dp=2, tp=2)
    assert replica_env(cfg, 0, 4, 16) == {"CUDA_VISIBLE_DEVICES": "3,5"}
    assert replica_env(cfg, 1, 4, 16) == {"CUDA_VISIBLE_DEVICES": "GPU-abc,7"}
    # Entries past what CUDA reports (fewer real GPUs) are not handed out.
    with pytest.raises(ValueError, match="replica 1"):
        replica_env(cfg, 1, 3, 16)


def test_cpu_replicas_split_the_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cfg = _config("cpu", dp=2)
    assert replica_env(cfg, 1, 0, 16) == {"OMP_NUM_THREADS": "8"}
    assert replica_env(_config("cpu", dp=4), 3, 0, 2) == {"OMP_NUM_THREADS": "1"}
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert replica_env(cfg, 1, 0, 16) == {}


def test_more_gpus_than_visible_is_refused_naming_the_flag():
    check_gpu_count(ParallelConfig(data_parallel_size=2, tensor_parallel_size=2), 4)
    with pytest.raises(ValueError, match="--data-parallel-size 2 x --tensor-parallel-size 2") as e:
        check_gpu_count(ParallelConfig(data_parallel_size=2, tensor_parallel_size=2), 3)
    assert "needs 4 GPUs, but only 3" in str(e.value)
    with pytest.raises(ValueError, match="lower --data-parallel-size"):
        check_gpu_count(ParallelConfig(data_parallel_size=3), 2)


# ---- refusals ----
@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"data_parallel_size": 0}, ValueError, "--data-parallel-size must be an integer >= 1"),
    ({"data_parallel_size": 2, "data_parallel_backend": "ray", "tensor_parallel_size": 2,
      "distributed_executor_backend": "mp"}, ValueError,
     "--data-parallel-backend ray runs each replica's workers as Ray actors"),
    ({"data_parallel_backend": "slurm"}, ValueError, "--data-parallel-backend must be one of"),
])
def test_engine_args_refusals(kwargs, error, match):
    with pytest.raises(error, match=match):
        EngineArgs(**kwargs).create_engine_config()


def test_serve_refuses_mp_workers_under_ray_replicas_naming_the_flag(capsys):
    from pagedllm.entrypoints.openai.api_server import main

    assert main(["-dp", "2", "-tp", "3", "--data-parallel-backend", "ray",
                 "--distributed-executor-backend", "mp"]) == 2
    err = capsys.readouterr().err
    assert "--data-parallel-backend ray" in err and "--distributed-executor-backend ray" in err


def test_offline_llm_refuses_data_parallel():
    from pagedllm import LLM

    with pytest.raises(NotImplementedError, match="pagedllm serve --data-parallel-size 2"):
        LLM(data_parallel_size=2)


# ---- the client over replicas, with in-memory replicas (the ReplicaClient seam) ----
class FakeReplica:
    """A ReplicaClient that records what it is sent."""

    def __init__(self, config, log_level="INFO", engine_index=0, env=None):
        self.engine_index, self.env = engine_index, env
        self.dead_error = None
        self.added: list[str] = []
        self.aborted: list[str] = []
        self.ready_error: BaseException | None = None
        self.ready_delay = 0.0
        self.stopping = self.stopped = False

    def start(self) -> None:
        pass

    async def wait_ready(self, timeout: float = 600.0) -> EngineCoreReady:
        await asyncio.sleep(self.ready_delay)
        if self.ready_error is not None:
            raise self.ready_error
        return EngineCoreReady(num_blocks=10 + self.engine_index, block_size=16,
                               max_model_len=64, pid=0)

    def add_request(self, request) -> None:
        self.added.append(request.request_id)

    def abort_requests(self, request_ids) -> None:
        self.aborted.extend(request_ids)

    def call_utility(self, call_id, method, args) -> None:
        pass

    async def get_output(self):
        await asyncio.Event().wait()

    def is_alive(self) -> bool:
        return True

    def begin_shutdown(self) -> None:
        self.stopping = True

    def shutdown(self, timeout: float = 5.0) -> None:
        assert self.stopping
        self.stopped = True


def _request(rid: str) -> EngineCoreRequest:
    return EngineCoreRequest(rid, [1, 2], None, None, 0.0, pooling=True)


@pytest.fixture
def fake_dp(monkeypatch):
    monkeypatch.setitem(REPLICA_CLIENTS, "mp", FakeReplica)
    return DPEngineClient(_config("cpu", dp=2))


def test_requests_stay_with_their_replica(fake_dp):
    dp = fake_dp
    a, b = dp.replicas
    assert dp.add_requests("x", [_request("0_x"), _request("1_x")]) == 0  # n=2: together
    assert dp.add_requests("y", [_request("y")]) == 1
    assert a.added == ["0_x", "1_x"] and b.added == ["y"]
    dp.abort("x", ["1_x"])
    dp.abort("y", ["y"])
    assert a.aborted == ["1_x"] and b.aborted == ["y"]
    assert dp.requests_on(0) == ["x"] and dp.requests_on(1) == ["y"]
    # Replica 1's stats show y done; replica 0 has seen both of x's and runs them.
    dp.record_outputs(1, EngineCoreOutputs(scheduler_stats=stats(0, 0), num_requests_received=1))
    dp.record_outputs(0, EngineCoreOutputs(scheduler_stats=stats(0, 2), num_requests_received=2))
    dp.release("y")
    assert dp.owner_of("y") is None and dp.add_requests("z", [_request("z")]) == 1
    dp.mark_dead(1)
    assert not dp.all_alive() and dp.add_requests("w", [_request("w")]) == 0
    dp.abort("z", ["z"])  # its replica is dead: nothing is sent there
    assert b.aborted == ["y"]
    dp.shutdown()
    assert a.stopped and b.stopped


def test_one_replica_failing_to_start_fails_at_once(fake_dp):
    dp = fake_dp
    dp.replicas[0].ready_delay = 30.0  # still loading
    dp.replicas[1].ready_error = EngineDeadError("engine core process exited with code 1")

    async def main():
        t0 = time.monotonic()
        with pytest.raises(EngineDeadError, match="data-parallel engine 1: engine core process"):
            await dp.wait_ready()
        return time.monotonic() - t0

    assert asyncio.run(main()) < 5.0
    dp.replicas[0].ready_delay = 0.0
    dp.replicas[1].ready_error = None
    readies = asyncio.run(dp.wait_ready())
    assert [r.num_blocks for r in readies] == [10, 11]
