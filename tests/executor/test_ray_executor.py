"""The Ray executor on CPU (gloo, CPU actors, the local Ray instance the engine starts).

One local Ray instance for the whole module (Ray's start-up is the cost): the module's
engine starts it, a second engine joins it for the kill test, and the last test checks that
the first engine's shutdown stops everything. They run in file order.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.distributed.parallel_state import NO_MULTICAST_ENV
from pagedllm.executor.multiproc import WorkerDiedError
from pagedllm.model_executor.loader.testing import build_random_hf_model_dir
from tests.model_executor.conftest import tiny_config


@pytest.fixture(scope="module", autouse=True)
def _one_ray_module_at_a_time(ray_exclusive):
    """Before any Ray starts here: see `ray_exclusive` in tests/conftest.py."""
    yield


PROMPTS = [
    {"prompt_token_ids": [1, 5, 9, 33, 7]},
    {"prompt_token_ids": [3, 4, 100, 200, 17, 18, 19, 250, 2]},
    {"prompt_token_ids": [11, 12]},
]
GREEDY = SamplingParams(max_tokens=12, temperature=0, logprobs=3, ignore_eos=True)
_RAY_PROCESS_NAMES = ("raylet", "gcs_server", "ray::", "default_worker", "dashboard")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    return build_random_hf_model_dir(
        str(tmp_path_factory.mktemp("ray") / "llama"), tiny_config("LlamaForCausalLM"), seed=3
    )


@pytest.fixture(scope="module")
def reference(tiny_llama):
    """Greedy outputs of the one-process engine."""
    llm = LLM(tiny_llama, skip_tokenizer_init=True, kv_cache_space=0.05)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    llm.llm_engine.engine_core.shutdown()
    return outs


@pytest.fixture(scope="module")
def ray_llm(tiny_llama):
    """TP=2 over two Ray CPU actors; starts (and at shutdown stops) a local Ray instance
    with room for a second such engine (PAGEDLLM_RAY_NUM_CPUS)."""
    import ray

    assert not ray.is_initialized()
    mp = pytest.MonkeyPatch()
    mp.setenv("PAGEDLLM_RAY_NUM_CPUS", "4")
    llm = LLM(tiny_llama, skip_tokenizer_init=True, kv_cache_space=0.05,
              tensor_parallel_size=2, distributed_executor_backend="ray")  # fmt: skip
    mp.undo()
    yield llm
    llm.llm_engine.engine_core.shutdown()


def _ray_children() -> list[psutil.Process]:
    """Ray's processes below this one (a local instance's GCS, raylet, workers)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            text = child.name() + " " + " ".join(child.cmdline())
        except psutil.Error:
            continue
        if any(name in text for name in _RAY_PROCESS_NAMES):
            found.append(child)
    return found


def _wait_gone(pids: list[int], timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p)
                 and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return []
        time.sleep(0.2)
    return alive


def test_ray_tp2_matches_one_process(ray_llm, reference):
    outs = ray_llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    for got, want in zip(outs, reference, strict=True):
        g, w = got.outputs[0], want.outputs[0]
        assert g.token_ids == w.token_ids and len(g.token_ids) == GREEDY.max_tokens
        for g_pos, w_pos in zip(g.logprobs, w.logprobs, strict=True):
            assert g_pos.keys() == w_pos.keys()
            for tok in w_pos:
                assert abs(g_pos[tok].logprob - w_pos[tok].logprob) < 1e-4


def test_ray_workers_are_actors_with_no_multicast_env(ray_llm):
    import ray

    executor = ray_llm.llm_engine.engine_core.executor
    assert type(executor).__name__ == "RayExecutor"
    pids = executor.worker_pids
    assert len(pids) == 2 and os.getpid() not in pids
    # Actors of the local instance, placed in a placement group made for them.
    assert ray.is_initialized() and ray.cluster_resources().get("CPU", 0) >= 2
    tables = ray.util.placement_group_table()
    assert any(t["state"] == "CREATED" and len(t["bundles"]) == 2 for t in tables.values())
    for pid in pids:
        env = psutil.Process(pid).environ()
        assert {k: env.get(k) for k in NO_MULTICAST_ENV} == NO_MULTICAST_ENV
    # Every rank answers RPCs, in rank order.
    blocks = executor.collective_rpc("determine_num_blocks")
    assert len(blocks) == 2 and min(blocks) == ray_llm.llm_engine.engine_core.num_blocks


def test_refuses_more_gpus_than_the_cluster_has(ray_llm):
    from pagedllm.executor.ray_utils import check_cluster_capacity

    with pytest.raises(ValueError, match=r"--tensor-parallel-size 4 needs 4 GPUs, but the Ray "
                                         r"cluster has 0"):
        check_cluster_capacity(4, "cuda", "--tensor-parallel-size 4")
    with pytest.raises(ValueError, match="needs 4096 CPUs"):
        check_cluster_capacity(4096, "cpu", "--tensor-parallel-size 4096")
    check_cluster_capacity(4, "cpu", "--tensor-parallel-size 4")  # PAGEDLLM_RAY_NUM_CPUS


def test_ray_backend_without_ray_is_refused(tiny_llama, monkeypatch):
    from pagedllm.engine.arg_utils import EngineArgs
    from pagedllm.executor import ray_utils

    monkeypatch.setattr(ray_utils, "ray_installed", lambda: False)
    args = EngineArgs(model=tiny_llama, tensor_parallel_size=2, distributed_executor_backend="ray")
    with pytest.raises(ValueError) as e:
        args.create_engine_config()
    assert "--distributed-executor-backend ray" in str(e.value)
    assert "pip install 'pagedllm[ray]'" in str(e.value)


def test_killed_actor_fails_the_engine_fast(ray_llm, tiny_llama):
    """A second engine joins the module's Ray instance; SIGKILL one of its actors
    mid-generation: generate raises within seconds, the executor ends its other actor at
    once, later calls raise at once (never hang), and the module's engine and Ray live on."""
    import ray

    llm = LLM(tiny_llama, skip_tokenizer_init=True, kv_cache_space=0.05,
              tensor_parallel_size=2, distributed_executor_backend="ray")  # fmt: skip
    core = llm.llm_engine.engine_core
    pids = core.executor.worker_pids
    assert not set(pids) & set(ray_llm.llm_engine.engine_core.executor.worker_pids)
    params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    killed_at: list[float] = []

    def kill() -> None:
        time.sleep(0.5)
        killed_at.append(time.monotonic())
        os.kill(pids[1], signal.SIGKILL)

    killer = threading.Thread(target=kill)
    killer.start()
    try:
        with pytest.raises(WorkerDiedError, match="rank"):
            while True:
                llm.generate(PROMPTS * 4, params, use_tqdm=False)
        assert killed_at and time.monotonic() - killed_at[0] < 10.0
        t0 = time.monotonic()
        with pytest.raises(WorkerDiedError):
            llm.generate(PROMPTS[:1], params, use_tqdm=False)
        assert time.monotonic() - t0 < 5.0
        assert _wait_gone(pids) == []
    finally:
        killer.join()
        core.shutdown()
    assert ray.is_initialized()  # held by the module's engine, which started it
    assert ray_llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_shutdown_stops_the_local_ray_instance(ray_llm):
    """Runs last: the engine that started the local instance shuts down cleanly and stops
    it, leaving no actor and no Ray process behind."""
    import ray

    pids = ray_llm.llm_engine.engine_core.executor.worker_pids
    assert _ray_children(), "the local Ray instance runs below this process"
    t0 = time.monotonic()
    ray_llm.llm_engine.engine_core.shutdown()
    assert time.monotonic() - t0 < 15.0
    assert not ray.is_initialized()
    assert _wait_gone(pids) == []
    deadline = time.monotonic() + 15.0
    while _ray_children() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [p.name() for p in _ray_children()] == []
