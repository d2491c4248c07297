"""The engine-core process: an EngineCore behind two ZMQ IPC sockets, run as a busy loop.

Front-end -> core: a PULL socket of `[EngineCoreRequestType, msgpack payload]` frames.
Core -> front-end: a PUSH socket of `[EngineCoreOutputType, msgpack payload]` frames.

Invariants:
- The first message out is READY (EngineCoreReady) or, if start-up failed, OUTPUTS with
  `engine_error` set; then the process exits.
- A request `add_request` refuses is answered with REJECTED and never queued, so the front-end
  never waits on it.
- When idle the loop blocks on the input socket; while work exists it drains input without
  blocking, then steps. No pickle crosses a socket.
- The process exits on SHUTDOWN, on any engine error (after sending it), when its parent dies
  (a watchdog thread polls the parent pid), and at the latest 60 s after a SIGTERM (which it
  otherwise leaves to the front-end, so a group-wide SIGTERM does not cut off the drain).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import traceback

import msgspec
import zmq

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

# How often the blocked idle loop and the parent watchdog wake up.
_POLL_MS = 1000
_PARENT_CHECK_S = 0.5
# After SIGTERM, how long the core waits for the front-end's SHUTDOWN (its drain) before exiting.
_SIGTERM_GRACE_S = 60.0

# EngineCore methods the front-end may call through a UTILITY message.
UTILITY_METHODS = frozenset({"reset_prefix_cache", "has_unfinished_requests"})


class _Shutdown(Exception):
    """Raised inside the loop by SIGTERM or a SHUTDOWN message."""


def decode_add_request(decoder: msgspec.msgpack.Decoder, payload: bytes) -> EngineCoreRequest:
    """Decodes an ADD payload and restores what SamplingParams.__post_init__ resets on decode.

    msgspec runs `__post_init__`, which rebuilds `all_stop_token_ids` from `stop_token_ids`
    only, dropping the EOS id the input processor added (used to ban EOS under min_tokens).
    """
    req: EngineCoreRequest = decoder.decode(payload)
    sp = req.sampling_params
    if sp is not None:
        stops = set(sp.stop_token_ids or [])
        if req.eos_token_id is not None and not sp.ignore_eos:
            stops.add(req.eos_token_id)
        sp.all_stop_token_ids = stops
    return req


def _start_parent_watchdog(parent_pid: int) -> None:
    def watch() -> None:
        while True:
            time.sleep(_PARENT_CHECK_S)
            if os.getppid() != parent_pid:
                # Parent gone (re-parented to init): nobody will read our outputs.
                os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


class EngineCoreProc:
    """Runs the busy loop over an already-built EngineCore and connected sockets."""

    def __init__(self, core, input_socket: zmq.Socket, output_socket: zmq.Socket) -> None:
        self.core = core
        self.input_socket = input_socket
        self.output_socket = output_socket
        self.encoder = msgspec.msgpack.Encoder()
        self.add_decoder = msgspec.msgpack.Decoder(EngineCoreRequest)
        self.abort_decoder = msgspec.msgpack.Decoder(list[str])
        self.utility_decoder = msgspec.msgpack.Decoder(UtilityRequest)
        # Engine-core id -> wall time of its first schedule, until its first output is sent.
        self._scheduled_at: dict[str, float] = {}
        self._reported: set[str] = set()
        self._stats_dirty = False
        self._num_received = 0

    # ---- output ----
    def send(self, kind: EngineCoreOutputType, message: msgspec.Struct) -> None:
        self.output_socket.send_multipart([kind.value, self.encoder.encode(message)], copy=False)

    # ---- input ----
    def process_input(self, block: bool) -> None:
        """Handles every queued message; first waits for one if `block`."""
        if block:
            while not self.input_socket.poll(_POLL_MS):
                # Idle: a worker that died between requests (killed, OOM) fails the engine
                # now, not when the next request arrives (/health turns 503 within ~1 s).
                self.core.executor.check_alive()
        while True:
            try:
                kind, payload = self.input_socket.recv_multipart(flags=zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            self._handle(EngineCoreRequestType(kind), payload)

    def _handle(self, kind: EngineCoreRequestType, payload: bytes) -> None:
        if kind is EngineCoreRequestType.ADD:
            self._num_received += 1
            req = decode_add_request(self.add_decoder, payload)
            try:
                self.core.add_request(req)
            except ValueError as e:
                self.send(EngineCoreOutputType.REJECTED, RequestRejection(req.request_id, str(e)))
        elif kind is EngineCoreRequestType.ABORT:
            ids = self.abort_decoder.decode(payload)
            self.core.abort_requests(ids)
            for rid in ids:
                self._scheduled_at.pop(rid, None)
                self._reported.discard(rid)
            self._stats_dirty = True
        elif kind is EngineCoreRequestType.UTILITY:
            self._call_utility(self.utility_decoder.decode(payload))
        elif kind is EngineCoreRequestType.SHUTDOWN:
            raise _Shutdown

    def _call_utility(self, call: UtilityRequest) -> None:
        if call.method not in UTILITY_METHODS:
            result = UtilityResult(call.call_id, error=f"unknown utility method {call.method!r}")
        else:
            try:
                value = getattr(self.core, call.method)(*call.args)
                result = UtilityResult(call.call_id, result=value)
            except Exception as e:  # reported to the caller, the engine keeps running
                result = UtilityResult(call.call_id, error=f"{type(e).__name__}: {e}")
        self.send(EngineCoreOutputType.UTILITY, result)

    # ---- loop ----
    def step(self) -> None:
        started = time.time()
        outputs = self.core.step()
        for req in self.core.scheduler.running:
            rid = req.request_id
            if rid not in self._reported and rid not in self._scheduled_at:
                self._scheduled_at[rid] = started
        for out in outputs.outputs:
            rid = out.request_id
            if rid not in self._reported:
                self._reported.add(rid)
                out.first_scheduled_time = self._scheduled_at.pop(rid, started)
            if out.finish_reason is not None:
                self._reported.discard(rid)
        # Input is only read between steps, so every request counted here is in the stats.
        outputs.num_requests_received = self._num_received
        self.send(EngineCoreOutputType.OUTPUTS, outputs)
        self._stats_dirty = False

    def run_busy_loop(self) -> None:
        was_busy = False
        while True:
            if self.core.has_unfinished_requests():
                self.process_input(block=False)
            else:
                if was_busy or self._stats_dirty:
                    # Going idle: one stats-only message first, so gauges drop to 0 at once
                    # (the last step's stats were taken before its finished requests left).
                    self.step()
                    was_busy = False
                self.process_input(block=True)
            if self.core.has_unfinished_requests():
                self.step()
                was_busy = True

def run_engine_core(
    config: EngineConfig,
    input_address: str,
    output_address: str,
    parent_pid: int,
    log_level: str = "INFO",
    engine_index: int = 0,
) -> None:
    """Entry point of the engine-core child process (multiprocessing spawn target).

    `engine_index` is the data-parallel replica this process is (0 without data parallelism).
    """
    name = "EngineCore" if config.parallel_config.data_parallel_size == 1 else f"EngineCore_{engine_index}"
    _set_process_name(name)
    logging.basicConfig(
        level=log_level,
        format=f"%(levelname)s %(asctime)s [{name} pid=%(process)d] %(name)s: %(message)s",
        force=True,  # a forked child inherits the front-end's handlers: replace them
    )
    # Ctrl-C reaches the whole process group; the front-end decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def on_sigterm(signum, frame) -> None:
        # A SIGTERM to the whole group (timeout, docker stop, systemd) must not cut off the
        # front-end's drain: keep serving, the front-end sends SHUTDOWN when done. Exit on our
        # own only if that never comes.
        def fallback_exit() -> None:
            time.sleep(_SIGTERM_GRACE_S)
            os._exit(0)

        threading.Thread(target=fallback_exit, name="sigterm-fallback", daemon=True).start()

    signal.signal(signal.SIGTERM, on_sigterm)
    _start_parent_watchdog(parent_pid)
    exit_code = serve_engine_core(config, input_address, output_address)
    if exit_code:
        os._exit(exit_code)


def _set_process_name(name: str) -> None:
    """The name `ps` / `top` / psutil show for this process (Linux: /proc/self/comm, 15 bytes;
    a forked child's command line is the front-end's, so the name is what tells them apart)."""
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        pass  # not Linux, or /proc not writable: the name stays


def serve_engine_core(config: EngineConfig, input_address: str, output_address: str) -> int:
    """Builds the EngineCore, connects both sockets and runs the busy loop until SHUTDOWN
    (returns 0) or a failure, which is reported on the output socket first (returns 1).
    Shared by the engine-core process and the Ray data-parallel replica actor."""
    ctx = zmq.Context()
    input_socket = ctx.socket(zmq.PULL)
    input_socket.setsockopt(zmq.RCVHWM, 0)
    input_socket.connect(input_address)
    output_socket = ctx.socket(zmq.PUSH)
    output_socket.setsockopt(zmq.SNDHWM, 0)
    output_socket.setsockopt(zmq.LINGER, 5000)
    output_socket.connect(output_address)
    encoder = msgspec.msgpack.Encoder()
    exit_code = 0
    core = None
    try:
        from pagedllm.engine.core import EngineCore

        core = EngineCore(config)
        ready = EngineCoreReady(
            num_blocks=core.num_blocks,
            block_size=config.cache_config.block_size,
            max_model_len=config.model_config.max_model_len,
            pid=os.getpid(),
        )
        output_socket.send_multipart([EngineCoreOutputType.READY.value, encoder.encode(ready)])
        EngineCoreProc(core, input_socket, output_socket).run_busy_loop()
    except _Shutdown:
        logger.info("engine core shutting down")
    except BaseException as e:  # report every failure before dying; never hang the front-end
        exit_code = 1
        logger.exception("engine core failed")
        error = f"EngineCore failed: {type(e).__name__}: {e}\n{traceback.format_exc()}"
        try:
            output_socket.send_multipart(
                [
                    EngineCoreOutputType.OUTPUTS.value,
                    encoder.encode(EngineCoreOutputs(outputs=[], engine_error=error)),
                ]
            )
        except Exception:
            pass
    finally:
        if core is not None:
            core.shutdown()  # worker processes of a multi-rank executor
        input_socket.close(linger=0)
        output_socket.close()
        ctx.term()
    return exit_code
