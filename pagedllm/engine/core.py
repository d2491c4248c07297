"""EngineCore: the busy loop's body — schedule, execute, update — on one process."""

from __future__ import annotations

import logging
import time

from pagedllm.config import EngineConfig
from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.scheduler import Scheduler
from pagedllm.engine.protocol import EngineCoreOutputs, EngineCoreRequest
from pagedllm.executor.uniproc import UniProcExecutor

logger = logging.getLogger(__name__)


class EngineCore:
    """Owns the scheduler and the executor. Thread-compatible, not thread-safe."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        t0 = time.perf_counter()
        self.executor = UniProcExecutor(config)
        num_blocks = self.executor.determine_num_blocks()
        self.executor.initialize_kv_cache(num_blocks)
        self.num_blocks = num_blocks
        cc, mc = config.cache_config, config.model_config
        self.scheduler = Scheduler(
            config.scheduler_config, cc, num_blocks=num_blocks, max_model_len=mc.max_model_len
        )
        logger.info(
            "engine core ready in %.2f s: %d KV blocks of %d tokens (%d tokens, %.1fx max_model_len)",
            time.perf_counter() - t0,
            num_blocks,
            cc.block_size,
            num_blocks * cc.block_size,
            num_blocks * cc.block_size / mc.max_model_len,
        )

    def add_request(self, request: EngineCoreRequest) -> None:
        """Queues a request; raises ValueError (before queueing) if it can never run."""
        self.scheduler.add_request(
            Request.from_engine_core_request(request, self.config.cache_config.block_size)
        )

    def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids:
            self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> EngineCoreOutputs:
        if not self.scheduler.has_unfinished_requests():
            return EngineCoreOutputs(outputs=[], scheduler_stats=self.scheduler.make_stats())
        scheduler_output = self.scheduler.schedule()
        runner_output = self.executor.execute_model(scheduler_output)
        return self.scheduler.update_from_output(scheduler_output, runner_output)

    def reset_prefix_cache(self) -> None:
        self.scheduler.reset_prefix_cache()
