"""How the server starts its engine-core child: fork unless CUDA is live here, or as told."""

from __future__ import annotations

import sys
import types

import pytest

from pagedllm.engine import client


def test_auto_forks_without_a_cuda_context_and_spawns_with_one(monkeypatch) -> None:
    monkeypatch.delenv("PAGEDLLM_ENGINE_CORE_START_METHOD", raising=False)
    live = types.SimpleNamespace(cuda=types.SimpleNamespace(is_initialized=lambda: True))
    idle = types.SimpleNamespace(cuda=types.SimpleNamespace(is_initialized=lambda: False))
    monkeypatch.setitem(sys.modules, "torch", idle)
    assert client._start_method() == "fork"
    # a replica with its own devices/threads: a fresh interpreter reads them at start
    assert client._start_method({"OMP_NUM_THREADS": "1"}) == "spawn"
    monkeypatch.setitem(sys.modules, "torch", live)  # a forked child cannot reuse a context
    assert client._start_method() == "spawn"
    monkeypatch.setattr(client.multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    monkeypatch.setitem(sys.modules, "torch", idle)
    assert client._start_method() == "spawn"  # no fork on this platform


@pytest.mark.parametrize("value", ["fork", "spawn", " Spawn "])
def test_environment_overrides(monkeypatch, value) -> None:
    monkeypatch.setenv("PAGEDLLM_ENGINE_CORE_START_METHOD", value)
    assert client._start_method() == value.strip().lower()


def test_bad_value_is_refused(monkeypatch) -> None:
    monkeypatch.setenv("PAGEDLLM_ENGINE_CORE_START_METHOD", "forkserver2")
    with pytest.raises(ValueError, match="PAGEDLLM_ENGINE_CORE_START_METHOD"):
        client._start_method()
