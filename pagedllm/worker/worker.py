"""Worker: one device, one model replica or one rank's shard of it (TP/PP rank)."""

from __future__ import annotations

import logging
import time

import torch

from pagedllm.config import EngineConfig
from pagedllm.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from pagedllm.worker.model_runner import GrammarFn, ModelRunner, StepHandle

logger = logging.getLogger(__name__)


class Worker:
    """Owns a ModelRunner on one device. Under tensor/pipeline parallelism the process
    groups are initialised before construction (`init_worker_distributed` then
    `initialize_model_parallel`); every rank then runs the same calls in the same order."""

    def __init__(self, config: EngineConfig, local_rank: int = 0, rank: int = 0) -> None:
        self.config = config
        self.rank = rank
        t0 = time.perf_counter()
        if config.device_config.device == "cuda":
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device(config.device_config.device)
        # The same seed on every rank: tensor-parallel ranks draw identical random samples.
        torch.manual_seed(config.model_config.seed)
        self.model_runner = ModelRunner(config, self.device)
        # device context, seeding and the runner's buffers, before the weights
        self.model_runner.timings["worker_init"] = time.perf_counter() - t0

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

    def timings(self) -> dict[str, float]:
        """Start-up stage durations of this rank, seconds."""
        return dict(self.model_runner.timings)

    def memory_profile(self) -> dict[str, float]:
        """This rank's GPU memory split from KV-cache sizing ({} on CPU)."""
        return dict(getattr(self.model_runner, "memory_profile", {}))
