"""ModelRunner: turns a SchedulerOutput into model inputs, runs the model, samples.

Keeps per-request state between steps (prompt, sampled tokens, block table) so the scheduler
only sends what changed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from pagedllm.attention.backend import AttentionMetadata, get_attn_backend, kv_cache_shape
from pagedllm.config import EngineConfig
from pagedllm.core.kv_cache_groups import kv_cache_spec_for
from pagedllm.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from pagedllm.distributed.parallel_state import (
    get_pp_group,
    get_tensor_model_parallel_world_size,
    recv_tensor_dict,
    send_tensor_dict,
)
from pagedllm.engine.protocol import LogprobsLists
from pagedllm.sample.sampler import Sampler, SamplerOutput, compute_logprobs
from pagedllm.structured_output import GrammarBitmask
from pagedllm.worker.cuda_graph import CudaGraphRunner, capture_sizes
from pagedllm.worker.gpu_input_batch import InputBuffers, StepInputs
from pagedllm.worker.input_batch import (
    CachedRequestState,
    build_sampling_metadata,
    may_need_host_tokens,
    to_device,
)
from pagedllm.worker.kv_cache_layout import KVCacheLayout, zeroed_cache
from pagedllm.worker.kv_cache_sizing import (
    MemoryBudget,
    check_kv_cache_dtype,
    check_kv_cache_fits,
)
from pagedllm.worker.step_handle import StepHandle

__all__ = ["ModelRunner", "StepHandle", "zeroed_cache"]

logger = logging.getLogger(__name__)

# Called by `submit` after launching the forward: the step's structured-output bitmask.
GrammarFn = Callable[[], GrammarBitmask | None]


class ModelRunner:
    def __init__(self, config: EngineConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.model_config = config.model_config
        self.block_size = config.cache_config.block_size
        self.dtype = self.model_config.dtype
        self.cache_dtype = config.cache_config.cache_dtype or self.dtype
        self.requests: dict[str, CachedRequestState] = {}
        self.sampler = Sampler()
        self.kv_caches: list[torch.Tensor] = []
        self.model: torch.nn.Module | None = None
        self.pooling = None  # a worker.pooling.PoolingRunner when task == "embed"
        self.attn_backend = get_attn_backend("torch_ref" if device.type == "cpu" else "triton")
        sc = config.scheduler_config
        self.max_num_tokens = sc.max_num_batched_tokens
        self.max_num_reqs = sc.max_num_seqs
        self.max_blocks_per_req = -(-self.model_config.max_model_len // self.block_size)
        # KV cache groups, as the scheduler builds them (core/kv_cache_groups.py).
        self.kv_layout = KVCacheLayout(
            kv_cache_spec_for(self.model_config, config.cache_config), self.block_size,
            self.max_num_tokens,
        )
        self.buffers = InputBuffers(
            self.max_num_tokens, self.max_num_reqs, self.max_blocks_per_req, self.block_size,
            device, self.kv_layout.group_windows,
        )
        self.graph_runner: CudaGraphRunner | None = None
        # Pipeline stages run eagerly: their inputs arrive from the previous stage.
        self.pp = get_pp_group()
        # Pipeline batch queue: several steps in flight across the stages, so no stage waits
        # on the last one's sampled ids (no broadcast); the scheduler sends earlier stages
        # each request's new tokens with its next step instead.
        self.tokens_from_scheduler = config.parallel_config.max_concurrent_batches > 1
        self.use_cuda_graph = (
            device.type == "cuda" and not config.enforce_eager and self.model_config.task == "generate"
            and self.pp.world_size == 1
        )
        self.timings: dict[str, float] = {}  # start-up stages, seconds
        self._last: StepHandle | None = None  # the newest submitted step that sampled
        # Requests that still want prompt logprobs, and those whose sampling may read their
        # output ids on the host: most steps have neither, and skip the per-request checks.
        self._want_prompt_lp: set[str] = set()
        self._host_sampling: set[str] = set()

    def load_model(self) -> None:
        from pagedllm.model_executor.loader import load_model

        t0 = time.perf_counter()
        self.model = load_model(self.model_config, self.device, self.attn_backend)
        check_kv_cache_dtype(self.model, self.config.cache_config.kv_cache_dtype,
                             self.cache_dtype, self.device)
        self.vocab_size = self.model_config.vocab_size
        if self.model_config.task == "embed":
            from pagedllm.worker.pooling import PoolingRunner

            self.pooling = PoolingRunner(self.model_config, self.model)
        else:  # before profiling and graph capture: counted, and at stable addresses
            m = self.model
            self.attn_backend.reserve_workspace(
                self.max_num_reqs, m.num_heads, m.num_kv_heads, m.head_dim,
                self.model_config.max_model_len, self.device,
            )  # fmt: skip
        self.kv_layout.place_layers(self.model, self.model_config.max_model_len)
        if self.device.type == "cuda":  # the GEMVs' split-K counters, before graph capture
            from pagedllm.model_executor.layers.ops.split_k import prepare

            prepare(self.device)
        self.timings["load_model"] = time.perf_counter() - t0

    # ---- KV cache ----
    def kv_cache_bytes_per_block(self) -> int:
        return self.kv_layout.bytes_per_block(self.model, self.cache_dtype)

    def determine_num_blocks(self) -> int:
        override = self.config.cache_config.num_gpu_blocks_override
        if override is not None:
            return override
        if self.model_config.task == "embed":
            from pagedllm.worker.pooling import pooling_num_blocks

            return pooling_num_blocks(self.config)
        if self.device.type == "cuda":
            t0 = time.perf_counter()
            num_blocks = self._profile_num_blocks()
            self.timings["profile"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            self._warmup_kernels()
            self.timings["kernel_warmup"] = time.perf_counter() - t0
            return num_blocks
        budget = int(self.config.cache_config.kv_cache_space_gib * (1 << 30))
        return max(1, budget // self.kv_cache_bytes_per_block())

    def _profile_run(self) -> None:
        """A forward at max_num_batched_tokens (and sampling of max_num_seqs rows) on dummy
        inputs, to measure the activation peak. Nothing is written to any cache."""
        num_tokens, num_reqs = self.max_num_tokens, min(self.max_num_reqs, self.max_num_tokens)
        lens = [num_tokens // num_reqs] * num_reqs
        lens[-1] += num_tokens - sum(lens)
        self._dummy_forward(lens, sample=True)

    def _warmup_kernels(self) -> None:
        """Compiles the Triton kernel variants real steps will pick (query-length tiers x the
        num_reqs specialisations 1 / multiple of 16 / other) at start-up, not on a request."""
        cap = min(self.max_num_tokens, self.model_config.max_model_len)
        for q_len in (1, 32, 128):
            for num_reqs in (1, 3, 16):
                if q_len <= cap and q_len * num_reqs <= self.max_num_tokens:
                    self._dummy_forward([q_len] * min(num_reqs, self.max_num_reqs), sample=False)

    @torch.inference_mode()
    def _dummy_forward(self, lens: list[int], sample: bool) -> None:
        m = self.model
        num_tokens, num_reqs = sum(lens), len(lens)
        dev = self.device
        # One zeroed block per layer: every key read resolves to block 0; slots are -1.
        shape = kv_cache_shape(1, self.block_size, m.num_kv_heads, m.head_dim)
        caches = [torch.zeros(shape, dtype=self.cache_dtype, device=dev)] * m.num_layers
        qsl = torch.tensor([0] + np.cumsum(lens).tolist(), dtype=torch.int32)
        sl = torch.tensor(lens, dtype=torch.int32)
        md = AttentionMetadata(
            num_reqs=num_reqs,
            num_actual_tokens=num_tokens,
            slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=dev),
            query_start_loc=qsl.to(dev),
            seq_lens=sl.to(dev),
            block_table=torch.zeros((num_reqs, self.max_blocks_per_req), dtype=torch.int32,
                                    device=dev),
            max_query_len=max(lens),
            max_seq_len=max(lens),
            query_start_loc_cpu=qsl,
            seq_lens_cpu=sl,
        )  # fmt: skip
        input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=dev)
        positions = torch.cat([torch.arange(n, device=dev) for n in lens])
        if self.pp.world_size > 1:
            # Each stage profiles alone: made-up inputs instead of the previous stage's.
            inter = None
            if not self.pp.is_first_rank:
                inter = {k: v.zero_() for k, v in
                         m.make_empty_intermediate_tensors(num_tokens, dev).items()}
            hidden = m(input_ids, positions, caches, md, inter)
        else:
            hidden = m(input_ids, positions, caches, md)
        if sample and self.model_config.task == "generate" and self.pp.is_last_rank:
            logits = m.compute_logits(hidden[:num_reqs])
            # The sampler's worst case: temperature, top-k/top-p (a sort) and a draw.
            probs = logits.div(0.7).sort(dim=-1, descending=True).values.softmax(dim=-1)
            probs.div(torch.empty_like(probs).exponential_()).argmax(dim=-1)
        torch.cuda.synchronize(dev)

    def _profile_num_blocks(self) -> int:
        """KV blocks that fit in gpu_memory_utilization x total after weights and the
        activation peak of a profiling forward; raises ValueError naming the flag to change."""
        dev = self.device
        cc = self.config.cache_config
        gib = float(1 << 30)
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        weights = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        self._profile_run()
        peak = torch.cuda.max_memory_allocated(dev)
        activation_peak = peak - weights
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(dev)
        # CUDA context, cuBLAS workspaces, NCCL: device memory torch's allocator does not own.
        non_torch = max(0, total - free - torch.cuda.memory_reserved(dev))
        # CUDA graphs keep their own pool; allow for it and for allocator fragmentation.
        graph_reserve = 0 if not self.use_cuda_graph else min(int(2 * gib), total // 50)
        budget = int(total * cc.gpu_memory_utilization) - peak - non_torch - graph_reserve
        per_block = self.kv_cache_bytes_per_block()
        num_blocks = max(0, budget // per_block)
        max_len = self.model_config.max_model_len
        logger.info(
            "memory: total %.1f GiB x gpu_memory_utilization %.2f; weights %.2f GiB, activation "
            "peak %.2f GiB (at %d tokens), non-torch %.2f GiB, graph reserve %.2f GiB; KV cache "
            "%.2f GiB = %d blocks of %d tokens; max concurrency at max_model_len=%d: %.2fx",
            total / gib, cc.gpu_memory_utilization, weights / gib, activation_peak / gib,
            self.max_num_tokens, non_torch / gib, graph_reserve / gib,
            num_blocks * per_block / gib, num_blocks, self.block_size, max_len,
            self.kv_layout.max_concurrency(num_blocks, max_len),
        )  # fmt: skip
        self.memory_profile = {
            "total_gib": total / gib, "weights_gib": weights / gib,
            "activation_peak_gib": activation_peak / gib, "non_torch_gib": non_torch / gib,
            "kv_cache_gib": num_blocks * per_block / gib, "num_blocks": num_blocks,
        }  # fmt: skip
        return check_kv_cache_fits(
            MemoryBudget(total, cc.gpu_memory_utilization, weights, activation_peak,
                         non_torch + graph_reserve, self.model_config.quantization,
                         cc.kv_cache_dtype),
            budget, per_block, self.block_size, max_len, self.kv_layout.blocks_for,
        )  # fmt: skip

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.kv_caches = self.kv_layout.allocate(self.model, num_blocks, self.cache_dtype,
                                                 self.device)
        self.num_blocks = num_blocks
        if self.use_cuda_graph:
            self.capture_model()

    # ---- CUDA graphs ----
    def _graph_metadata(self, size: int) -> AttentionMetadata:
        b = self.buffers
        # Dummy decode batch of `size` requests: one token each, nothing written to the cache.
        b.query_start_loc[: size + 1].copy_(torch.arange(size + 1, dtype=torch.int32))
        b.seq_lens[:size].fill_(1)
        b.slot_mapping[:size].fill_(-1)
        b.input_ids[:size].zero_()
        b.positions[:size].zero_()
        for sm in b.extra_slot_mappings:
            sm[:size].fill_(-1)
        md = AttentionMetadata(
            num_reqs=size,
            num_actual_tokens=size,
            slot_mapping=b.slot_mapping[:size],
            query_start_loc=b.query_start_loc[: size + 1],
            seq_lens=b.seq_lens[:size],
            block_table=b.block_table[:size],
            max_query_len=1,
            max_seq_len=self.model_config.max_model_len,
        )
        return self._with_groups(md, size, size)

    def _with_groups(self, md: AttentionMetadata, num_tokens: int, num_reqs: int
                     ) -> AttentionMetadata:
        b = self.buffers
        return self.kv_layout.with_groups(md, b.extra_slot_mappings, b.extra_block_tables,
                                          num_tokens, num_reqs)

    def _graph_forward(self, size: int, md: AttentionMetadata) -> torch.Tensor:
        b = self.buffers
        return self.model(b.input_ids[:size], b.positions[:size], self.kv_caches, md)

    @torch.inference_mode()
    def capture_model(self) -> None:
        """Captures decode graphs at the padded batch sizes (skipped under enforce_eager)."""
        sizes = capture_sizes(self.max_num_reqs)
        # The decode graphs hold the tensor-parallel all-reduces (NCCL, captured): every
        # rank captures the same sizes in the same order.
        mode = "thread_local" if get_tensor_model_parallel_world_size() > 1 else "global"
        self.graph_runner = CudaGraphRunner(sizes, capture_error_mode=mode)
        backend, kv_heads = self.attn_backend, self.model.num_kv_heads
        max_len = self.model_config.max_model_len

        def variants(size: int) -> tuple[int | None, ...]:
            return backend.decode_graph_variants(size, kv_heads, max_len, self.device)

        self.graph_runner.capture(self._graph_forward, self._graph_metadata, variants)
        self.timings["graph_capture"] = self.graph_runner.capture_seconds

    # ---- state ----
    def _update_states(self, so: SchedulerOutput) -> None:
        """Applies the step's changes. Only requests that got blocks (or, under the batch
        queue, new tokens) are listed in `scheduled_cached_reqs`: every state's
        num_computed_tokens moves by its scheduled tokens at the end of `submit`, which the
        listed value confirms."""
        for req_id in so.finished_req_ids | so.preempted_req_ids:
            if self.requests.pop(req_id, None) is not None:
                self._want_prompt_lp.discard(req_id)
                self._host_sampling.discard(req_id)
        for nr in so.scheduled_new_reqs:
            sp = nr.sampling_params
            state = self.requests[nr.req_id] = CachedRequestState(
                req_id=nr.req_id,
                prompt_token_ids=nr.prompt_token_ids,
                output_token_ids=list(nr.output_token_ids),
                sampling_params=sp,
                block_ids=list(nr.block_ids),
                extra_block_ids=tuple(list(ids) for ids in nr.extra_block_ids),
                num_computed_tokens=nr.num_computed_tokens,
                want_prompt_logprobs=(
                    sp is not None and sp.prompt_logprobs is not None and not nr.output_token_ids
                ),
            )
            if state.want_prompt_logprobs:
                self._want_prompt_lp.add(nr.req_id)
            if sp is not None and may_need_host_tokens(sp):
                self._host_sampling.add(nr.req_id)
        take_tokens = self.tokens_from_scheduler and not self.pp.is_last_rank
        for cr in so.scheduled_cached_reqs:
            state = self.requests[cr.req_id]
            if state.num_computed_tokens != cr.num_computed_tokens:
                raise RuntimeError(
                    f"request {cr.req_id}: the worker has {state.num_computed_tokens} tokens "
                    f"computed, the scheduler {cr.num_computed_tokens}"
                )
            state.block_ids.extend(cr.new_block_ids)
            for ids, new in zip(state.extra_block_ids, cr.extra_new_block_ids):
                ids.extend(new)
            if take_tokens:
                state.output_token_ids.extend(cr.new_token_ids)

    # ---- step ----
    def execute_model(self, so: SchedulerOutput, grammar: GrammarFn | None = None
                      ) -> ModelRunnerOutput:
        """Runs one step and waits for its sampled tokens."""
        return self.submit(so, grammar).get()

    @torch.inference_mode()
    def submit(self, so: SchedulerOutput, grammar: GrammarFn | None = None) -> StepHandle:
        """Launches one step; returns before its sampled tokens reach the host.

        Async scheduling submits step N+1 while step N runs: N+1's decode inputs are the
        tokens N sampled, which are copied from N's device tensor (`StepInputs.pending_*`)
        into the input buffer on the device, in stream order. The host learns them at
        `StepHandle.get()`, which must be called in submission order.

        `grammar` (structured outputs) is called once the forward is launched, so the
        bitmask fill overlaps it; the sampler masks the constrained rows with its result.
        """
        self._update_states(so)
        req_ids = list(so.num_scheduled_tokens.keys())
        if not req_ids:
            return StepHandle(ModelRunnerOutput(req_ids=[], sampled_token_ids=[]))
        requests = self.requests
        states = [requests[r] for r in req_ids]
        counts = list(so.num_scheduled_tokens.values())
        try:
            return self._launch(so, grammar, req_ids, states, counts)
        finally:
            for state, n in zip(states, counts):
                state.num_computed_tokens += n

    def _launch(
        self, so: SchedulerOutput, grammar: GrammarFn | None, req_ids: list[str],
        states: list[CachedRequestState], counts: list[int],
    ) -> StepHandle:
        """`submit`'s body: inputs, forward, sampling; the states' progress is still the
        step's start."""
        num_reqs = len(req_ids)
        graph_size = None
        if self.graph_runner is not None and so.total_num_scheduled_tokens == num_reqs:
            graph_size = self.graph_runner.size_for(num_reqs)
        step = self.buffers.prepare(states, counts, pad_to=graph_size)
        if step.pending_token_idx:
            self._copy_pending_inputs(step)
        hidden = self._run_stage(step, graph_size)
        out = ModelRunnerOutput(req_ids=req_ids, sampled_token_ids=[[] for _ in req_ids])
        if hidden is None:
            return self._non_last_stage_handle(out, step, states)
        if self.pooling is not None:
            out.pooler_output = self.pooling.pool(hidden, states, counts)
            return StepHandle(out)
        if self._want_prompt_lp:
            prompt_lp = self._prompt_logprob_ranges(states, counts)
            if prompt_lp:
                self._prompt_logprobs(hidden, states, step.query_start_loc_np, prompt_lp, out)
        sample_rows = step.sample_rows.tolist()
        if not sample_rows:
            return StepHandle(out)
        num_sampling = len(sample_rows)
        if num_sampling == hidden.shape[0] and num_sampling == step.num_tokens:
            sample_hidden = hidden  # decode-only: every row samples, in order
        else:
            sample_hidden = hidden.index_select(0, self.buffers.sample_idx[:num_sampling])
        logits = self.model.compute_logits(sample_hidden)
        sample_states = states if num_sampling == num_reqs else [states[i] for i in sample_rows]
        bitmask = grammar() if grammar is not None else None
        host_tokens = bool(self._host_sampling) and any(
            s.needs_host_tokens for s in sample_states
        )
        if host_tokens and self._last is not None:
            self._last.get()  # penalties and friends read every output token on the host
        smd = build_sampling_metadata(sample_states, self.vocab_size, self.device, host_tokens)
        if bitmask is not None:
            self._set_grammar_bitmask(smd, bitmask, sample_states)
        result = self.sampler(logits, smd)
        if self.pp.world_size > 1 and not self.tokens_from_scheduler:
            # Earlier stages keep the same request states (the first builds inputs from them).
            self.pp.broadcast(result.sampled_token_ids, src=self.pp.world_size - 1)
        for j, state in enumerate(sample_states):
            state.num_pending += 1
            state.sample_row = j
        if self._want_prompt_lp:
            for state in sample_states:
                if state.want_prompt_logprobs:
                    out.prompt_logprobs[state.req_id] = LogprobsLists(
                        state.prompt_lp_ids, state.prompt_lp_vals, state.prompt_lp_ranks
                    )
                    state.want_prompt_logprobs = False
                    self._want_prompt_lp.discard(state.req_id)
        handle = StepHandle(out, sample_rows, sample_states, result)
        self._last = handle
        return handle

    def _run_stage(self, step: StepInputs, graph_size: int | None) -> torch.Tensor | None:
        """This pipeline stage's part of the forward: receives the previous stage's hidden
        states, sends its own on; None on a stage that is not the last."""
        pp = self.pp
        if pp.world_size == 1:
            return self._run_model(step, graph_size)
        inter = None
        if not pp.is_first_rank:
            empty = self.model.make_empty_intermediate_tensors(step.num_tokens, self.device)
            inter = recv_tensor_dict(empty)
        out = self._run_model(step, None, inter)
        if pp.is_last_rank:
            return out
        send_tensor_dict(out)
        return None

    def _non_last_stage_handle(
        self, out: ModelRunnerOutput, step: StepInputs, states: list[CachedRequestState]
    ) -> StepHandle:
        """A stage before the last learns the step's sampled ids from the last stage's
        broadcast, so its request states (and the next step's inputs) match; under the
        batch queue from the scheduler's next step for the request instead."""
        sample_rows = step.sample_rows.tolist()
        if not sample_rows or self.tokens_from_scheduler:
            return StepHandle(out)
        sampled = torch.empty(len(sample_rows), dtype=torch.int64, device=self.device)
        self.pp.broadcast(sampled, src=self.pp.world_size - 1)
        sample_states = [states[i] for i in sample_rows]
        for j, state in enumerate(sample_states):
            if state.want_prompt_logprobs:
                state.want_prompt_logprobs = False
                self._want_prompt_lp.discard(state.req_id)
            state.num_pending += 1
            state.sample_row = j
        handle = StepHandle(out, sample_rows, sample_states, SamplerOutput(sampled, None))
        self._last = handle
        return handle

    def _set_grammar_bitmask(self, smd, bitmask: GrammarBitmask,
                             sample_states: list[CachedRequestState]) -> None:
        row_of = {s.req_id: j for j, s in enumerate(sample_states)}
        pairs = [(row_of[r], i) for i, r in enumerate(bitmask.req_ids) if r in row_of]
        if not pairs:
            return
        rows, src = zip(*pairs)
        mask = torch.from_numpy(bitmask.bitmask)
        if len(src) != len(bitmask.req_ids):
            mask = mask[list(src)]
        if list(rows) != list(range(len(sample_states))):  # else None: every row, in order
            smd.grammar_rows = to_device(list(rows), torch.int64, self.device)
        if self.device.type != "cpu":
            # Pinned + non-blocking: a pageable copy would wait for the forward to finish.
            mask = mask.pin_memory().to(self.device, non_blocking=True)
        smd.grammar_bitmask = mask

    def _copy_pending_inputs(self, step: StepInputs) -> None:
        """Input ids sampled by the previous step, copied device to device into the buffer."""
        prev = self._last
        idx = to_device(step.pending_token_idx, torch.int64, self.device)
        rows = step.pending_sample_rows  # each one's row in the previous step's samples
        if rows == list(range(len(prev.sample_states))):
            src = prev.sampled_device  # the common decode: the same batch, in order
        else:
            src = prev.sampled_device.index_select(0, to_device(rows, torch.int64, self.device))
        self.buffers.input_ids.index_copy_(0, idx, src)

    def _run_model(
        self, step: StepInputs, graph_size: int | None, intermediate_tensors=None
    ) -> torch.Tensor:
        """Runs the model on the uploaded buffers -> hidden [num_tokens, hidden_size] (or,
        on a pipeline stage before the last, its intermediate tensors)."""
        b = self.buffers
        if graph_size is not None:
            gr = self.graph_runner
            variant = self.attn_backend.pick_decode_graph_variant(
                gr.variants[graph_size], step.num_reqs, self.model.num_kv_heads,
                step.max_seq_len, step.total_seq_len, self.device,
            )  # fmt: skip
            return gr.replay(graph_size, variant)[: step.num_tokens]
        n, r = step.num_tokens, step.num_reqs
        md = AttentionMetadata(
            num_reqs=r,
            num_actual_tokens=n,
            slot_mapping=b.slot_mapping[:n],
            query_start_loc=b.query_start_loc[: r + 1],
            seq_lens=b.seq_lens[:r],
            block_table=b.block_table[:r],
            max_query_len=step.max_query_len,
            max_seq_len=step.max_seq_len,
            query_start_loc_cpu=b.query_start_loc_cpu[: r + 1],
            seq_lens_cpu=b.seq_lens_cpu[:r],
            causal=getattr(self.model, "is_causal", True),
            total_seq_len=step.total_seq_len,
        )
        md = self._with_groups(md, n, r)
        if intermediate_tensors is not None or self.pp.world_size > 1:
            return self.model(b.input_ids[:n], b.positions[:n], self.kv_caches, md,
                              intermediate_tensors)
        return self.model(b.input_ids[:n], b.positions[:n], self.kv_caches, md)

    @staticmethod
    def _prompt_logprob_ranges(
        states: list[CachedRequestState], counts: list[int]
    ) -> list[tuple[int, int, int]]:
        """(request index, first pos, last pos excl) of prompt logprobs computed this step."""
        ranges = []
        for i, (state, n) in enumerate(zip(states, counts)):
            if state.want_prompt_logprobs:
                start = state.num_computed_tokens
                last = min(start + n, len(state.prompt_token_ids) - 1)
                if start < last:
                    ranges.append((i, start, last))
        return ranges

    def _prompt_logprobs(self, hidden, states, query_start_loc, prompt_lp, out) -> None:
        """Logprobs of prompt tokens 1..P-1 over this chunk's positions (raw logits)."""
        rows: list[int] = []
        targets: list[int] = []
        for i, first, last in prompt_lp:
            state = states[i]
            base = int(query_start_loc[i]) - state.num_computed_tokens
            rows.extend(range(base + first, base + last))
            targets.extend(state.prompt_token_ids[first + 1 : last + 1])
        idx = torch.tensor(rows, dtype=torch.int64, device=self.device)
        logprobs = self.model.compute_logits(hidden.index_select(0, idx)).float().log_softmax(-1)
        k = max(states[i].sampling_params.prompt_logprobs for i, _, _ in prompt_lp)
        res = compute_logprobs(logprobs, torch.tensor(targets, device=self.device), k)
        ids, vals, ranks = res.token_ids.tolist(), res.logprobs.tolist(), res.ranks.tolist()
        r = 0
        for i, first, last in prompt_lp:
            state = states[i]
            num = state.sampling_params.prompt_logprobs
            for _ in range(first, last):
                state.prompt_lp_ids.append(ids[r][: num + 1])
                state.prompt_lp_vals.append(vals[r][: num + 1])
                state.prompt_lp_ranks.append(ranks[r])
                r += 1
