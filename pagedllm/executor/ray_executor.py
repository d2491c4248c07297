"""The Ray executor (`--distributed-executor-backend ray`): one Ray actor per rank.

Same interface and wire protocol as the multiprocess executor, whose messaging it inherits:
each step is encoded once with msgspec and published once on a ZMQ PUB socket, here over
TCP on the driver's node IP so ranks on other nodes receive it too; only the output rank
answers. Ray places and starts the actors and reports their deaths; it never carries a step.

Start-up: join Ray (`ray_utils.connect`: the caller's session, RAY_ADDRESS, a cluster `ray
start` left on this machine, else a local instance), place the workers (`place_workers`: the
caller's placement group, else STRICT_PACK per tensor-parallel group), start one `RayWorker`
per bundle with the no-multicast environment, give every rank of a node the same visible
GPUs, rendezvous torch.distributed over TCP at rank 0's node, load, then start each rank's
serve loop.

Failure is fast: every wait polls in short slices and, when nothing arrived, asks Ray
whether a serve call has ended (it ends, with an error, when its actor dies), so a killed
actor raises `WorkerDiedError` within a fraction of a second. `shutdown` kills every actor,
removes the placement groups made here and stops a local Ray instance this executor started.
"""

from __future__ import annotations

import atexit
import logging
import time
import weakref
from typing import Any

import msgspec
import zmq

from pagedllm import envs
from pagedllm.config import EngineConfig
from pagedllm.executor import messages as m
from pagedllm.executor import ray_utils
from pagedllm.executor.base import Executor
from pagedllm.executor.multiproc import MultiprocExecutor, WorkerDiedError
from pagedllm.executor.ray_worker import RayWorker
from pagedllm.executor.worker_proc import WorkerAddresses

logger = logging.getLogger(__name__)

_FLAG = "--distributed-executor-backend"
_SETUP_POLL_S = 0.2


def _tp_groups_share_nodes(nodes: list[str], tp_size: int) -> bool:
    return all(len(set(nodes[i : i + tp_size])) == 1 for i in range(0, len(nodes), tp_size))


def _visible_devices(nodes: list[str], gpus: list[list[str]]) -> tuple[list[list[str]], list[int]]:
    """Per rank: every GPU our actors hold on its node (sorted), and its index there."""
    per_node: dict[str, list[str]] = {}
    for node, ids in zip(nodes, gpus, strict=True):
        per_node.setdefault(node, []).extend(ids)
    for node in per_node:
        per_node[node] = sorted(set(per_node[node]), key=lambda g: (len(g), g))
    visible = [per_node[node] for node in nodes]
    local = [per_node[node].index(ids[0]) for node, ids in zip(nodes, gpus, strict=True)]
    return visible, local


class RayExecutor(MultiprocExecutor):
    """Workers are Ray actors; steps, RPCs and answers use the inherited ZMQ messaging."""

    def __init__(self, config: EngineConfig) -> None:
        Executor.__init__(self, config)
        self.world_size = config.parallel_config.world_size
        self._closed = False
        self._actors: list[Any] = []
        self._serve_refs: list[Any] = []
        self._pids: list[int] = []
        self._placement: ray_utils.Placement | None = None
        cpu_workers = 0 if config.device_config.device == "cuda" else self.world_size
        self._connection = ray_utils.connect(_FLAG, min_cpus=cpu_workers)
        self._ray = ray_utils.import_ray(_FLAG)
        atexit.register(_shutdown_ref, weakref.ref(self))
        try:
            self._init_channels(self._ray.util.get_node_ip_address())
            self._start_actors()
        except BaseException:
            self.shutdown()
            raise

    # ---- start-up ----
    def _init_channels(self, host: str) -> None:
        """The PUB (to every rank) and PULL (answers) sockets, on TCP at `host`."""
        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.XPUB)
        self._pub.setsockopt(zmq.XPUB_VERBOSE, 1)
        self._pub.setsockopt(zmq.SNDHWM, 0)
        self._pub.setsockopt(zmq.LINGER, 0)
        pub_port = self._pub.bind_to_random_port(f"tcp://{host}")
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.RCVHWM, 0)
        self._pull.setsockopt(zmq.LINGER, 0)
        pull_port = self._pull.bind_to_random_port(f"tcp://{host}")
        self._broadcast = f"tcp://{host}:{pub_port}"
        self._results = f"tcp://{host}:{pull_port}"
        self._encoder = msgspec.msgpack.Encoder()
        self._decoders = {
            m.FROM_WORKER_READY: msgspec.msgpack.Decoder(m.WorkerReady),
            m.FROM_WORKER_OUTPUT: msgspec.msgpack.Decoder(m.StepResult),
            m.FROM_WORKER_RPC: msgspec.msgpack.Decoder(m.RpcResult),
            m.FROM_WORKER_ERROR: msgspec.msgpack.Decoder(m.WorkerError),
        }
        self._next_seq = 0
        self._flushed_seq = -1
        self._outputs: dict[int, Any] = {}
        self._rpc_results: dict[int, dict[int, m.RpcResult]] = {}
        self._next_call = 0
        self._ready: dict[int, int] = {}

    def _create_actors(self) -> None:
        ray = self._ray
        cfg = self.config
        pc = cfg.parallel_config
        device = cfg.device_config.device
        self._placement = ray_utils.place_workers(
            pc.tensor_parallel_size, pc.pipeline_parallel_size, device
        )
        remote = ray.remote(RayWorker)
        resources = {"num_gpus": 1, "num_cpus": 0} if device == "cuda" else {"num_cpus": 1}
        for pg, bundle in self._placement.slots:
            self._actors.append(remote.options(
                scheduling_strategy=ray_utils.scheduling_strategy(pg, bundle),
                runtime_env={"env_vars": ray_utils.actor_env_vars()},
                **resources,
            ).remote())  # fmt: skip

    def _start_actors(self) -> None:
        cfg = self.config
        pc = cfg.parallel_config
        device = cfg.device_config.device
        deadline = time.monotonic() + envs.worker_start_timeout_s()
        self._create_actors()
        infos = self._wait_all([a.node_info.remote() for a in self._actors], deadline, "start")
        nodes = [node for node, _, _ in infos]
        if not _tp_groups_share_nodes(nodes, pc.tensor_parallel_size):
            raise ValueError(
                "the placement group spreads a tensor-parallel group over several nodes; give "
                f"each group of --tensor-parallel-size {pc.tensor_parallel_size} bundles one node"
            )
        self._pids = self._wait_all([a.pid.remote() for a in self._actors], deadline, "start")
        if device == "cuda":
            visible, local = _visible_devices(nodes, [gpus for _, _, gpus in infos])
        else:
            visible, local = [None] * self.world_size, [0] * self.world_size
        port = self._wait_all([self._actors[0].free_port.remote()], deadline, "start")[0]
        addresses = WorkerAddresses(self._broadcast, self._results, f"tcp://{infos[0][1]}:{port}")
        backend = "nccl" if device == "cuda" else "gloo"
        setups = [
            actor.setup.remote(rank, cfg, addresses, backend, visible[rank], local[rank],
                               envs.distributed_timeout_s())
            for rank, actor in enumerate(self._actors)
        ]  # fmt: skip
        self._wait_all(setups, deadline, "load the model")
        self._serve_refs = [a.serve.remote() for a in self._actors]
        self._wait_subscribed(deadline)
        logger.info("%d Ray workers ready on %d node(s) (pids %s), %s backend", self.world_size,
                    len(set(nodes)), self._pids, backend)  # fmt: skip

    def _wait_all(self, refs: list[Any], deadline: float, what: str) -> list[Any]:
        """Every result of `refs`; the first failure (an actor died or raised) raises."""
        ray = self._ray
        pending = list(refs)
        while pending:
            if time.monotonic() > deadline:
                raise WorkerDiedError(
                    f"Ray workers did not {what} within {envs.worker_start_timeout_s():.0f} s"
                )
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=_SETUP_POLL_S)
            for ref in done:
                try:
                    ray.get(ref)
                except Exception as e:
                    rank = refs.index(ref) if len(refs) > 1 else 0
                    raise WorkerDiedError(f"Ray worker rank {rank} failed to {what}: {e}") from e
        return ray.get(refs)

    def _wait_subscribed(self, deadline: float) -> None:
        """Until every rank's SUB socket has joined (a step published earlier is lost)."""
        subscribed = 0
        while subscribed < self.world_size:
            if time.monotonic() > deadline:
                raise WorkerDiedError("Ray workers did not subscribe to the step broadcast")
            if self._pub.poll(0):
                if self._pub.recv()[:1] == b"\x01":
                    subscribed += 1
                continue
            self._poll_once()

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the actors, rank order (on their nodes)."""
        return list(self._pids)

    # ---- liveness (used by the inherited waits) ----
    def _check_alive(self) -> None:
        if not self._serve_refs:
            return
        ray = self._ray
        done, _ = ray.wait(self._serve_refs, num_returns=1, timeout=0)
        if not done:
            return
        rank = self._serve_refs.index(done[0])
        try:
            ray.get(done[0])
            reason = "its serve loop returned"
        except Exception as e:
            reason = f"{type(e).__name__}: {e}".splitlines()[0]
        raise WorkerDiedError(f"Ray worker actor of rank {rank} died: {reason}")

    # ---- shutdown ----
    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        ray = self._ray if hasattr(self, "_ray") else None
        try:
            if ray is not None and ray.is_initialized():
                self._stop_actors(ray)
        finally:
            if hasattr(self, "_ctx"):
                self._ctx.destroy(linger=0)
            self._connection.release()

    def _stop_actors(self, ray: Any) -> None:
        """SHUTDOWN to every rank, a short grace, then kill whatever actor is left."""
        if self._serve_refs:
            try:
                self._pub.send_multipart([m.TO_WORKER_SHUTDOWN, b""])
            except zmq.ZMQError:
                pass
            done, _ = ray.wait(self._serve_refs, num_returns=1, timeout=0)
            grace = 0.2 if done else 5.0  # a dead rank leaves the others in a collective
            ray.wait(self._serve_refs, num_returns=len(self._serve_refs), timeout=grace)
        for actor in self._actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass
        self._actors = []
        if self._placement is not None:
            self._placement.remove_created()


def _shutdown_ref(ref: weakref.ref) -> None:
    executor = ref()
    if executor is not None:
        executor.shutdown()
