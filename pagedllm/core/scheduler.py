"""Phase-less continuous-batching scheduler with chunked prefill, prefix caching and
preemption by recompute.

Each step hands every scheduled request some tokens, within one token budget
(`max_num_batched_tokens`) and a cap on running requests (`max_num_seqs`). Running requests go
first, in order; when blocks run out, a running request is preempted (blocks freed, progress
reset, back to the waiting queue): the newest under the default "fcfs" policy, the one with the
largest (priority, arrival time) under "priority". Waiting requests are admitted in arrival
order ("fcfs") or by (priority, arrival time) ("priority", as vLLM's
`--scheduling-policy priority`: lower values first), only in steps that preempted nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from pagedllm.config import SCHEDULING_POLICIES
from pagedllm.core.kv_cache_groups import KVCacheSpec
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.output_update import update_generation, update_one, update_pooling
from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.request_queue import FCFSQueue, PriorityQueue
from pagedllm.core.scheduler_output import (
    CachedRequestData,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
)
from pagedllm.engine.protocol import EngineCoreOutput, EngineCoreOutputs, SchedulerStats

if TYPE_CHECKING:
    from pagedllm.config import CacheConfig, SchedulerConfig
    from pagedllm.structured_output import StructuredOutputManager


_RUNNING = RequestStatus.RUNNING


class Scheduler:
    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        num_blocks: int,
        max_model_len: int | None = None,
        async_scheduling: bool = False,
        structured_output_manager: StructuredOutputManager | None = None,
        kv_cache_spec: KVCacheSpec | None = None,
        max_concurrent_batches: int = 1,
    ) -> None:
        self.scheduler_config = scheduler_config
        self.cache_config = cache_config
        self.max_model_len = max_model_len or scheduler_config.max_model_len
        self.max_num_batched_tokens = scheduler_config.max_num_batched_tokens
        self.max_num_seqs = scheduler_config.max_num_seqs
        self.enable_chunked_prefill = scheduler_config.enable_chunked_prefill
        self.block_size = cache_config.block_size
        # Schedule step N+1 before step N's tokens are known: a request that samples in a
        # step gets a placeholder, and its next decode is scheduled against it.
        self.async_scheduling = async_scheduling
        # kv_cache_spec: the model's KV cache groups (None: one group of full attention).
        # Pipeline batch queue (> 1): that many steps in flight, each over requests no other
        # step in flight holds (a request's next step needs its previous token); the active
        # requests split into that many micro-batches, which alternate.
        self.max_concurrent_batches = max_concurrent_batches
        self.in_flight: set[str] = set()  # requests of scheduled, not yet updated steps
        self.kv_cache_manager = KVCacheManager(
            num_blocks, cache_config.block_size, cache_config.enable_prefix_caching,
            kv_cache_spec, self.max_num_batched_tokens,
        )
        self._multi_group = self.kv_cache_manager.spec.num_groups > 1
        self.requests: dict[str, Request] = {}
        self.policy = scheduler_config.policy
        if self.policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling policy must be one of {SCHEDULING_POLICIES}, "
                             f"got {self.policy!r}")
        self.waiting: FCFSQueue | PriorityQueue = (
            PriorityQueue() if self.policy == "priority" else FCFSQueue()
        )
        self.running: list[Request] = []
        # Compiles grammars and owns matchers; None: constrained requests are refused.
        self.structured_output_manager = structured_output_manager
        # Since the last schedule(): the worker must drop these requests' state.
        self.finished_req_ids: set[str] = set()
        self.preempted_req_ids: set[str] = set()
        # Per-step stat deltas, reset by make_stats().
        self._queries_base = 0
        self._hits_base = 0
        self._num_preemptions = 0
        self._num_prompt_tokens = 0
        self._num_generation_tokens = 0
        self._num_scheduled_tokens = 0
        # This schedule() call's prompt tokens and constrained requests that sample (in
        # batch order).
        self._step_prompt_tokens = 0
        self._step_structured: list[str] = []

    # ------------------------------------------------------------------ requests in and out

    def add_request(self, request: Request) -> None:
        """Queue a request, or raise ValueError (queueing nothing) if it can never run."""
        rid = request.request_id
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        num_prompt = request.num_prompt_tokens
        if num_prompt == 0:
            raise ValueError("The prompt cannot be empty.")
        if request.pooling:
            num_completion = 0
        else:
            if request.max_tokens is None:
                request.max_tokens = max(1, self.max_model_len - num_prompt)
            num_completion = request.max_tokens
        total = num_prompt + num_completion
        if total > self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. "
                f"However, you requested {total} tokens ({num_prompt} in the prompt, "
                f"{num_completion} in the completion). "
                "Please reduce the length of the prompt or completion."
            )
        # The last sampled token is never fed back, so its KV is never stored.
        max_kv_tokens = num_prompt if request.pooling else total - 1
        kvm = self.kv_cache_manager
        if not kvm.can_ever_fit(max_kv_tokens):
            raise ValueError(
                f"Request {rid} needs {kvm.max_blocks_needed(max_kv_tokens)} KV-cache blocks "
                f"({max_kv_tokens} tokens) but the whole cache has "
                f"{kvm.num_usable_blocks} blocks of {self.block_size} tokens. "
                "Reduce the prompt or max_tokens, or give the KV cache more memory."
            )
        if (request.pooling or not self.enable_chunked_prefill) and (
            num_prompt > self.max_num_batched_tokens
        ):
            raise ValueError(
                f"The prompt ({num_prompt} tokens) must be computed in one step but exceeds "
                f"max_num_batched_tokens ({self.max_num_batched_tokens})."
            )
        if request.use_structured_output:
            self._attach_grammar(request)
        request.status = RequestStatus.WAITING
        self.requests[rid] = request
        self.waiting.append(request)

    def _attach_grammar(self, request: Request) -> None:
        """Starts compiling the request's grammar (or takes it from the cache)."""
        if self.structured_output_manager is None:
            raise ValueError("structured_outputs: this engine does not support structured outputs")
        sp = request.sampling_params
        stops = set(sp.all_stop_token_ids)
        if request.eos_token_id is not None:
            stops.add(request.eos_token_id)  # the grammar's end is an end even with ignore_eos
        request.grammar = self.structured_output_manager.new_request_grammar(
            sp.structured_outputs, sorted(stops)
        )

    def pending_grammars(self) -> list:
        """Grammars of waiting requests that are still compiling."""
        mgr = self.structured_output_manager
        if mgr is None:
            return []
        return [r.grammar for r in self.waiting
                if r.grammar is not None and not mgr.is_ready(r.grammar)]

    def finish_requests(self, request_ids: str | Iterable[str], status: RequestStatus) -> None:
        """Finish (typically abort) requests wherever they are; unknown ids are ignored."""
        if not status.is_finished:
            raise ValueError(f"finish_requests needs a finished status, got {status.name}")
        ids = {request_ids} if isinstance(request_ids, str) else set(request_ids)
        to_finish = [r for rid in ids if (r := self.requests.get(rid)) is not None]
        if not to_finish:
            return
        gone = {r.request_id for r in to_finish}
        self.running = [r for r in self.running if r.request_id not in gone]
        if any(r.status != RequestStatus.RUNNING for r in to_finish):
            self.waiting.remove_ids(gone)
        for r in to_finish:
            r.status = status
            self._free_request(r)

    def _free_request(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        self.finished_req_ids.add(request.request_id)
        del self.requests[request.request_id]

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def get_num_unfinished_requests(self) -> int:
        return len(self.waiting) + len(self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def reset_prefix_cache(self) -> bool:
        return self.kv_cache_manager.reset_prefix_cache()

    # ------------------------------------------------------------------ scheduling

    def schedule(self) -> SchedulerOutput:
        """One step: running requests first (in order, preempting when blocks run out), then
        waiting ones. Each scheduled request is advanced in the same pass; the step lists in
        `scheduled_cached_reqs` only running requests that got new blocks (or, under the
        batch queue, new tokens): the worker advances every scheduled request's
        `num_computed_tokens` by its tokens itself and checks it against the listed ones."""
        self._step_prompt_tokens = 0
        self._step_structured = []
        num_scheduled: dict[str, int] = {}
        new_reqs: list[NewRequestData] = []
        new_block_ids: dict[str, list[list[int]]] = {}  # per KV cache group
        max_reqs = self._micro_batch_size()
        budget, preempted_any = self._schedule_running(num_scheduled, new_block_ids, max_reqs)
        if not preempted_any:
            budget = self._schedule_waiting(budget, num_scheduled, new_reqs, max_reqs)
        cached_reqs = self._cached_request_data(new_block_ids, num_scheduled, new_reqs)
        total = self.max_num_batched_tokens - budget
        out = SchedulerOutput(
            scheduled_new_reqs=new_reqs,
            scheduled_cached_reqs=cached_reqs,
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=total,
            finished_req_ids=self.finished_req_ids,
            preempted_req_ids=self.preempted_req_ids,
            structured_output_request_ids=self._step_structured,  # batch order
        )
        self.finished_req_ids = set()
        self.preempted_req_ids = set()
        self._num_prompt_tokens += self._step_prompt_tokens
        self._num_scheduled_tokens = total
        return out

    def _schedule_running(
        self, num_scheduled: dict[str, int], new_block_ids: dict[str, list[list[int]]],
        max_reqs: int,
    ) -> tuple[int, bool]:
        """Gives running requests their tokens in order, preempting from the back when blocks
        run out, and advances each (`_advance`); returns the budget left and whether anything
        was preempted. The common decode costs a few attribute reads and one allocation
        check."""
        budget = self.max_num_batched_tokens
        preempted_any = False
        running = self.running
        allocate = self.kv_cache_manager.allocate_slots
        max_len = self.max_model_len
        in_flight = self.in_flight
        idx = 0
        while idx < len(running) and budget > 0 and len(num_scheduled) < max_reqs:
            req = running[idx]
            if in_flight and req.request_id in in_flight:
                idx += 1  # its previous step is not back yet (pipeline batch queue)
                continue
            placeholders = req.num_output_placeholders
            num_tokens = len(req.all_token_ids)
            if placeholders and (
                len(req.output_token_ids) + placeholders >= req.max_tokens
                or num_tokens + placeholders >= max_len
            ):  # its last token is in flight (max_tokens or the context end): nothing to do
                idx += 1
                continue
            computed = req.num_computed_tokens
            num_new = num_tokens + placeholders - computed
            if num_new > budget:
                num_new = budget
            if num_new > max_len - computed:
                num_new = max_len - computed
            if num_new <= 0:
                idx += 1
                continue
            new_blocks = allocate(req, num_new)
            while new_blocks is None:
                victim, pos = self._pick_victim()
                if pos < idx:  # already passed this step: undo its share, keep idx on req
                    idx -= 1
                    budget += self._unschedule(victim, num_scheduled, new_block_ids)
                self._preempt(victim)
                preempted_any = True
                if victim is req:
                    break
                new_blocks = allocate(req, num_new)
            if new_blocks is None:
                break
            num_scheduled[req.request_id] = num_new
            if new_blocks:  # else: nothing for the worker but the advance it makes itself
                new_block_ids[req.request_id] = (
                    self.kv_cache_manager.take_new_block_ids(req.request_id)
                    if self._multi_group else [[b.block_id for b in new_blocks]]
                )
            self._advance(req, computed, num_new)
            budget -= num_new
            idx += 1
        return budget, preempted_any

    def _advance(self, req: Request, start: int, num_new: int) -> None:
        """Moves a scheduled request's progress by this step's tokens; one that reaches its
        last token samples (its grammar id listed; async: a placeholder for the token in
        flight)."""
        end = start + num_new
        req.num_computed_tokens = end
        num_prompt = len(req.prompt_token_ids)
        if start < num_prompt:
            self._step_prompt_tokens += min(num_prompt, end) - start
        if not req.pooling and end == len(req.all_token_ids) + req.num_output_placeholders:
            if req.grammar is not None:
                self._step_structured.append(req.request_id)
            if self.async_scheduling:
                req.num_output_placeholders += 1  # this step samples for it

    def _unschedule(
        self, req: Request, num_scheduled: dict[str, int],
        new_block_ids: dict[str, list[list[int]]],
    ) -> int:
        """Takes back a request scheduled earlier in this step (it is being preempted, which
        resets its progress and placeholders); returns its tokens."""
        rid = req.request_id
        n = num_scheduled.pop(rid, 0)
        new_block_ids.pop(rid, None)
        if n:
            start = req.num_computed_tokens - n
            num_prompt = len(req.prompt_token_ids)
            if start < num_prompt:
                self._step_prompt_tokens -= min(num_prompt, start + n) - start
            if rid in self._step_structured:
                self._step_structured.remove(rid)
        return n

    def _cached_request_data(
        self, new_block_ids: dict[str, list[list[int]]], num_scheduled: dict[str, int],
        new_reqs: list[NewRequestData],
    ) -> list[CachedRequestData]:
        """The scheduled running requests the worker must be told about: those that got new
        blocks, and under the batch queue also those that gained output tokens since they
        were last scheduled (stages before the last do not sample; every decode has one).
        Under the batch queue every scheduled request joins the in-flight set."""
        requests = self.requests
        if self.max_concurrent_batches == 1:
            return [
                CachedRequestData(rid, ids[0], requests[rid].num_computed_tokens
                                  - num_scheduled[rid], tuple(ids[1:]))
                for rid, ids in new_block_ids.items()
            ]
        cached_reqs: list[CachedRequestData] = []
        new_ids = {nr.req_id for nr in new_reqs}
        for rid in num_scheduled:
            req = requests[rid]
            ids = new_block_ids.get(rid)
            tokens = req.output_token_ids[req.num_output_tokens_sent:]
            req.num_output_tokens_sent = len(req.output_token_ids)
            if rid in new_ids or (ids is None and not tokens):
                continue
            ids = ids or [[] for _ in range(self.kv_cache_manager.spec.num_groups)]
            cached_reqs.append(CachedRequestData(
                rid, ids[0], req.num_computed_tokens - num_scheduled[rid], tuple(ids[1:]),
                tokens,
            ))
        self.in_flight.update(num_scheduled)
        return cached_reqs

    def _micro_batch_size(self) -> int:
        """Requests one step may hold: all it can, or with a batch queue an even share of
        the active requests per step in flight."""
        if self.max_concurrent_batches == 1:
            return self.max_num_seqs
        active = min(len(self.running) + len(self.waiting), self.max_num_seqs)
        return max(1, -(-active // self.max_concurrent_batches))

    def _schedule_waiting(
        self, budget: int, num_scheduled: dict[str, int], new_reqs: list[NewRequestData],
        max_reqs: int,
    ) -> int:
        """Admit waiting requests in queue order until one does not fit; returns the budget
        left."""
        kvm = self.kv_cache_manager
        mgr = self.structured_output_manager
        compiling: list[Request] = []  # skipped, not blocking: their grammar is not ready
        while (self.waiting and budget > 0 and len(self.running) < self.max_num_seqs
               and len(num_scheduled) < max_reqs):
            req = self.waiting[0]
            if req.request_id in self.in_flight:
                break  # preempted while its step is in flight: resumes once that is back
            if req.grammar is not None and not mgr.is_ready(req.grammar):
                compiling.append(self.waiting.popleft())
                continue
            hit_blocks, num_hit = kvm.get_computed_blocks(req)
            num_new = req.num_tokens - num_hit
            if num_new > budget and (req.pooling or not self.enable_chunked_prefill):
                break
            num_new = min(num_new, budget, self.max_model_len - num_hit)
            if kvm.allocate_slots(req, num_new, num_hit, hit_blocks) is None:
                break
            self.waiting.popleft()
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_hit
            req.num_computed_tokens = num_hit
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            ids = (kvm.take_new_block_ids(req.request_id) if self._multi_group
                   else [kvm.get_block_ids(req.request_id)])
            new_reqs.append(
                NewRequestData(
                    req_id=req.request_id,
                    prompt_token_ids=req.prompt_token_ids,
                    output_token_ids=list(req.output_token_ids),
                    sampling_params=req.sampling_params,
                    block_ids=ids[0],
                    num_computed_tokens=num_hit,
                    extra_block_ids=tuple(ids[1:]),
                )
            )
            num_scheduled[req.request_id] = num_new
            self._advance(req, num_hit, num_new)
            budget -= num_new
        for req in reversed(compiling):
            self.waiting.appendleft(req)
        return budget

    def _pick_victim(self) -> tuple[Request, int]:
        """Removes and returns the running request to preempt, with its former index: the
        newest (fcfs), or the largest (priority, arrival time) (priority)."""
        pos = len(self.running) - 1
        if self.policy == "priority":
            pos = max(range(len(self.running)),
                      key=lambda i: (self.running[i].priority, self.running[i].arrival_time))
        return self.running.pop(pos), pos

    def _preempt(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_output_placeholders = 0  # tokens in flight are dropped (recomputed)
        if request.grammar is not None:
            request.grammar.sync_to(request.num_output_tokens)
        request.num_preemptions += 1
        self._num_preemptions += 1
        self.preempted_req_ids.add(request.request_id)
        self.waiting.appendleft(request)

    # ------------------------------------------------------------------ results

    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_runner_output: ModelRunnerOutput
    ) -> EngineCoreOutputs:
        """Append sampled tokens, apply stop checks, free finished requests, emit outputs."""
        mro = model_runner_output
        scheduled = scheduler_output.num_scheduled_tokens
        if self.in_flight:
            self.in_flight.difference_update(scheduled)
        requests = self.requests
        if len(mro.req_ids) == len(scheduled) and mro.req_ids == list(scheduled):
            pairs = zip(mro.req_ids, mro.sampled_token_ids)  # the runner keeps batch order
        else:
            index = {rid: i for i, rid in enumerate(mro.req_ids)}
            pairs = ((rid, mro.sampled_token_ids[i] if (i := index.get(rid)) is not None
                      else []) for rid in scheduled)
        # One sampled token, no logprobs, no grammar, no pooling: `update_one`.
        plain = not mro.logprobs and not mro.prompt_logprobs
        max_len = self.max_model_len
        num_generated = 0
        outputs: list[EngineCoreOutput] = []
        finished: list[Request] = []
        for rid, sampled in pairs:
            req = requests.get(rid)
            if req is None or req.status is not _RUNNING:
                continue  # aborted (or preempted) since it was scheduled
            if req.pooling:
                out = update_pooling(req, mro)
            else:
                if sampled and req.num_output_placeholders:
                    req.num_output_placeholders -= 1
                if (plain and len(sampled) == 1 and req.grammar is None
                        and req.num_computed_tokens >= len(req.all_token_ids)):
                    outputs.append(update_one(req, sampled[0], max_len))
                    num_generated += 1
                    if req.status is not _RUNNING:
                        finished.append(req)
                    continue
                out = update_generation(req, sampled, mro, max_len)
                if out is not None:
                    num_generated += len(out.new_token_ids)
            if out is not None:
                outputs.append(out)
            if req.is_finished:
                finished.append(req)
        if finished:
            done = {r.request_id for r in finished}
            self.running = [r for r in self.running if r.request_id not in done]
            for r in finished:
                self._free_request(r)
        self._num_generation_tokens += num_generated
        return EngineCoreOutputs(outputs=outputs, scheduler_stats=self.make_stats())

    # ------------------------------------------------------------------ stats

    def make_stats(self) -> SchedulerStats:
        """Gauges now, counters as deltas since the previous call."""
        kvm = self.kv_cache_manager
        stats = SchedulerStats(
            num_running_reqs=len(self.running),
            num_waiting_reqs=len(self.waiting),
            kv_cache_usage=kvm.usage,
            prefix_cache_queries=kvm.prefix_cache_queries - self._queries_base,
            prefix_cache_hits=kvm.prefix_cache_hits - self._hits_base,
            num_preemptions=self._num_preemptions,
            num_scheduled_tokens=self._num_scheduled_tokens,
            num_prompt_tokens=self._num_prompt_tokens,
            num_generation_tokens=self._num_generation_tokens,
        )
        self._queries_base = kvm.prefix_cache_queries
        self._hits_base = kvm.prefix_cache_hits
        self._num_preemptions = 0
        self._num_prompt_tokens = 0
        self._num_generation_tokens = 0
        self._num_scheduled_tokens = 0
        return stats
