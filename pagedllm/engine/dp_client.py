"""The front-end's handle on all engine cores: D data-parallel replicas behind one API server.

`DPEngineClient` starts one `ReplicaClient` per replica (each a full engine: scheduler,
executor, its own GPUs), routes every new request to the least-loaded live replica
(`LoadBalancer`), remembers which replica owns each request so aborts reach it, and feeds
the balancer from each replica's stats. With `data_parallel_size` 1 it is a single replica
and routing is trivial; the server always goes through it.

Invariants:
- a request (with all its n > 1 children) lives on exactly one replica, from add to release;
- a dead replica is never chosen again, and `requests_on(i)` names what died with it;
- sending never blocks; nothing here reads sockets (the caller runs one reader per replica).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import torch

from pagedllm.config import EngineConfig
from pagedllm.engine.client import EngineCoreProcClient, EngineDeadError, ReplicaClient
from pagedllm.engine.data_parallel import replica_env
from pagedllm.engine.load_balancer import LoadBalancer
from pagedllm.engine.protocol import EngineCoreOutputs, EngineCoreReady, EngineCoreRequest

logger = logging.getLogger(__name__)

# --data-parallel-backend -> how one replica is started and reached. A Ray backend adds a
# ReplicaClient over a Ray actor here; nothing else changes.
ReplicaFactory = Callable[..., ReplicaClient]


def _ray_replica_client(config: EngineConfig, **kwargs) -> ReplicaClient:
    from pagedllm.engine.ray_replica import RayEngineCoreClient  # Ray is an optional extra

    return RayEngineCoreClient(config, **kwargs)


REPLICA_CLIENTS: dict[str, ReplicaFactory] = {"mp": EngineCoreProcClient,
                                              "ray": _ray_replica_client}


def _num_visible_gpus(config: EngineConfig) -> int:
    return torch.cuda.device_count() if config.device_config.device == "cuda" else 0


class DPEngineClient:
    """Routes requests over `data_parallel_size` engine-core replicas."""

    def __init__(self, config: EngineConfig, log_level: str = "INFO") -> None:
        parallel = config.parallel_config
        backend = parallel.data_parallel_backend
        factory = REPLICA_CLIENTS.get(backend)
        if factory is None:
            raise NotImplementedError(
                f"--data-parallel-backend {backend} is not implemented; use "
                + " or ".join(sorted(REPLICA_CLIENTS))
            )
        num_gpus = _num_visible_gpus(config) if backend == "mp" else 0
        threads = torch.get_num_threads()
        # Ray gives each replica actor its own GPUs and threads: no environment to narrow.
        envs = [replica_env(config, i, num_gpus, threads) if backend == "mp" else {}
                for i in range(parallel.data_parallel_size)]
        self.replicas: list[ReplicaClient] = [
            factory(config, log_level=log_level, engine_index=i, env=env)
            for i, env in enumerate(envs)
        ]
        if len(self.replicas) > 1:
            logger.info("data parallelism: %d engine-core replicas (%s backend); %s", len(envs),
                        backend, "; ".join(f"engine {i}: {env}" for i, env in enumerate(envs)))
        self.balancer = LoadBalancer(len(self.replicas))
        self._owner: dict[str, int] = {}  # external request id -> replica index

    @property
    def num_replicas(self) -> int:
        return len(self.replicas)

    # ---- lifecycle ----
    def start(self) -> None:
        """Starts every replica at once (they load their models in parallel)."""
        try:
            for r in self.replicas:
                r.start()
        except BaseException:
            self.shutdown()  # none left half-started
            raise

    async def wait_ready(self, timeout: float = 600.0) -> list[EngineCoreReady]:
        """Every replica's handshake. The first failure is raised at once, without waiting for
        the other replicas to finish loading (the caller shuts them all down)."""
        tasks = [asyncio.ensure_future(r.wait_ready(timeout)) for r in self.replicas]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for t in tasks:
                t.cancel()
        for i, t in enumerate(tasks):
            if t.done() and not t.cancelled() and t.exception() is not None:
                err = t.exception()
                if self.num_replicas > 1 and isinstance(err, EngineDeadError):
                    raise EngineDeadError(f"data-parallel engine {i}: {err}") from err
                raise err
        return [t.result() for t in tasks]

    def shutdown(self) -> None:
        """Stops every replica: all are asked first, so they wind down together."""
        for r in self.replicas:
            r.begin_shutdown()
        for r in self.replicas:
            r.shutdown()

    # ---- health ----
    def is_alive(self, index: int) -> bool:
        return self.balancer.replicas[index].alive and self.replicas[index].is_alive()

    def all_alive(self) -> bool:
        return all(self.is_alive(i) for i in range(self.num_replicas))

    def mark_dead(self, index: int) -> None:
        self.balancer.mark_dead(index)

    # ---- requests ----
    def check_rank(self, rank: int | None) -> None:
        """Refuses a pinned replica (vLLM's data_parallel_rank) that does not exist."""
        if rank is not None and not 0 <= rank < self.num_replicas:
            raise ValueError(
                f"data_parallel_rank {rank} is out of range: this server runs "
                f"{self.num_replicas} data-parallel replica(s), ranks 0..{self.num_replicas - 1}"
            )

    def add_requests(self, external_id: str, requests: list[EngineCoreRequest],
                     rank: int | None = None) -> int:
        """Sends one external request's engine-core requests to the least-loaded replica, or
        to replica `rank` when the caller pins one (checked with `check_rank` first)."""
        index = self.balancer.pick() if rank is None else rank
        self._owner[external_id] = index
        replica = self.replicas[index]
        for req in requests:
            replica.add_request(req)
        self.balancer.on_routed(index, len(requests))
        return index

    def owner_of(self, external_id: str) -> int | None:
        return self._owner.get(external_id)

    def abort(self, external_id: str, core_ids: list[str]) -> None:
        """Aborts engine-core requests of `external_id` on the replica that owns it."""
        index = self._owner.get(external_id)
        if index is not None and core_ids and self.is_alive(index):
            self.replicas[index].abort_requests(core_ids)

    def abort_on(self, index: int, core_ids: list[str]) -> None:
        if core_ids and self.is_alive(index):
            self.replicas[index].abort_requests(core_ids)

    def release(self, external_id: str) -> None:
        """The request is done (finished, failed or aborted): forget its owner."""
        self._owner.pop(external_id, None)

    def requests_on(self, index: int) -> list[str]:
        """External ids of the requests replica `index` owns now."""
        return [eid for eid, i in self._owner.items() if i == index]

    def record_outputs(self, index: int, outputs: EngineCoreOutputs) -> None:
        if outputs.scheduler_stats is not None:
            self.balancer.on_stats(index, outputs.scheduler_stats, outputs.num_requests_received)
