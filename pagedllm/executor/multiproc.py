"""The multiprocess executor: one spawned worker process per rank on this node.

Messages go to all ranks through one ZMQ PUB socket (XPUB, so start-up can wait until every
rank has subscribed); answers come back on one PULL socket. A step is encoded once with
msgspec (`messages.StepMessage`) and published once; only the output rank answers it.

Failure is fast: every wait polls the sockets in short slices and checks each worker's
process sentinel, so a killed or crashed rank (or one that reports an error) raises
`WorkerDiedError` within a fraction of a second; `shutdown` ends every remaining rank (and
each rank exits by itself when the engine core dies).
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import socket
import tempfile
import time
import weakref
from typing import TYPE_CHECKING, Any

import msgspec
import zmq

from pagedllm import envs
from pagedllm.config import EngineConfig
from pagedllm.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from pagedllm.distributed.parallel_state import NO_MULTICAST_ENV, apply_no_multicast_env
from pagedllm.executor import messages as m
from pagedllm.executor.base import Executor
from pagedllm.executor.worker_proc import WorkerAddresses, run_worker

if TYPE_CHECKING:
    from pagedllm.worker.model_runner import GrammarFn

logger = logging.getLogger(__name__)

_POLL_MS = 100


class WorkerDiedError(RuntimeError):
    """A worker process exited or reported an error; the engine cannot continue."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _MPStepFuture:
    def __init__(self, executor: MultiprocExecutor, seq: int) -> None:
        self._executor = executor
        self._seq = seq
        self._out: ModelRunnerOutput | None = None

    def get(self) -> ModelRunnerOutput:
        if self._out is None:
            self._out = self._executor._wait_step(self._seq)
        return self._out


class MultiprocExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        pc = config.parallel_config
        self.world_size = pc.world_size
        self._closed = False
        self._tmpdir = tempfile.mkdtemp(prefix="pagedllm-workers-")
        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.XPUB)
        self._pub.setsockopt(zmq.XPUB_VERBOSE, 1)  # one notice per subscriber, not per topic
        self._pub.setsockopt(zmq.SNDHWM, 0)
        self._pub.setsockopt(zmq.LINGER, 0)
        broadcast = f"ipc://{os.path.join(self._tmpdir, 'broadcast.sock')}"
        self._pub.bind(broadcast)
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.RCVHWM, 0)
        self._pull.setsockopt(zmq.LINGER, 0)
        results = f"ipc://{os.path.join(self._tmpdir, 'results.sock')}"
        self._pull.bind(results)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoders = {
            m.FROM_WORKER_READY: msgspec.msgpack.Decoder(m.WorkerReady),
            m.FROM_WORKER_OUTPUT: msgspec.msgpack.Decoder(m.StepResult),
            m.FROM_WORKER_RPC: msgspec.msgpack.Decoder(m.RpcResult),
            m.FROM_WORKER_ERROR: msgspec.msgpack.Decoder(m.WorkerError),
        }
        self._next_seq = 0
        self._flushed_seq = -1  # the newest step the workers were told to answer at once
        self._outputs: dict[int, ModelRunnerOutput] = {}
        self._rpc_results: dict[int, dict[int, m.RpcResult]] = {}
        self._next_call = 0
        self._ready: dict[int, int] = {}  # rank -> pid
        self.procs: list[multiprocessing.process.BaseProcess] = []
        # Runs on shutdown(), when this executor is collected, or at exit (before
        # multiprocessing's own exit hook, LIFO, which would wait on the workers forever).
        self._stopper = _WorkerStopper(self.procs, self._ctx, self._pub, self._tmpdir)
        weakref.finalize(self, self._stopper)
        atexit.register(self._stopper)
        try:
            self._start_workers(WorkerAddresses(broadcast, results,
                                                f"tcp://127.0.0.1:{_free_port()}"))
        except BaseException:
            self.shutdown()
            raise

    # ---- start-up ----
    def _start_workers(self, addresses: WorkerAddresses) -> None:
        cfg = self.config
        backend = "nccl" if cfg.device_config.device == "cuda" else "gloo"
        ctx = multiprocessing.get_context("spawn")
        # Children inherit the environment at spawn: no NVLink multicast in any of them.
        apply_no_multicast_env()
        timeout_s = envs.distributed_timeout_s()
        for rank in range(self.world_size):
            proc = ctx.Process(
                target=run_worker,
                name=f"PagedLLMWorker-{rank}",
                daemon=True,  # never outlives the engine core, even past a missed shutdown
                args=(rank, rank, cfg, addresses, backend, os.getpid(), envs.logging_level(),
                      timeout_s),
            )  # fmt: skip
            proc.start()
            self.procs.append(proc)
        deadline = time.monotonic() + envs.worker_start_timeout_s()
        subscribed = 0
        while len(self._ready) < self.world_size or subscribed < self.world_size:
            if time.monotonic() > deadline:
                raise WorkerDiedError(
                    f"workers not ready after {envs.worker_start_timeout_s():.0f} s "
                    f"({len(self._ready)}/{self.world_size} loaded)"
                )
            if self._pub.poll(0):
                if self._pub.recv()[:1] == b"\x01":
                    subscribed += 1
                continue
            self._poll_once()
        logger.info("%d workers ready (pids %s), %s backend, env %s", self.world_size,
                    [self._ready[r] for r in sorted(self._ready)], backend,
                    " ".join(f"{k}={v}" for k, v in NO_MULTICAST_ENV.items()))  # fmt: skip

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    # ---- receiving ----
    def _check_alive(self) -> None:
        sentinels = [p.sentinel for p in self.procs]
        if multiprocessing.connection.wait(sentinels, timeout=0):
            dead = [(r, p.exitcode) for r, p in enumerate(self.procs) if not p.is_alive()]
            if dead:
                desc = ", ".join(f"rank {r} (exit code {code})" for r, code in dead)
                raise WorkerDiedError(f"worker process died: {desc}")

    def check_alive(self) -> None:
        try:
            self._check_alive()
        except WorkerDiedError:
            self.shutdown()
            raise

    def _poll_once(self) -> None:
        """Handles one answer if one arrives within a poll slice; raises if a rank died
        (after ending the others, which would wait on it in their next collective)."""
        try:
            self._receive()
        except WorkerDiedError:
            self.shutdown()
            raise

    def _receive(self) -> None:
        if not self._pull.poll(_POLL_MS):
            self._check_alive()
            return
        kind, payload = self._pull.recv_multipart()
        msg = self._decoders[kind].decode(payload)
        if kind == m.FROM_WORKER_OUTPUT:
            self._outputs[msg.seq] = msg.output
        elif kind == m.FROM_WORKER_RPC:
            self._rpc_results.setdefault(msg.call_id, {})[msg.rank] = msg
        elif kind == m.FROM_WORKER_READY:
            self._ready[msg.rank] = msg.pid
        elif kind == m.FROM_WORKER_ERROR:
            raise WorkerDiedError(msg.error)

    def _publish(self, kind: bytes, payload: bytes = b"") -> None:
        if self._closed:
            raise WorkerDiedError("the executor is shut down")
        self._pub.send_multipart([kind, payload], copy=False)

    # ---- the Executor interface ----
    def submit(
        self, scheduler_output: SchedulerOutput, grammar: GrammarFn | None = None,
        flush: bool = False,
    ) -> _MPStepFuture:
        # Structured outputs: the bitmask travels with the step, so it is filled before the
        # step is published (the in-process executor fills it while the forward runs).
        bitmask = grammar() if grammar is not None else None
        seq = self._next_seq
        self._next_seq += 1
        msg = m.make_step_message(seq, flush, scheduler_output, bitmask)
        self._publish(m.TO_WORKER_STEP, self._encoder.encode(msg))
        if flush:
            self._flushed_seq = seq
        return _MPStepFuture(self, seq)

    def execute_model(
        self, scheduler_output: SchedulerOutput, grammar: GrammarFn | None = None
    ) -> ModelRunnerOutput:
        return self.submit(scheduler_output, grammar, flush=True).get()

    def _wait_step(self, seq: int) -> ModelRunnerOutput:
        if seq not in self._outputs and seq == self._next_seq - 1 and self._flushed_seq < seq:
            # The newest step: nothing launched behind it will make the workers answer.
            self._publish(m.TO_WORKER_FLUSH)
            self._flushed_seq = seq
        while seq not in self._outputs:
            self._poll_once()
        return self._outputs.pop(seq)

    def collective_rpc(self, method: str, args: tuple[Any, ...] = ()) -> list[Any]:
        call_id = self._next_call
        self._next_call += 1
        self._publish(m.TO_WORKER_RPC, self._encoder.encode(m.RpcMessage(call_id, method,
                                                                         list(args))))
        self._flushed_seq = self._next_seq - 1  # workers resolve every step before an RPC
        while len(self._rpc_results.get(call_id, {})) < self.world_size:
            self._poll_once()
        answers = self._rpc_results.pop(call_id)
        errors = [a.error for a in answers.values() if a.error is not None]
        if errors:
            raise RuntimeError(f"{method} failed on a worker: {errors[0]}")
        return [answers[r].result for r in range(self.world_size)]

    def shutdown(self) -> None:
        self._closed = True
        self._stopper()


class _WorkerStopper:
    """Ends the workers and frees the sockets, once. Holds no reference to the executor, so
    it also runs when the executor is garbage-collected (weakref.finalize) and at exit."""

    def __init__(self, procs, ctx: zmq.Context, pub: zmq.Socket, tmpdir: str) -> None:
        self.procs, self.ctx, self.pub, self.tmpdir = procs, ctx, pub, tmpdir
        self.done = False

    def __call__(self) -> None:
        if self.done:
            return
        self.done = True
        try:
            self.pub.send_multipart([m.TO_WORKER_SHUTDOWN, b""])
        except zmq.ZMQError:
            pass
        # A rank that died leaves the others blocked in a collective: no grace then.
        grace = 5.0 if all(p.is_alive() for p in self.procs) else 0.2
        deadline = time.monotonic() + grace
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join(2.0)
        self.ctx.destroy(linger=0)
        shutil.rmtree(self.tmpdir, ignore_errors=True)
