"""EngineCore: the busy loop's body — schedule, execute, update — on one process."""

from __future__ import annotations

import logging
import time
from collections import deque

from pagedllm.config import EngineConfig
from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.scheduler import Scheduler
from pagedllm.core.scheduler_output import SchedulerOutput
from pagedllm.engine.protocol import EngineCoreOutputs, EngineCoreRequest
from pagedllm.executor.base import StepFuture, get_executor_class

logger = logging.getLogger(__name__)


class EngineCore:
    """Owns the scheduler and the executor. Thread-compatible, not thread-safe."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        t0 = time.perf_counter()
        self.executor = get_executor_class(config.parallel_config)(config)
        try:
            num_blocks = self.executor.determine_num_blocks()
            self.executor.initialize_kv_cache(num_blocks)
        except BaseException:
            self.executor.shutdown()
            raise
        self.num_blocks = num_blocks
        cc, mc = config.cache_config, config.model_config
        self.scheduler = Scheduler(
            config.scheduler_config,
            cc,
            num_blocks=num_blocks,
            max_model_len=mc.max_model_len,
            async_scheduling=config.scheduler_config.async_scheduling,
        )
        # Async scheduling: submitted steps whose outputs the scheduler has not seen, oldest
        # first (at most two: the one the GPU runs and the one queued behind it).
        self._in_flight: deque[tuple[SchedulerOutput, StepFuture]] = deque()
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

    @property
    def async_scheduling(self) -> bool:
        """Whether steps overlap (the scheduler's mode: placeholders need it there)."""
        return self.scheduler.async_scheduling

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self._in_flight)

    def step(self) -> EngineCoreOutputs:
        if self.async_scheduling:
            return self._step_async()
        if not self.scheduler.has_unfinished_requests():
            return EngineCoreOutputs(outputs=[], scheduler_stats=self.scheduler.make_stats())
        scheduler_output = self.scheduler.schedule()
        runner_output = self.executor.execute_model(scheduler_output)
        return self.scheduler.update_from_output(scheduler_output, runner_output)

    def _step_async(self) -> EngineCoreOutputs:
        """Keeps two steps submitted: schedules and launches step N+1, then waits for step
        N's tokens and applies them, so host work overlaps the device running N+1."""
        q = self._in_flight
        while len(q) < 2 and self.scheduler.has_unfinished_requests():
            so = self.scheduler.schedule()
            if so.total_num_scheduled_tokens == 0:
                # Nothing to run (every request waits on a token in flight, or on memory);
                # the worker must still drop the states of finished or preempted requests.
                if so.finished_req_ids or so.preempted_req_ids:
                    self.executor.execute_model(so)
                break
            q.append((so, self.executor.submit(so)))
        if not q:
            return EngineCoreOutputs(outputs=[], scheduler_stats=self.scheduler.make_stats())
        so, handle = q.popleft()
        return self.scheduler.update_from_output(so, handle.get())

    def reset_prefix_cache(self) -> None:
        self.scheduler.reset_prefix_cache()

    def shutdown(self) -> None:
        """Stops the executor's workers (idempotent)."""
        self.executor.shutdown()
