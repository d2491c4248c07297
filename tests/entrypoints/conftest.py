"""Live-server fixtures for the server tests."""

from __future__ import annotations

import time

import psutil
import pytest

from tests.entrypoints.remote_server import RemoteServer


@pytest.fixture(scope="session")
def server():
    """The default model, no API key; shared by every module that needs a plain server."""
    srv = RemoteServer(["--max-num-seqs", "128", "--served-model-name", "smol", "alias-smol"])
    yield srv
    children = srv.engine_pids()
    srv.stop()
    deadline = time.time() + 15
    for pid in children:
        # The engine process exits on its own once its parent is gone (it polls every 0.5 s);
        # give it a moment on a loaded machine before calling it an orphan.
        while (psutil.pid_exists(pid) and time.time() < deadline
               and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE):
            time.sleep(0.2)
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
