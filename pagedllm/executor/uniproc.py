"""The single-process executor: one worker in the engine-core process."""

from __future__ import annotations

from typing import Any

from pagedllm.config import EngineConfig
from pagedllm.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from pagedllm.executor.base import Executor
from pagedllm.worker.model_runner import GrammarFn, StepHandle
from pagedllm.worker.worker import Worker


class UniProcExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.worker = Worker(config)
        self.worker.load_model()

    def collective_rpc(self, method: str, args: tuple[Any, ...] = ()) -> list[Any]:
        return [getattr(self.worker, method)(*args)]

    def determine_num_blocks(self) -> int:
        return self.worker.determine_num_blocks()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.worker.initialize_kv_cache(num_blocks)

    def execute_model(
        self, scheduler_output: SchedulerOutput, grammar: GrammarFn | None = None
    ) -> ModelRunnerOutput:
        return self.worker.execute_model(scheduler_output, grammar)

    def submit(
        self, scheduler_output: SchedulerOutput, grammar: GrammarFn | None = None
    ) -> StepHandle:
        return self.worker.submit(scheduler_output, grammar)
