"""The executor interface the engine core drives, and the registry of executor backends.

An executor owns the workers of one engine core (one data-parallel replica): however many
ranks exist, the engine core sees one `determine_num_blocks` (the minimum over ranks), one
`initialize_kv_cache`, one `submit`/`execute_model` per step and `collective_rpc` for the
rest. Backends are keyed by `--distributed-executor-backend`: "uni" (one worker in this
process), "mp" (one process per rank on this node); others (Ray) register themselves here.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Protocol

from pagedllm.config import EngineConfig, ParallelConfig
from pagedllm.core.scheduler_output import ModelRunnerOutput, SchedulerOutput

if TYPE_CHECKING:
    from pagedllm.worker.model_runner import GrammarFn


class StepFuture(Protocol):
    """A submitted step; `get()` (in submission order) waits for and returns its output."""

    def get(self) -> ModelRunnerOutput: ...


class Executor(ABC):
    """Invariant: steps are resolved in submission order; a failed or dead worker raises
    from the call that waits on it (never hangs)."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config

    @abstractmethod
    def collective_rpc(self, method: str, args: tuple[Any, ...] = ()) -> list[Any]:
        """Calls `Worker.<method>(*args)` on every rank; results in rank order."""

    def determine_num_blocks(self) -> int:
        """KV blocks every rank can hold: each sizes its own cache, the smallest wins."""
        return min(self.collective_rpc("determine_num_blocks"))

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.collective_rpc("initialize_kv_cache", (num_blocks,))

    @abstractmethod
    def submit(
        self, scheduler_output: SchedulerOutput, grammar: GrammarFn | None = None
    ) -> StepFuture:
        """Launches a step without waiting for its sampled tokens (async scheduling).
        `grammar`, when given, returns the step's structured-output bitmask; an executor
        calls it once (in-process: after launching the forward; across processes: before
        publishing the step, which then carries the bitmask to every rank)."""

    def execute_model(
        self, scheduler_output: SchedulerOutput, grammar: GrammarFn | None = None
    ) -> ModelRunnerOutput:
        return self.submit(scheduler_output, grammar).get()

    def check_alive(self) -> None:  # noqa: B027 - in-process: nothing can die apart
        """Raises WorkerDiedError when a worker died; the idle engine loop calls it while it
        waits for input, so a worker lost between requests fails the engine at once."""

    def shutdown(self) -> None:  # noqa: B027 - nothing to stop in-process
        """Stops every worker; idempotent."""


# --distributed-executor-backend -> "module:Class"
_EXECUTORS: dict[str, str] = {
    "uni": "pagedllm.executor.uniproc:UniProcExecutor",
    "mp": "pagedllm.executor.multiproc:MultiprocExecutor",
    "ray": "pagedllm.executor.ray_executor:RayExecutor",
}


def register_executor(name: str, target: str) -> None:
    """Adds a backend ("module:Class", imported when used)."""
    _EXECUTORS[name] = target


def available_executor_backends() -> list[str]:
    return sorted(_EXECUTORS)


def resolve_backend_name(parallel: ParallelConfig) -> str:
    """The backend a config runs: the user's choice, else "uni" for one worker, "mp" for more."""
    if parallel.distributed_executor_backend is not None:
        return parallel.distributed_executor_backend
    return "uni" if parallel.world_size == 1 else "mp"


def get_executor_class(parallel: ParallelConfig) -> type[Executor]:
    name = resolve_backend_name(parallel)
    if name not in _EXECUTORS:
        raise ValueError(
            f"distributed_executor_backend={name!r} is not available; available: "
            f"{', '.join(sorted(_EXECUTORS))} (--distributed-executor-backend)"
        )
    module, cls = _EXECUTORS[name].split(":")
    return getattr(importlib.import_module(module), cls)
