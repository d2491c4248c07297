"""Live-server fixtures for the server tests."""

from __future__ import annotations

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
    for pid in children:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
