"""Worker: one device, one model replica (one TP rank later)."""

from __future__ import annotations

import logging

import torch

from pagedllm.config import EngineConfig
from pagedllm.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from pagedllm.worker.model_runner import GrammarFn, ModelRunner, StepHandle

logger = logging.getLogger(__name__)


class Worker:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(config.device_config.device)
        torch.manual_seed(config.model_config.seed)
        self.model_runner = ModelRunner(config, self.device)

    def load_model(self) -> None:
        self.model_runner.load_model()

    def determine_num_blocks(self) -> int:
        return self.model_runner.determine_num_blocks()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.model_runner.initialize_kv_cache(num_blocks)

    def execute_model(
        self, scheduler_output: SchedulerOutput, grammar: GrammarFn | None = None
    ) -> ModelRunnerOutput:
        return self.model_runner.execute_model(scheduler_output, grammar)

    def submit(
        self, scheduler_output: SchedulerOutput, grammar: GrammarFn | None = None
    ) -> StepHandle:
        """Launches a step without waiting for its sampled tokens (async scheduling)."""
        return self.model_runner.submit(scheduler_output, grammar)
