"""AsyncLLM: the asyncio front-end over the engine-core process(es) (used by the API server).

It tokenizes and validates in the caller's task, sends requests over ZMQ to one of the
data-parallel replicas (DPEngineClient picks the least loaded; one replica without DP), and
one background task per replica reads its output socket: detokenization and stop strings
(OutputProcessor), per-request queues, metrics (labelled with the replica's index).
Invariants:
- every request's queue ends with a finished RequestOutput or an exception, never silence:
  a replica's death fails every in-flight request on it with EngineDeadError;
- once any replica is dead the engine is unhealthy: new requests are refused (503 behind
  the server) while the surviving replicas finish what they hold;
- a generator that is closed or cancelled before its request finished aborts the request in
  the engine core that owns it at once, freeing its KV blocks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from pagedllm.config import EngineConfig
from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.engine.client import EngineDeadError
from pagedllm.engine.dp_client import DPEngineClient
from pagedllm.engine.input_processor import InputProcessor, PromptType
from pagedllm.engine.output_processor import OutputProcessor, ParentRequest, RequestState
from pagedllm.engine.protocol import (
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    RequestRejection,
    SchedulerStats,
    UtilityResult,
)
from pagedllm.outputs import EmbeddingRequestOutput, RequestOutput
from pagedllm.sampling_params import SamplingParams
from pagedllm.tokenizer import get_tokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "AsyncLLM",
    "EngineDeadError",
    "FinishedRequestStats",
    "IterationStats",
    "RequestAbortedError",
    "RequestRejectedError",
    "StatLogger",
]


class RequestRejectedError(ValueError):
    """The engine core refused the request (it can never run); a client error."""


class RequestAbortedError(RuntimeError):
    """The request was aborted (abort() was called for it) before it finished."""


@dataclass(slots=True)
class FinishedRequestStats:
    finish_reason: str
    e2e_latency: float
    queue_time: float
    num_prompt_tokens: int
    num_generation_tokens: int


@dataclass(slots=True)
class IterationStats:
    """What one batch of engine outputs changed, as seen by the front-end."""

    num_generation_tokens: int = 0
    time_to_first_tokens: list[float] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)
    finished_requests: list[FinishedRequestStats] = field(default_factory=list)


class StatLogger(Protocol):
    def record(
        self, scheduler_stats: SchedulerStats | None, iteration: IterationStats,
        engine_index: int = 0,
    ) -> None: ...


class AsyncLLM:
    """Async generation over engine cores in their own processes (data_parallel_size of them).

    Construct (spawns the processes), then `await start()` in the event loop that serves
    requests.
    """

    def __init__(
        self,
        config: EngineConfig,
        stat_loggers: list[StatLogger] | None = None,
        log_level: str = "INFO",
    ) -> None:
        self.config = config
        self.model_config = config.model_config
        self.engines = DPEngineClient(config, log_level=log_level)
        self.engines.start()
        # Loaded while the child loads the model.
        self.tokenizer = get_tokenizer(config.model_config)
        self.input_processor = InputProcessor(
            config.model_config, self.tokenizer, config.scheduler_config.policy,
            config.structured_outputs_config.backend,
        )
        self.output_processor = OutputProcessor(self.tokenizer)
        self.stat_loggers: list[StatLogger] = list(stat_loggers or [])
        # Per replica: its latest stats, and why it died (None while alive).
        self.last_scheduler_stats = [SchedulerStats() for _ in range(self.engines.num_replicas)]
        self._dead_errors: list[str | None] = [None] * self.engines.num_replicas
        self.num_blocks = 0
        self.block_size = config.cache_config.block_size
        self.max_model_len = config.model_config.max_model_len
        self._queues: dict[str, asyncio.Queue] = {}
        # call id -> (replica index, future)
        self._utility_futures: dict[int, tuple[int, asyncio.Future]] = {}
        self._call_ids = itertools.count()
        self._output_tasks: list[asyncio.Task] = []
        # Totals since start.
        self.total_prompt_tokens = 0
        self.total_generation_tokens = 0
        self.total_prefix_cache_queries = 0
        self.total_prefix_cache_hits = 0
        self.total_num_preemptions = 0

    @classmethod
    async def from_engine_args(cls, args: EngineArgs, **kwargs) -> AsyncLLM:
        engine = cls(args.create_engine_config(), **kwargs)
        await engine.start()
        return engine

    async def start(self, timeout: float = 600.0) -> None:
        try:
            readies = await self.engines.wait_ready(timeout)
        except BaseException:
            self.engines.shutdown()
            raise
        # Replicas are identical but size their caches from their own devices: the smallest
        # bounds what a request may need wherever it is routed.
        self.num_blocks = min(r.num_blocks for r in readies)
        self.block_size = readies[0].block_size
        self.max_model_len = min(r.max_model_len for r in readies)
        self._output_tasks = [
            asyncio.create_task(self._output_loop(i), name=f"engine-output-loop-{i}")
            for i in range(self.engines.num_replicas)
        ]

    def shutdown(self) -> None:
        """Stops the output loops and the engine-core processes (blocks up to a few seconds)."""
        for task in self._output_tasks:
            task.cancel()
        self.engines.shutdown()

    async def shutdown_async(self) -> None:
        for task in self._output_tasks:
            task.cancel()
        for task in self._output_tasks:
            try:
                await task
            except BaseException:
                pass
        # Sockets belong to this loop's thread: close them here (the join blocks a few seconds).
        self.engines.shutdown()

    # ---- health ----
    @property
    def dead_error(self) -> str | None:
        """Why the (first) dead replica died; None while every replica is alive."""
        for i, err in enumerate(self._dead_errors):
            if err is not None:
                return self._replica_error(i)
        return None

    def _replica_error(self, index: int) -> str:
        err = self._dead_errors[index] or "engine core died"
        return err if self.engines.num_replicas == 1 else f"data-parallel engine {index}: {err}"

    @property
    def is_healthy(self) -> bool:
        return self.dead_error is None and self.engines.all_alive()

    @property
    def errored(self) -> bool:
        return not self.is_healthy

    async def check_health(self) -> None:
        if not self.is_healthy:
            raise EngineDeadError(self.dead_error or "engine core process is not running")

    @property
    def num_in_flight(self) -> int:
        return len(self._queues)

    # ---- requests ----
    def _add(self, request_id: str, prompt: PromptType, params: SamplingParams | None,
             add_special_tokens: bool, queue: asyncio.Queue, priority: int = 0,
             data_parallel_rank: int | None = None) -> None:
        if not self.is_healthy:
            raise EngineDeadError(self.dead_error or "engine core process is not running")
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.engines.check_rank(data_parallel_rank)
        arrival = time.time()
        n = params.n if params is not None else 1
        parent = ParentRequest(request_id, n, params.output_kind) if n > 1 else None
        reqs: list[tuple[EngineCoreRequest, str | None]] = []
        for i in range(n):
            child_id = parent.child_id(i) if parent else request_id
            child = ParentRequest.child_params(params, i) if parent else params
            reqs.append(self.input_processor.process(
                child_id, prompt, child, arrival, add_special_tokens, priority
            ))
        self._check_fits_cache(len(reqs[0][0].prompt_token_ids))
        for i, (req, text) in enumerate(reqs):
            self.output_processor.add_request(
                req.request_id, request_id, text, req.prompt_token_ids, req.sampling_params,
                arrival, parent=parent, index=i, queue=queue,
            )
        self._queues[request_id] = queue
        # n > 1 children stay on one replica: they share the prompt's blocks there.
        self.engines.add_requests(request_id, [req for req, _ in reqs], data_parallel_rank)

    def _check_fits_cache(self, num_prompt_tokens: int) -> None:
        capacity = self.num_blocks * self.block_size
        if self.num_blocks and num_prompt_tokens > capacity:
            raise ValueError(
                f"The prompt ({num_prompt_tokens} tokens) does not fit in the KV cache "
                f"({self.num_blocks} blocks of {self.block_size} tokens = {capacity} tokens)."
            )

    async def generate(
        self,
        prompt: PromptType,
        params: SamplingParams,
        request_id: str,
        add_special_tokens: bool = True,
        priority: int = 0,
        data_parallel_rank: int | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yields RequestOutputs (per `params.output_kind`) until the finished one.

        `data_parallel_rank` pins the request to one replica (vLLM's argument); None: the
        least-loaded. Raises ValueError for an invalid request (before yielding),
        RequestRejectedError if the core refuses it, EngineDeadError if the engine dies,
        RequestAbortedError after abort().
        """
        queue: asyncio.Queue = asyncio.Queue()
        self._add(request_id, prompt, params, add_special_tokens, queue, priority,
                  data_parallel_rank)
        finished = False
        try:
            while True:
                item = queue.get_nowait() if not queue.empty() else await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._abort_now(request_id)
            self._queues.pop(request_id, None)
            self.engines.release(request_id)

    async def encode(
        self, prompt: PromptType, request_id: str, add_special_tokens: bool = True,
        data_parallel_rank: int | None = None,
    ) -> EmbeddingRequestOutput:
        """Runs one pooling (embedding) request and returns its output."""
        queue: asyncio.Queue = asyncio.Queue()
        self._add(request_id, prompt, None, add_special_tokens, queue,
                  data_parallel_rank=data_parallel_rank)
        done = False
        try:
            item = await queue.get()
            done = True
            if isinstance(item, BaseException):
                raise item
            return item
        finally:
            if not done:
                self._abort_now(request_id)
            self._queues.pop(request_id, None)
            self.engines.release(request_id)

    def _abort_now(self, request_id: str) -> list[str]:
        dropped = self.output_processor.abort_requests([request_id])
        self.engines.abort(request_id, dropped)
        return dropped

    async def abort(self, request_id: str) -> None:
        """Aborts a request: frees its KV blocks now; its generator raises RequestAbortedError."""
        self._abort_now(request_id)
        self.engines.release(request_id)
        queue = self._queues.pop(request_id, None)
        if queue is not None:
            queue.put_nowait(RequestAbortedError(f"request {request_id} was aborted"))

    async def reset_prefix_cache(self) -> None:
        """Resets every replica's prefix cache."""
        await asyncio.gather(*(
            self._utility(i, "reset_prefix_cache") for i in range(self.engines.num_replicas)
        ))

    async def _utility(self, index: int, method: str, *args):
        await self.check_health()
        call_id = next(self._call_ids)
        fut = asyncio.get_running_loop().create_future()
        self._utility_futures[call_id] = (index, fut)
        self.engines.replicas[index].call_utility(call_id, method, list(args))
        return await fut

    # ---- the output loops (one per replica) ----
    async def _output_loop(self, index: int) -> None:
        replica = self.engines.replicas[index]
        try:
            while True:
                msg = await replica.get_output()
                if isinstance(msg, EngineCoreOutputs):
                    if msg.engine_error:
                        raise EngineDeadError(msg.engine_error)
                    self._handle_outputs(index, msg)
                elif isinstance(msg, RequestRejection):
                    self._handle_rejection(msg)
                elif isinstance(msg, UtilityResult):
                    self._handle_utility(msg)
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            self._fail_replica(index, e)

    def _fail_replica(self, index: int, e: BaseException) -> None:
        """Replica `index` is dead: every request and utility call on it fails now."""
        cause = e if isinstance(e, EngineDeadError) else EngineDeadError(f"{type(e).__name__}: {e}")
        self._dead_errors[index] = str(cause) or "engine core died"
        self.engines.mark_dead(index)
        err = EngineDeadError(self._replica_error(index))
        lost = self.engines.requests_on(index)
        logger.error("engine core %d is dead; failing its %d in-flight requests: %s",
                     index, len(lost), self._dead_errors[index].splitlines()[0])
        self.output_processor.abort_requests(lost)
        for external_id in lost:
            self.engines.release(external_id)
            queue = self._queues.pop(external_id, None)
            if queue is not None:
                queue.put_nowait(err)
        for call_id, (owner, fut) in list(self._utility_futures.items()):
            if owner == index:
                del self._utility_futures[call_id]
                if not fut.done():
                    fut.set_exception(err)
        self.last_scheduler_stats[index] = SchedulerStats()

    def _handle_rejection(self, rej: RequestRejection) -> None:
        state = self.output_processor.requests.get(rej.request_id)
        if state is None:
            return
        external_id = state.external_id
        dropped = self.output_processor.abort_requests([external_id])
        self.engines.abort(external_id, [d for d in dropped if d != rej.request_id])
        self.engines.release(external_id)
        queue = self._queues.pop(external_id, None)
        if queue is not None:
            queue.put_nowait(RequestRejectedError(rej.error))

    def _handle_utility(self, res: UtilityResult) -> None:
        entry = self._utility_futures.pop(res.call_id, None)
        if entry is None or entry[1].done():
            return
        fut = entry[1]
        if res.error is not None:
            fut.set_exception(RuntimeError(res.error))
        else:
            fut.set_result(res.result)

    def _handle_outputs(self, index: int, outs: EngineCoreOutputs) -> None:
        now = time.time()
        op = self.output_processor
        iteration = IterationStats()
        states: list[tuple[EngineCoreOutput, RequestState]] = []
        for eco in outs.outputs:
            state = op.requests.get(eco.request_id)
            if state is None:
                continue
            states.append((eco, state))
            m = state.metrics
            if eco.first_scheduled_time is not None and m.first_scheduled_time is None:
                m.first_scheduled_time = eco.first_scheduled_time
            if eco.new_token_ids:
                iteration.num_generation_tokens += len(eco.new_token_ids)
                if m.first_token_time is None:
                    iteration.time_to_first_tokens.append(now - m.arrival_time)
                elif m.last_token_time is not None:
                    iteration.inter_token_latencies.append(now - m.last_token_time)
        processed = op.process_outputs(outs.outputs, now)
        self.engines.abort_on(index, processed.reqs_to_abort)
        stopped_by_string = set(processed.reqs_to_abort)
        for eco, state in states:
            if state.request_id in op.requests:
                continue  # still running
            if eco.finish_reason is not None:
                reason = str(eco.finish_reason)
            elif state.request_id in stopped_by_string:
                reason = "stop"
            else:
                continue
            m = state.metrics
            scheduled = m.first_scheduled_time or m.arrival_time
            num_gen = len(state.detokenizer.token_ids) if state.detokenizer is not None else 0
            iteration.finished_requests.append(
                FinishedRequestStats(
                    finish_reason=reason,
                    e2e_latency=now - m.arrival_time,
                    queue_time=max(0.0, scheduled - m.arrival_time),
                    num_prompt_tokens=len(state.prompt_token_ids),
                    num_generation_tokens=num_gen,
                )
            )
        self.engines.record_outputs(index, outs)
        stats = outs.scheduler_stats
        if stats is not None:
            self.last_scheduler_stats[index] = stats
            self.total_prompt_tokens += stats.num_prompt_tokens
            self.total_generation_tokens += stats.num_generation_tokens
            self.total_prefix_cache_queries += stats.prefix_cache_queries
            self.total_prefix_cache_hits += stats.prefix_cache_hits
            self.total_num_preemptions += stats.num_preemptions
        for sl in self.stat_loggers:
            try:
                sl.record(stats, iteration, index)
            except Exception:
                logger.exception("stat logger failed")

