"""The Ray actor that hosts one worker rank (the Ray twin of `worker_proc.run_worker`).

The executor drives each actor with three calls: `node_info` (where Ray put it), `setup`
(devices, torch.distributed over TCP to the driver, the model shard, the two ZMQ sockets) and
`serve`, which runs the same `WorkerProc` loop as a local worker process and returns only on
SHUTDOWN. Steps therefore never travel as Ray calls: they arrive on the executor's ZMQ PUB
socket (msgspec), and the `serve` call's result doubles as the actor's liveness signal (it
completes, with an error, the moment the actor dies).

Nothing initialises CUDA before `setup` has set CUDA_VISIBLE_DEVICES (Ray sets it to the
actor's own GPU before each call; CUDA reads it once, in `init_rank`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from pagedllm.config import EngineConfig
from pagedllm.executor.worker_proc import WorkerAddresses, WorkerProc, init_rank, output_rank

logger = logging.getLogger(__name__)


class RayWorker:
    """One rank. Not created directly: `ray.remote(RayWorker)` with a placement."""

    def __init__(self) -> None:
        self.rank = -1
        self._proc: Any = None
        self._sockets: tuple[Any, Any, Any] | None = None

    def node_info(self) -> tuple[str, str, list[str]]:
        """(node id, node IP, the GPU ids Ray assigned to this actor)."""
        import ray

        ctx = ray.get_runtime_context()
        gpus = [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])]
        return ctx.get_node_id(), ray.util.get_node_ip_address(), gpus

    def pid(self) -> int:
        return os.getpid()

    def free_port(self) -> int:
        """A TCP port free on this actor's node (rank 0 hosts the torch.distributed store)."""
        import socket

        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def setup(
        self,
        rank: int,
        config: EngineConfig,
        addresses: WorkerAddresses,
        backend: str,
        visible_devices: list[str] | None,
        local_rank: int,
        timeout_s: float,
    ) -> None:
        """Joins the groups and loads this rank's shard.

        `visible_devices`: every GPU the executor's actors use on this node, so all ranks of a
        node see the same devices (peer access and IPC work as under the mp backend) and this
        rank uses `cuda:local_rank`; None on CPU.
        """
        if visible_devices is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(visible_devices)
        logging.basicConfig(
            level=os.environ.get("PAGEDLLM_LOGGING_LEVEL", "INFO"),
            format=f"%(levelname)s %(asctime)s [RayWorker rank={rank} pid=%(process)d] "
                   "%(name)s: %(message)s",
        )  # fmt: skip
        self.rank = rank
        pc = config.parallel_config
        worker = init_rank(rank, local_rank, config, addresses.init_method, backend, timeout_s)
        self._sockets = _connect(addresses)
        is_output = rank == output_rank(pc.tensor_parallel_size, pc.pipeline_parallel_size)
        _, sub, push = self._sockets
        self._proc = WorkerProc(worker, rank, is_output, sub, push)

    def serve(self) -> None:
        """Serves steps and RPCs from the executor until SHUTDOWN; an error is reported on
        the results socket (the executor fails at once) and raised (the call fails)."""
        from pagedllm.executor import messages as m

        assert self._proc is not None and self._sockets is not None
        ctx, sub, push = self._sockets
        try:
            self._proc.run()
        except BaseException as e:
            logger.exception("worker rank %d failed", self.rank)
            self._proc.send(m.FROM_WORKER_ERROR,
                            m.WorkerError(self.rank, f"worker rank {self.rank} failed: "
                                          f"{type(e).__name__}: {e}"))  # fmt: skip
            raise
        finally:
            sub.close(linger=0)
            push.close(linger=2000)
            ctx.term()
            from pagedllm.distributed.parallel_state import destroy_model_parallel

            destroy_model_parallel()


def _connect(addresses: WorkerAddresses) -> tuple[Any, Any, Any]:
    """(context, SUB on the executor's broadcast, PUSH to its results), over TCP."""
    import zmq

    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(addresses.broadcast)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 0)
    push.connect(addresses.results)
    return ctx, sub, push
