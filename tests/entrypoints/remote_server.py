"""RemoteServer: `pagedllm serve` in a subprocess on 127.0.0.1 with a free port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
START_TIMEOUT_S = 180


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def assert_children_exit(pids: list[int], timeout: float = 15.0) -> None:
    """Every former child of a stopped server exits on its own (the engine polls for its parent
    every 0.5 s, multiprocessing's helpers follow): give them a moment on a loaded machine
    before calling any an orphan."""
    deadline = time.time() + timeout
    for pid in pids:
        while not _gone(pid) and time.time() < deadline:
            time.sleep(0.2)
        assert _gone(pid), f"process {pid} outlived the server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RemoteServer:
    """Runs `python -m pagedllm.entrypoints.cli serve ARGS` until stop()."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.host = "127.0.0.1"
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env.setdefault("PAGEDLLM_CPU_KVCACHE_SPACE", "1")
        full_env.update(env or {})
        self.log_path = os.path.join("/tmp", f"pagedllm-test-server-{self.port}.log")
        self.log = open(self.log_path, "w")
        cmd = [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve",
               "--host", self.host, "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, env=full_env, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=ROOT)
        self.started_in = self._wait_ready()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _wait_ready(self) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < START_TIMEOUT_S:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.read_log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"server not ready in {START_TIMEOUT_S} s:\n{self.read_log()}")

    def read_log(self) -> str:
        if not self.log.closed:  # stop() closes it; the file stays readable
            self.log.flush()
        with open(self.log_path) as f:
            return f.read()

    def engine_core_pids(self) -> list[int]:
        """The engine-core children (named EngineCore* whether forked or spawned)."""
        return [p for p in self.engine_pids() if is_engine_core(p)]

    def engine_pids(self) -> list[int]:
        try:
            return [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 40.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        return self.proc.returncode


def is_engine_core(pid: int) -> bool:
    try:
        return psutil.Process(pid).name().startswith("EngineCore")
    except psutil.NoSuchProcess:
        return False
