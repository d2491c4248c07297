"""A worker process: one rank of the engine core's executor, serving steps and RPCs.

`run_worker` is the process entry (multiprocessing spawn target); `init_rank` joins the
groups and loads the shard (any launcher, e.g. a Ray actor, calls it and then drives the
`Worker` directly); `WorkerProc` is the loop over one built `Worker` and its two sockets.

Invariants:
- Every rank receives every message (one SUB socket on the executor's PUB) and runs the same
  calls in the same order, so collectives match; only the output rank (the last pipeline
  stage's tensor-parallel rank 0) sends step outputs. Every rank answers RPCs.
- Steps are resolved in submission order. A step is resolved when a newer one has been
  launched behind it (async scheduling keeps the device busy), when its message says
  `flush`, or on a FLUSH message. Under the pipeline batch queue also as soon as its
  tokens are ready or no message waits: the engine core must not wait for the last stage
  to run the next micro-batch before it learns this one's tokens.
- The process exits when its parent (the engine core) dies, on SHUTDOWN, and after reporting
  any error; SIGINT is left to the parent.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass

import msgspec
import zmq

from pagedllm.config import EngineConfig
from pagedllm.executor import messages as m

logger = logging.getLogger(__name__)

_PARENT_CHECK_S = 0.5


@dataclass(frozen=True, slots=True)
class WorkerAddresses:
    """Where a worker connects: the executor's PUB (messages in) and PULL (answers out)."""

    broadcast: str
    results: str
    init_method: str  # torch.distributed rendezvous


def output_rank(tp_size: int, pp_size: int) -> int:
    """The rank that answers steps: tensor-parallel rank 0 of the last pipeline stage."""
    return (pp_size - 1) * tp_size


def _start_parent_watchdog(parent_pid: int) -> None:
    def watch() -> None:
        while True:
            time.sleep(_PARENT_CHECK_S)
            if os.getppid() != parent_pid:
                os._exit(1)  # the engine core is gone: nobody reads our answers

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


class WorkerProc:
    """Serves one rank: decodes broadcast messages and runs them on `worker`."""

    def __init__(self, worker, rank: int, is_output_rank: bool, sub: zmq.Socket,
                 push: zmq.Socket) -> None:  # fmt: skip
        self.worker = worker
        self.rank = rank
        self.is_output_rank = is_output_rank
        self.sub = sub
        self.push = push
        self.encoder = msgspec.msgpack.Encoder()
        self.step_decoder = msgspec.msgpack.Decoder(m.StepMessage)
        self.rpc_decoder = msgspec.msgpack.Decoder(m.RpcMessage)
        self.pending: deque[tuple[int, object]] = deque()
        self.resolve_early = worker.config.parallel_config.max_concurrent_batches > 1

    def send(self, kind: bytes, message: msgspec.Struct) -> None:
        self.push.send_multipart([kind, self.encoder.encode(message)], copy=False)

    def _resolve_oldest(self) -> None:
        seq, handle = self.pending.popleft()
        out = handle.get()
        if self.is_output_rank:
            self.send(m.FROM_WORKER_OUTPUT, m.StepResult(seq, out))

    def _resolve_ready(self) -> None:
        """Resolves the oldest steps whose tokens are ready, and all of them if no message
        is waiting (nothing else to do)."""
        while self.pending and (self.pending[0][1].ready() or not self.sub.poll(0)):
            self._resolve_oldest()

    def _resolve_all(self) -> None:
        while self.pending:
            self._resolve_oldest()

    def _rpc(self, call: m.RpcMessage) -> None:
        self._resolve_all()
        try:
            result = getattr(self.worker, call.method)(*call.args)
            answer = m.RpcResult(call.call_id, self.rank, result=result)
        except Exception as e:
            logger.exception("rank %d: %s failed", self.rank, call.method)
            answer = m.RpcResult(call.call_id, self.rank, error=f"{type(e).__name__}: {e}")
        self.send(m.FROM_WORKER_RPC, answer)

    def run(self) -> None:
        while True:
            kind, payload = self.sub.recv_multipart()
            if kind == m.TO_WORKER_STEP:
                msg = self.step_decoder.decode(payload)
                bitmask = m.step_grammar_bitmask(msg)
                grammar = (lambda bm=bitmask: bm) if bitmask is not None else None
                handle = self.worker.submit(m.restore_step_message(msg), grammar)
                self.pending.append((msg.seq, handle))
                if msg.flush:
                    self._resolve_all()
                elif self.resolve_early:
                    self._resolve_ready()
                while len(self.pending) > 1:
                    self._resolve_oldest()
            elif kind == m.TO_WORKER_FLUSH:
                self._resolve_all()
            elif kind == m.TO_WORKER_RPC:
                self._rpc(self.rpc_decoder.decode(payload))
            elif kind == m.TO_WORKER_SHUTDOWN:
                return


def _connect(ctx: zmq.Context, addresses: WorkerAddresses) -> tuple[zmq.Socket, zmq.Socket]:
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(addresses.broadcast)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 0)
    push.setsockopt(zmq.LINGER, 5000)
    push.connect(addresses.results)
    return sub, push


def init_rank(
    rank: int, local_rank: int, config: EngineConfig, init_method: str, backend: str,
    timeout_s: float = 600.0,
):
    """Joins the process groups and loads this rank's shard; returns the ready `Worker`.
    What every launcher runs first in a rank (this module's processes, a Ray actor)."""
    from pagedllm.distributed.parallel_state import (
        apply_no_multicast_env,
        init_worker_distributed,
        initialize_model_parallel,
    )
    from pagedllm.worker.worker import Worker

    apply_no_multicast_env()
    pc = config.parallel_config
    init_worker_distributed(rank, pc.world_size, local_rank, init_method, backend, timeout_s)
    initialize_model_parallel(pc.tensor_parallel_size, pc.pipeline_parallel_size)
    if config.device_config.device == "cpu":
        import torch

        # The ranks share the host's cores: no oversubscription of OpenMP threads.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // pc.world_size))
    worker = Worker(config, local_rank=local_rank, rank=rank)
    worker.load_model()
    return worker


def run_worker(
    rank: int,
    local_rank: int,
    config: EngineConfig,
    addresses: WorkerAddresses,
    backend: str,
    parent_pid: int,
    log_level: str = "INFO",
    timeout_s: float = 600.0,
) -> None:
    """Entry point of one worker process: join the groups, load the shard, serve."""
    from pagedllm.distributed.parallel_state import apply_no_multicast_env

    apply_no_multicast_env()
    logging.basicConfig(
        level=log_level,
        format=f"%(levelname)s %(asctime)s [Worker rank={rank} pid=%(process)d] %(name)s: "
               "%(message)s",
    )  # fmt: skip
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _start_parent_watchdog(parent_pid)
    pc = config.parallel_config
    ctx = zmq.Context()
    sub, push = _connect(ctx, addresses)
    encoder = msgspec.msgpack.Encoder()
    try:
        worker = init_rank(rank, local_rank, config, addresses.init_method, backend, timeout_s)
        push.send_multipart([m.FROM_WORKER_READY, encoder.encode(m.WorkerReady(rank, os.getpid()))])
        is_output = rank == output_rank(pc.tensor_parallel_size, pc.pipeline_parallel_size)
        WorkerProc(worker, rank, is_output, sub, push).run()
    except BaseException as e:  # report, then die: the executor fails the engine at once
        logger.exception("worker rank %d failed", rank)
        error = f"worker rank {rank} failed: {type(e).__name__}: {e}\n{traceback.format_exc()}"
        try:
            push.send_multipart([m.FROM_WORKER_ERROR, encoder.encode(m.WorkerError(rank, error))])
            push.close(linger=2000)
        finally:
            os._exit(1)
    sub.close(linger=0)
    push.close(linger=1000)
    ctx.term()
    # Nothing left to tear down politely: process-group destruction can wait on peers
    # that are exiting too, so leave at once.
    os._exit(0)
