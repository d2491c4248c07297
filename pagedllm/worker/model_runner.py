"""ModelRunner: turns a SchedulerOutput into model inputs, runs the model, samples.

Keeps per-request state between steps (prompt, sampled tokens, block table) so the scheduler
only sends what changed.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from pagedllm.attention.backend import AttentionMetadata, get_attn_backend, kv_cache_shape
from pagedllm.config import EngineConfig
from pagedllm.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from pagedllm.engine.protocol import LogprobsLists
from pagedllm.sample.sampler import Sampler, compute_logprobs
from pagedllm.worker.input_batch import CachedRequestState, build_sampling_metadata

logger = logging.getLogger(__name__)


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
        self.attn_backend = get_attn_backend("torch_ref" if device.type == "cpu" else "triton")

    def load_model(self) -> None:
        from pagedllm.model_executor.loader import load_model

        self.model = load_model(self.model_config, self.device, self.attn_backend)
        self.vocab_size = self.model_config.vocab_size

    # ---- KV cache ----
    def kv_cache_bytes_per_block(self) -> int:
        m = self.model
        elem = torch.tensor([], dtype=self.cache_dtype).element_size()
        return 2 * self.block_size * m.num_kv_heads * m.head_dim * elem * m.num_layers

    def determine_num_blocks(self) -> int:
        override = self.config.cache_config.num_gpu_blocks_override
        if override is not None:
            return override
        budget = int(self.config.cache_config.kv_cache_space_gib * (1 << 30))
        return max(1, budget // self.kv_cache_bytes_per_block())

    def initialize_kv_cache(self, num_blocks: int) -> None:
        m = self.model
        shape = kv_cache_shape(num_blocks, self.block_size, m.num_kv_heads, m.head_dim)
        # empty, not zeros: pages are only touched when a block is first written.
        self.kv_caches = [
            torch.empty(shape, dtype=self.cache_dtype, device=self.device) for _ in range(m.num_layers)
        ]
        self.num_blocks = num_blocks

    # ---- state ----
    def _update_states(self, so: SchedulerOutput) -> None:
        for req_id in so.finished_req_ids | so.preempted_req_ids:
            self.requests.pop(req_id, None)
        for nr in so.scheduled_new_reqs:
            sp = nr.sampling_params
            self.requests[nr.req_id] = CachedRequestState(
                req_id=nr.req_id,
                prompt_token_ids=nr.prompt_token_ids,
                output_token_ids=list(nr.output_token_ids),
                sampling_params=sp,
                block_ids=list(nr.block_ids),
                num_computed_tokens=nr.num_computed_tokens,
                want_prompt_logprobs=(
                    sp is not None and sp.prompt_logprobs is not None and not nr.output_token_ids
                ),
            )
        for cr in so.scheduled_cached_reqs:
            state = self.requests[cr.req_id]
            state.block_ids.extend(cr.new_block_ids)
            state.num_computed_tokens = cr.num_computed_tokens

    # ---- step ----
    @torch.inference_mode()
    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(so)
        req_ids = list(so.num_scheduled_tokens.keys())
        if not req_ids:
            return ModelRunnerOutput(req_ids=[], sampled_token_ids=[])
        bs = self.block_size
        num_reqs = len(req_ids)
        states = [self.requests[r] for r in req_ids]
        counts = [so.num_scheduled_tokens[r] for r in req_ids]
        total = sum(counts)
        input_ids = np.empty(total, dtype=np.int64)
        positions = np.empty(total, dtype=np.int64)
        slot_mapping = np.empty(total, dtype=np.int64)
        query_start_loc = np.zeros(num_reqs + 1, dtype=np.int32)
        seq_lens = np.empty(num_reqs, dtype=np.int32)
        max_blocks = max(len(s.block_ids) for s in states)
        block_table = np.zeros((num_reqs, max_blocks), dtype=np.int32)
        sample_rows: list[int] = []  # request index
        sample_token_idx: list[int] = []  # flat token index of the last token
        prompt_lp: list[tuple[int, int, int]] = []  # (request index, first pos, last pos excl)
        offset = 0
        for i, (state, n) in enumerate(zip(states, counts)):
            start = state.num_computed_tokens
            end = start + n
            input_ids[offset : offset + n] = state.token_slice(start, end)
            pos = np.arange(start, end, dtype=np.int64)
            positions[offset : offset + n] = pos
            blocks = np.asarray(state.block_ids, dtype=np.int64)
            block_table[i, : len(blocks)] = blocks
            slot_mapping[offset : offset + n] = blocks[pos // bs] * bs + pos % bs
            query_start_loc[i + 1] = offset + n
            seq_lens[i] = end
            if end == state.num_tokens:
                sample_rows.append(i)
                sample_token_idx.append(offset + n - 1)
            if state.want_prompt_logprobs:
                last = min(end, len(state.prompt_token_ids) - 1)
                if start < last:
                    prompt_lp.append((i, start, last))
            offset += n
        dev = self.device
        qsl_cpu = torch.from_numpy(query_start_loc)
        sl_cpu = torch.from_numpy(seq_lens)
        md = AttentionMetadata(
            num_reqs=num_reqs,
            num_actual_tokens=total,
            slot_mapping=torch.from_numpy(slot_mapping).to(dev, non_blocking=True),
            query_start_loc=qsl_cpu.to(dev, non_blocking=True),
            seq_lens=sl_cpu.to(dev, non_blocking=True),
            block_table=torch.from_numpy(block_table).to(dev, non_blocking=True),
            max_query_len=max(counts),
            max_seq_len=int(seq_lens.max()),
            query_start_loc_cpu=qsl_cpu,
            seq_lens_cpu=sl_cpu,
        )
        hidden = self.model(
            torch.from_numpy(input_ids).to(dev, non_blocking=True),
            torch.from_numpy(positions).to(dev, non_blocking=True),
            self.kv_caches,
            md,
        )
        out = ModelRunnerOutput(req_ids=req_ids, sampled_token_ids=[[] for _ in req_ids])
        if prompt_lp:
            self._prompt_logprobs(hidden, states, query_start_loc, prompt_lp, out)
        if not sample_rows:
            return out
        idx = torch.tensor(sample_token_idx, dtype=torch.int64, device=dev)
        logits = self.model.compute_logits(hidden.index_select(0, idx))
        sample_states = [states[i] for i in sample_rows]
        smd = build_sampling_metadata(sample_states, self.vocab_size, dev)
        result = self.sampler(logits, smd)
        sampled = result.sampled_token_ids.tolist()  # the one host sync of the step
        lp = result.logprobs
        if lp is not None:
            lp_ids, lp_vals, lp_ranks = lp.token_ids.tolist(), lp.logprobs.tolist(), lp.ranks.tolist()
        for j, (i, state) in enumerate(zip(sample_rows, sample_states)):
            tok = sampled[j]
            state.output_token_ids.append(tok)
            out.sampled_token_ids[i] = [tok]
            num_lp = state.sampling_params.logprobs
            if lp is not None and num_lp is not None:
                out.logprobs[state.req_id] = LogprobsLists(
                    [lp_ids[j][: num_lp + 1]], [lp_vals[j][: num_lp + 1]], [lp_ranks[j]]
                )
            if state.want_prompt_logprobs:
                out.prompt_logprobs[state.req_id] = LogprobsLists(
                    state.prompt_lp_ids, state.prompt_lp_vals, state.prompt_lp_ranks
                )
                state.want_prompt_logprobs = False
        return out

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
