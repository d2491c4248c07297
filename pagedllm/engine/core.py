"""EngineCore: the busy loop's body — schedule, execute, update — on one process."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

from pagedllm.config import EngineConfig
from pagedllm.core.kv_cache_groups import kv_cache_spec_for
from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.scheduler import Scheduler
from pagedllm.core.scheduler_output import SchedulerOutput
from pagedllm.engine.protocol import EngineCoreOutputs, EngineCoreRequest
from pagedllm.executor.base import StepFuture, get_executor_class
from pagedllm.structured_output import GrammarBitmask, StructuredOutputManager

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
        self.structured_output_manager = None
        if mc.task == "generate":
            self.structured_output_manager = StructuredOutputManager(
                mc, config.structured_outputs_config.backend
            )
        self.scheduler = Scheduler(
            config.scheduler_config,
            cc,
            num_blocks=num_blocks,
            max_model_len=mc.max_model_len,
            async_scheduling=config.scheduler_config.async_scheduling,
            structured_output_manager=self.structured_output_manager,
            kv_cache_spec=kv_cache_spec_for(mc, cc),
            max_concurrent_batches=config.parallel_config.max_concurrent_batches,
        )
        # Submitted steps whose outputs the scheduler has not seen, oldest first: under async
        # scheduling at most two (the one the GPU runs and the one queued behind it), under
        # the pipeline batch queue at most max_concurrent_batches.
        self._in_flight: deque[tuple[SchedulerOutput, StepFuture]] = deque()
        self.max_concurrent_batches = config.parallel_config.max_concurrent_batches
        # Batch queue counters: the most steps in flight at once, and how many steps were
        # submitted while another was still in flight.
        self.peak_batches_in_flight = 0
        self.num_overlapped_steps = 0
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
        if self.max_concurrent_batches > 1:
            return self._step_batch_queue()
        if self.async_scheduling:
            return self._step_async()
        if not self.scheduler.has_unfinished_requests():
            return EngineCoreOutputs(outputs=[], scheduler_stats=self.scheduler.make_stats())
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.total_num_scheduled_tokens == 0:
            self._wait_for_grammars()
        runner_output = self.executor.execute_model(
            scheduler_output, self._grammar_fn(scheduler_output)
        )
        return self.scheduler.update_from_output(scheduler_output, runner_output)

    # ---- structured outputs ----
    def _grammar_fn(self, so: SchedulerOutput) -> Callable[[], GrammarBitmask | None] | None:
        """What the worker calls, after launching the forward, for the step's bitmask."""
        ids = so.structured_output_request_ids
        if not ids:
            return None
        requests = self.scheduler.requests

        def fill() -> GrammarBitmask | None:
            # Requests finished since scheduling (by the previous step) get no row.
            grammars = [getattr(requests.get(r), "grammar", None) for r in ids]
            return self.structured_output_manager.grammar_bitmask(ids, grammars)

        return fill

    def _resolving_grammar_fn(
        self, so: SchedulerOutput, resolved: list[EngineCoreOutputs]
    ) -> Callable[[], GrammarBitmask | None] | None:
        """Async scheduling: a constrained request's matcher needs the token the previous
        step sampled. When one still has a token in flight, the previous step is resolved
        (its outputs applied, into `resolved`) inside the worker's call, after this step's
        forward is launched, so that wait overlaps the device running it."""
        fill = self._grammar_fn(so)
        if fill is None:
            return None
        requests = self.scheduler.requests
        waits = any(
            (r := requests.get(rid)) is not None and r.num_output_placeholders > 1
            for rid in so.structured_output_request_ids
        )
        if not waits or not self._in_flight:
            return fill

        def resolve_then_fill() -> GrammarBitmask | None:
            prev_so, handle = self._in_flight.popleft()
            resolved.append(self.scheduler.update_from_output(prev_so, handle.get()))
            return fill()

        return resolve_then_fill

    def _wait_for_grammars(self) -> None:
        """Nothing could run: if requests wait on grammars, block briefly for one instead of
        spinning the loop."""
        pending = self.scheduler.pending_grammars()
        if pending:
            self.structured_output_manager.wait_for_any(pending, timeout=0.05)

    def _step_async(self) -> EngineCoreOutputs:
        """Keeps two steps submitted: schedules and launches step N+1, then waits for step
        N's tokens and applies them, so host work overlaps the device running N+1."""
        q = self._in_flight
        resolved: list[EngineCoreOutputs] = []  # a previous step applied during a submit
        while len(q) < 2 and self.scheduler.has_unfinished_requests() and not resolved:
            so = self.scheduler.schedule()
            if so.total_num_scheduled_tokens == 0:
                # Nothing to run (every request waits on a token in flight, on memory or on
                # a grammar); the worker must still drop finished or preempted states.
                if so.finished_req_ids or so.preempted_req_ids:
                    self.executor.execute_model(so)
                if not q:
                    self._wait_for_grammars()
                break
            q.append((so, self.executor.submit(so, self._resolving_grammar_fn(so, resolved))))
        if resolved:
            return resolved[0]
        if not q:
            return EngineCoreOutputs(outputs=[], scheduler_stats=self.scheduler.make_stats())
        so, handle = q.popleft()
        return self.scheduler.update_from_output(so, handle.get())

    def _step_batch_queue(self) -> EngineCoreOutputs:
        """Pipeline parallelism: keeps up to max_concurrent_batches steps in flight, each over
        requests no other step in flight holds (the scheduler's in-flight set), so the first
        stage computes step N+1 while the next stage computes step N. Returns the oldest
        step's outputs. A constrained request's previous token is always applied before it
        is scheduled again, so its bitmask is filled at submit time."""
        q = self._in_flight
        while len(q) < self.max_concurrent_batches and self.scheduler.has_unfinished_requests():
            so = self.scheduler.schedule()
            if so.total_num_scheduled_tokens == 0 and not (
                so.finished_req_ids or so.preempted_req_ids
            ):
                if not q:
                    self._wait_for_grammars()
                break  # everything runnable is in flight (or waits on memory or a grammar)
            # An empty step that only drops finished or preempted states still goes in order.
            q.append((so, self.executor.submit(so, self._grammar_fn(so))))
            if so.total_num_scheduled_tokens and len(q) > 1:
                self.num_overlapped_steps += 1
            busy = sum(1 for s, _ in q if s.total_num_scheduled_tokens)
            self.peak_batches_in_flight = max(self.peak_batches_in_flight, busy)
        if not q:
            return EngineCoreOutputs(outputs=[], scheduler_stats=self.scheduler.make_stats())
        so, handle = q.popleft()
        return self.scheduler.update_from_output(so, handle.get())

    def reset_prefix_cache(self) -> None:
        self.scheduler.reset_prefix_cache()

    def shutdown(self) -> None:
        """Stops the executor's workers (idempotent)."""
        self.executor.shutdown()
