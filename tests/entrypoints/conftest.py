"""Live-server fixtures for the server tests."""

from __future__ import annotations

import pytest

from tests.entrypoints.remote_server import RemoteServer, assert_children_exit


@pytest.fixture(scope="session")
def server():
    """The default model, no API key; shared by every module that needs a plain server
    (auto tool choice on, for the tool-calling tests; requests without tools are unaffected)."""
    srv = RemoteServer(["--max-num-seqs", "128", "--served-model-name", "smol", "alias-smol",
                        "--enable-auto-tool-choice", "--tool-call-parser", "hermes"])
    yield srv
    children = srv.engine_pids()
    srv.stop()
    assert_children_exit(children)
