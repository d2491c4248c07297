"""Shared pytest setup: the repository root on sys.path, deterministic torch threads."""

import fcntl
import os
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def ray_exclusive():
    """Holds a machine-wide lock for a module that starts a local Ray instance: `make test`
    runs test modules in two xdist workers, and two local Ray instances on one machine would
    join (and stop) each other's cluster."""
    with open(os.path.join(tempfile.gettempdir(), "pagedllm-tests-ray.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
