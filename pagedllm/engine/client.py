"""The front-end's handle on one engine core: spawn, ZMQ sockets, messages, shutdown.

`ReplicaClient` is the interface every engine-core handle offers (one per data-parallel
replica; a Ray actor variant implements the same calls). `EngineCoreProcClient` is the local
one: it owns the child process and both sockets. Sending never blocks (no high-water mark);
receiving is async (zmq.asyncio) and reports the child's death as an EngineDeadError instead
of waiting forever.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import msgspec
import zmq
import zmq.asyncio

from pagedllm import envs
from pagedllm.config import EngineConfig
from pagedllm.engine.protocol import (
    EngineCoreOutputs,
    EngineCoreOutputType,
    EngineCoreReady,
    EngineCoreRequest,
    EngineCoreRequestType,
    RequestRejection,
    UtilityRequest,
    UtilityResult,
)

logger = logging.getLogger(__name__)

_LIVENESS_POLL_MS = 200


class EngineDeadError(RuntimeError):
    """The engine-core process died or reported a fatal error; no request can run."""


EngineMessage = EngineCoreOutputs | RequestRejection | UtilityResult


class ReplicaClient(Protocol):
    """One engine core (a data-parallel replica) as the front-end sees it.

    Invariants: `start()` returns at once (the core loads while the caller works);
    `wait_ready` and `get_output` raise EngineDeadError when the core is gone instead of
    waiting forever; sending never blocks; `shutdown` is idempotent and leaves no process.
    """

    engine_index: int
    dead_error: str | None

    def start(self) -> None: ...

    async def wait_ready(self, timeout: float = 600.0) -> EngineCoreReady: ...

    def add_request(self, request: EngineCoreRequest) -> None: ...

    def abort_requests(self, request_ids: list[str]) -> None: ...

    def call_utility(self, call_id: int, method: str, args: list[Any]) -> None: ...

    async def get_output(self) -> EngineMessage: ...

    def is_alive(self) -> bool: ...

    def begin_shutdown(self) -> None:
        """Asks the core to stop and returns at once (several replicas then stop together)."""
        ...

    def shutdown(self, timeout: float = 5.0) -> None: ...


@contextmanager
def _environ(overrides: dict[str, str]) -> Iterator[None]:
    """Sets environment variables for the duration (a spawned child copies them at start)."""
    saved = {k: os.environ.get(k) for k in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _start_method(child_env: dict[str, str] | None = None) -> str:
    """fork when allowed and safe (no CUDA context in this process to inherit, no environment
    of its own for the child): the child then skips re-importing torch, transformers and
    pagedllm and re-reading the model config, most of its start-up (issue #16); spawn
    otherwise. A child with its own environment (a data-parallel replica's devices and
    threads) is spawned, so OpenMP and CUDA initialise with it in a fresh interpreter. The
    child never touches the parent's ZMQ contexts (it opens its own) and leaves through
    os._exit, so their copies are inert."""
    how = envs.engine_core_start_method()
    if how != "auto":
        return how
    if child_env or "fork" not in multiprocessing.get_all_start_methods():
        return "spawn"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "spawn"
    return "fork"


class EngineCoreProcClient:
    """Starts the engine core in a child process (`_start_method`) and talks to it over ipc://
    sockets.

    Call `start()` (sync, spawns at once so the caller can load its tokenizer meanwhile) and then
    `await wait_ready()` inside the event loop that will read outputs. `env` overrides the
    child's environment (a data-parallel replica's CUDA_VISIBLE_DEVICES): it is in place
    before the child imports anything, so CUDA initialises with it.
    """

    def __init__(
        self,
        config: EngineConfig,
        log_level: str = "INFO",
        engine_index: int = 0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.config = config
        self.log_level = log_level
        self.engine_index = engine_index
        self.env = dict(env or {})
        self._tmpdir = tempfile.mkdtemp(prefix="pagedllm-")
        self.input_address = f"ipc://{os.path.join(self._tmpdir, 'input.sock')}"
        self.output_address = f"ipc://{os.path.join(self._tmpdir, 'output.sock')}"
        self.proc: multiprocessing.process.BaseProcess | None = None
        self.ready: EngineCoreReady | None = None
        self.dead_error: str | None = None
        self._ctx: zmq.asyncio.Context | None = None
        self._sync_ctx: zmq.Context | None = None
        self.input_socket: zmq.Socket | None = None
        self.output_socket: zmq.asyncio.Socket | None = None
        self._encoder = msgspec.msgpack.Encoder()
        self._outputs_decoder = msgspec.msgpack.Decoder(EngineCoreOutputs)
        self._decoders = {
            EngineCoreOutputType.OUTPUTS: self._outputs_decoder,
            EngineCoreOutputType.REJECTED: msgspec.msgpack.Decoder(RequestRejection),
            EngineCoreOutputType.UTILITY: msgspec.msgpack.Decoder(UtilityResult),
        }
        self._closed = False
        self._shutdown_sent = False

    # ---- lifecycle ----
    def start(self) -> None:
        """Binds both sockets and spawns the engine-core process."""
        from pagedllm.engine.core_proc import run_engine_core

        self._bind_sockets()
        mp = multiprocessing.get_context(_start_method(self.env))
        dp = self.config.parallel_config.data_parallel_size
        self.proc = mp.Process(
            target=run_engine_core,
            name="EngineCore" if dp == 1 else f"EngineCore_{self.engine_index}",
            args=(self.config, self.input_address, self.output_address, os.getpid(),
                  self.log_level, self.engine_index),
        )
        with _environ(self.env):
            self.proc.start()
        # Runs before multiprocessing's own atexit hook (LIFO), which would join forever.
        atexit.register(_shutdown_ref, weakref.ref(self))

    def _bind_sockets(self) -> None:
        """Binds the input PUSH and output PULL sockets at `input_address`/`output_address`
        (a `tcp://host:*` address binds a free port; the address then names it)."""
        self._sync_ctx = zmq.Context()
        self.input_socket = self._sync_ctx.socket(zmq.PUSH)
        self.input_socket.setsockopt(zmq.SNDHWM, 0)
        self.input_socket.setsockopt(zmq.LINGER, 0)
        self.input_socket.bind(self.input_address)
        self.input_address = self.input_socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._ctx = zmq.asyncio.Context()
        self.output_socket = self._ctx.socket(zmq.PULL)
        self.output_socket.setsockopt(zmq.RCVHWM, 0)
        self.output_socket.setsockopt(zmq.LINGER, 0)
        self.output_socket.bind(self.output_address)
        self.output_address = self.output_socket.getsockopt_string(zmq.LAST_ENDPOINT)

    async def wait_ready(self, timeout: float = 600.0) -> EngineCoreReady:
        """Waits for the handshake; raises EngineDeadError if the child dies or fails first."""
        assert self.output_socket is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self.output_socket.poll(_LIVENESS_POLL_MS):
                kind, payload = await self.output_socket.recv_multipart()
                kind = EngineCoreOutputType(kind)
                if kind is EngineCoreOutputType.READY:
                    self.ready = msgspec.msgpack.decode(payload, type=EngineCoreReady)
                    return self.ready
                if kind is EngineCoreOutputType.OUTPUTS:
                    outs = self._outputs_decoder.decode(payload)
                    if outs.engine_error:
                        self.dead_error = outs.engine_error
                        raise EngineDeadError(outs.engine_error)
                continue
            if not self.is_alive():
                self.dead_error = f"engine core process exited with code {self.proc.exitcode}"
                raise EngineDeadError(self.dead_error + " during start-up")
        raise EngineDeadError(f"engine core not ready after {timeout:.0f} s")

    def is_alive(self) -> bool:
        return self.proc is not None and self.proc.is_alive()

    def begin_shutdown(self) -> None:
        if self._closed or self._shutdown_sent:
            return
        self._shutdown_sent = True
        if self.proc is not None and self.proc.is_alive():
            try:
                self._send(EngineCoreRequestType.SHUTDOWN, b"")
            except zmq.ZMQError:
                pass

    def shutdown(self, timeout: float = 5.0) -> None:
        """Asks the child to stop, then terminates and kills it if needed. Idempotent."""
        if self._closed:
            return
        self.begin_shutdown()
        self._closed = True
        proc = self.proc
        if proc is not None and proc.is_alive():
            proc.join(timeout)
            if proc.is_alive():
                proc.terminate()
                proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join(2.0)
        for ctx in (self._ctx, self._sync_ctx):
            if ctx is not None:
                ctx.destroy(linger=0)
        shutil.rmtree(self._tmpdir, ignore_errors=True)

    # ---- messages to the core ----
    def _send(self, kind: EngineCoreRequestType, payload: bytes) -> None:
        assert self.input_socket is not None
        self.input_socket.send_multipart([kind.value, payload], copy=False)

    def add_request(self, request: EngineCoreRequest) -> None:
        self._send(EngineCoreRequestType.ADD, self._encoder.encode(request))

    def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids and not self._closed:
            self._send(EngineCoreRequestType.ABORT, self._encoder.encode(list(request_ids)))

    def call_utility(self, call_id: int, method: str, args: list[Any]) -> None:
        self._send(EngineCoreRequestType.UTILITY, self._encoder.encode(UtilityRequest(call_id, method, args)))

    # ---- messages from the core ----
    async def get_output(self) -> EngineMessage:
        """The next message; raises EngineDeadError when the child is gone and nothing is left."""
        sock = self.output_socket
        assert sock is not None
        while True:
            if await sock.poll(_LIVENESS_POLL_MS):
                frames = await sock.recv_multipart(copy=False)
                kind = EngineCoreOutputType(frames[0].bytes)
                return self._decoders[kind].decode(frames[1].buffer)
            if not self.is_alive():
                code = self.proc.exitcode if self.proc is not None else None
                self.dead_error = self.dead_error or f"engine core process died (exit code {code})"
                raise EngineDeadError(self.dead_error)


def _shutdown_ref(ref: weakref.ref) -> None:
    client = ref()
    if client is not None:
        client.shutdown(timeout=2.0)
