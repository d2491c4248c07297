"""Data-parallel replicas as Ray actors (`--data-parallel-backend ray`).

`RayEngineCoreClient` is the `ReplicaClient` of one replica whose engine core runs in a Ray
actor instead of a local child process: the same ZMQ sockets and messages as
`EngineCoreProcClient` (over TCP on this node's IP, so the actor may sit on any node), the
same handshake, liveness and shutdown logic; only the start differs. Each replica gets its
own placement group holding its workers' bundles (STRICT_PACK: a tensor-parallel group on
one node; PACK when pipeline stages may spread), and the engine-core actor runs inside it,
so the replica's `RayExecutor` reuses that group for its worker actors. A replica of one
worker runs it in the engine-core actor itself, which then holds the bundle's GPU (or CPU).

Ray kills the actors when this process dies (they are owned by it); shutdown kills them,
removes the placement group and releases the Ray session (the last user stops a local
instance this process started).
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import weakref
from typing import Any

from pagedllm.config import EngineConfig
from pagedllm.engine.client import EngineCoreProcClient, _shutdown_ref
from pagedllm.executor import ray_utils
from pagedllm.executor.base import resolve_backend_name

logger = logging.getLogger(__name__)

_FLAG = "--data-parallel-backend"


class RayEngineCore:
    """The actor: one engine core behind the front-end's sockets (`ray.remote` wraps it)."""

    def run(self, config: EngineConfig, input_address: str, output_address: str,
            log_level: str, engine_index: int) -> int:  # fmt: skip
        """Serves until SHUTDOWN (returns 0) or a failure it reported (returns 1)."""
        logging.basicConfig(
            level=log_level,
            format=f"%(levelname)s %(asctime)s [EngineCore_{engine_index} pid=%(process)d] "
                   "%(name)s: %(message)s",
        )  # fmt: skip
        from pagedllm.engine.core_proc import serve_engine_core

        return serve_engine_core(config, input_address, output_address)


class _ActorProcess:
    """The `multiprocessing.Process` calls the base client makes, over the actor: alive
    while its `run` call is pending (the call fails the moment the actor dies)."""

    def __init__(self, ray: Any, actor: Any, run_ref: Any) -> None:
        self._ray, self._actor, self._ref = ray, actor, run_ref

    def is_alive(self) -> bool:
        done, _ = self._ray.wait([self._ref], timeout=0)
        return not done

    @property
    def exitcode(self) -> int | None:
        if self.is_alive():
            return None
        try:
            return int(self._ray.get(self._ref))
        except Exception:  # the actor died (killed, OOM, node lost)
            return -1

    def join(self, timeout: float | None = None) -> None:
        self._ray.wait([self._ref], timeout=timeout)

    def terminate(self) -> None:
        try:
            self._ray.kill(self._actor, no_restart=True)
        except Exception:  # already gone
            pass

    kill = terminate


def replica_config(config: EngineConfig) -> EngineConfig:
    """A replica's config: more than one worker runs on Ray actors, in the replica's
    placement group (EngineArgs refuses mp with the Ray DP backend)."""
    pc = config.parallel_config
    if pc.distributed_executor_backend is None and pc.world_size > 1:
        pc = dataclasses.replace(pc, distributed_executor_backend="ray")
    return dataclasses.replace(config, parallel_config=pc)


class RayEngineCoreClient(EngineCoreProcClient):
    """One data-parallel replica whose engine core is a Ray actor."""

    def __init__(self, config: EngineConfig, log_level: str = "INFO", engine_index: int = 0,
                 env: dict[str, str] | None = None) -> None:  # fmt: skip
        # `env` narrows a local child's GPUs; Ray assigns each actor its own instead.
        super().__init__(replica_config(config), log_level, engine_index, None)
        self._connection: ray_utils.RayConnection | None = None
        self._placement_group: Any = None
        self._actor: Any = None

    def start(self) -> None:
        """Joins Ray, binds both sockets on this node's IP and starts the actor (returns at
        once: the placement and the model load proceed while the caller works)."""
        cfg = self.config
        pc = cfg.parallel_config
        device = cfg.device_config.device
        total = pc.data_parallel_size * pc.world_size
        self._connection = ray_utils.connect(_FLAG, min_cpus=0 if device == "cuda" else total)
        ray = ray_utils.import_ray(_FLAG)
        if self.engine_index == 0:
            ray_utils.check_cluster_capacity(
                total, device, f"--data-parallel-size {pc.data_parallel_size} x "
                f"--tensor-parallel-size {pc.tensor_parallel_size} x "
                f"--pipeline-parallel-size {pc.pipeline_parallel_size}",
            )  # fmt: skip
        host = ray.util.get_node_ip_address()
        self.input_address = f"tcp://{host}:*"
        self.output_address = f"tcp://{host}:*"
        self._bind_sockets()
        self._actor = self._create_actor(ray)
        run_ref = self._actor.run.remote(cfg, self.input_address, self.output_address,
                                         self.log_level, self.engine_index)  # fmt: skip
        self.proc = _ActorProcess(ray, self._actor, run_ref)
        atexit.register(_shutdown_ref, weakref.ref(self))

    def _create_actor(self, ray: Any) -> Any:
        from ray.util.placement_group import placement_group

        cfg = self.config
        pc = cfg.parallel_config
        bundle = ray_utils.worker_bundle(cfg.device_config.device)
        strategy = "STRICT_PACK" if pc.pipeline_parallel_size == 1 else "PACK"
        self._placement_group = placement_group(
            [dict(bundle) for _ in range(pc.world_size)], strategy=strategy
        )
        if resolve_backend_name(pc) == "uni":  # the worker runs in the engine core
            resources = ({"num_gpus": 1, "num_cpus": 0} if "GPU" in bundle
                         else {"num_cpus": 1})  # fmt: skip
        else:  # its RayExecutor places the worker actors in the group's bundles
            resources = {"num_gpus": 0, "num_cpus": 0}
        return ray.remote(RayEngineCore).options(
            scheduling_strategy=ray_utils.scheduling_strategy(self._placement_group, 0),
            runtime_env={"env_vars": ray_utils.actor_env_vars()},
            name=f"pagedllm-EngineCore_{self.engine_index}-{os.getpid()}",
            **resources,
        ).remote()  # fmt: skip

    def shutdown(self, timeout: float = 5.0) -> None:
        """The base client's SHUTDOWN / wait / kill, then the actor, its placement group and
        our hold on the Ray session. Idempotent."""
        if self._closed:
            return
        super().shutdown(timeout)
        if self.proc is not None:
            self.proc.terminate()  # an actor whose run returned still idles
        if self._placement_group is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(self._placement_group)
            except Exception:  # the cluster is gone
                pass
            self._placement_group = None
        if self._connection is not None:
            self._connection.release()
