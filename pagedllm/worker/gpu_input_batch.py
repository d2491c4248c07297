"""Persistent input buffers for one step, and the vectorized step-input preparation.

Every per-step model input lives in a buffer allocated once at the largest size a step can have
(`max_num_batched_tokens` tokens, `max_num_seqs` requests): a host staging copy (pinned on CUDA,
so the upload is asynchronous) and a device copy. A step fills the host arrays with numpy (one
Python iteration per request, none per token), uploads the used prefix non-blocking, and hands
out views of the device buffers. CUDA graphs capture those same device buffers, so replaying a
graph only needs the buffers refilled.

KV cache groups (`core/kv_cache_groups.py`): group 0's block table and slot mapping are
`block_table` / `slot_mapping`; groups 1.. have theirs in `extra_block_tables` /
`extra_slot_mappings`. In a sliding-window group a row's entries before the window of the step's
first query are written as the null block (the scheduler freed those blocks by the same rule).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pagedllm.core.kv_cache_groups import NULL_BLOCK_ID, num_dead_blocks
from pagedllm.worker.input_batch import CachedRequestState


@dataclass(slots=True)
class StepInputs:
    """Host-side description of one step, produced by `InputBuffers.prepare`."""

    num_reqs: int
    num_tokens: int  # real tokens of the step
    num_padded_tokens: int  # tokens the model runs (>= num_tokens; graph padding)
    max_query_len: int
    max_seq_len: int
    total_seq_len: int  # sum of the real requests' seq_lens
    sample_rows: np.ndarray  # [num_sampling] request index of each sampling request
    sample_token_idx: np.ndarray  # [num_sampling] flat token index of its last token
    query_start_loc_np: np.ndarray  # [num_reqs + 1] int32 (a copy)
    # Async scheduling: flat token indices whose input id was sampled by the previous step
    # and is still only on the device (the host wrote 0 there), and whose request it is.
    pending_token_idx: list[int]
    pending_req_ids: list[str]
    pending_sample_rows: list[int]  # each one's row in the previous step's sampled tensor


class InputBuffers:
    """Host (pinned on CUDA) and device buffers for input ids, positions, slots and metadata."""

    def __init__(
        self,
        max_num_tokens: int,
        max_num_reqs: int,
        max_blocks_per_req: int,
        block_size: int,
        device: torch.device,
        group_windows: tuple[int | None, ...] = (None,),
    ) -> None:
        self.group_windows = group_windows  # per KV cache group: its window (None: full)
        self._single_full = group_windows == (None,)
        self.max_num_tokens = max_num_tokens
        self.max_num_reqs = max_num_reqs
        self.max_blocks_per_req = max_blocks_per_req
        self.block_size = block_size
        self.device = device
        pin = device.type == "cuda"

        def host(*shape: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, pin_memory=pin)

        def dev(t: torch.Tensor) -> torch.Tensor:
            # On CPU the host buffer is the model's input: nothing to upload.
            return t.to(device) if device.type != "cpu" else t

        self.input_ids_cpu = host(max_num_tokens, dtype=torch.int64)
        self.positions_cpu = host(max_num_tokens, dtype=torch.int64)
        self.slot_mapping_cpu = host(max_num_tokens, dtype=torch.int64)
        self.query_start_loc_cpu = host(max_num_reqs + 1, dtype=torch.int32)
        self.seq_lens_cpu = host(max_num_reqs, dtype=torch.int32)
        self.block_table_cpu = host(max_num_reqs, max_blocks_per_req, dtype=torch.int32)
        self.sample_idx_cpu = host(max_num_reqs, dtype=torch.int64)
        # numpy views share memory with the host tensors.
        self.input_ids_np = self.input_ids_cpu.numpy()
        self.positions_np = self.positions_cpu.numpy()
        self.slot_mapping_np = self.slot_mapping_cpu.numpy()
        self.query_start_loc_np = self.query_start_loc_cpu.numpy()
        self.seq_lens_np = self.seq_lens_cpu.numpy()
        self.block_table_np = self.block_table_cpu.numpy()
        self.sample_idx_np = self.sample_idx_cpu.numpy()
        self.input_ids = dev(self.input_ids_cpu)
        self.positions = dev(self.positions_cpu)
        self.slot_mapping = dev(self.slot_mapping_cpu)
        self.query_start_loc = dev(self.query_start_loc_cpu)
        self.seq_lens = dev(self.seq_lens_cpu)
        self.block_table = dev(self.block_table_cpu)
        self.sample_idx = dev(self.sample_idx_cpu)
        num_extra = len(group_windows) - 1
        self.extra_slot_mapping_cpu = [host(max_num_tokens, dtype=torch.int64)
                                       for _ in range(num_extra)]
        self.extra_block_table_cpu = [host(max_num_reqs, max_blocks_per_req, dtype=torch.int32)
                                      for _ in range(num_extra)]
        self.extra_slot_mappings = [dev(t) for t in self.extra_slot_mapping_cpu]
        self.extra_block_tables = [dev(t) for t in self.extra_block_table_cpu]
        # Per group: (slot mapping, block table) numpy views.
        self._group_np = [(self.slot_mapping_np, self.block_table_np)] + [
            (sm.numpy(), bt.numpy())
            for sm, bt in zip(self.extra_slot_mapping_cpu, self.extra_block_table_cpu)
        ]
        # Per block-table row: the state whose tables it holds, and their shape as written
        # (one group: the number of blocks; several: per group (blocks, nulled blocks)). A
        # state's tables only grow and their nulled prefix only grows; a resumed request
        # gets a new state.
        self._row_state: list[CachedRequestState | None] = [None] * max_num_reqs
        self._row_shape: list[object] = [None] * max_num_reqs
        self._arange = np.arange(max(max_num_tokens, max_num_reqs) + 1, dtype=np.int64)
        # Marks the end of the last upload: the host buffers are not rewritten before it, even
        # on steps that never sync (prefill chunks that sample nothing).
        self._uploaded = torch.cuda.Event() if device.type == "cuda" else None

    def prepare(
        self,
        states: list[CachedRequestState],
        counts: list[int],
        pad_to: int | None = None,
    ) -> StepInputs:
        """Fills the host buffers for `states` (batch order) and uploads them to the device.

        `pad_to` (decode-only batches replayed by a CUDA graph) pads the batch with dummy
        requests of one token each: input id 0, position 0, slot -1 (never written), seq_len 1.
        """
        if self._uploaded is not None:
            self._uploaded.synchronize()
        num_reqs = len(states)
        counts_np = np.asarray(counts, dtype=np.int64)
        total = int(counts_np.sum())
        bs = self.block_size
        starts, num_tokens, pending = self._fill_ids_and_blocks(states, counts)
        ends = starts + counts_np
        qsl = self.query_start_loc_np
        qsl[0] = 0
        np.cumsum(counts_np, out=qsl[1 : num_reqs + 1])
        # positions: start of each request repeated over its tokens, plus the offset inside it.
        req_of_token = np.repeat(self._arange[:num_reqs], counts_np)
        pos = self.positions_np[:total]
        np.subtract(self._arange[:total], qsl[:num_reqs].astype(np.int64)[req_of_token], out=pos)
        pos += starts[req_of_token]
        block_idx = pos // bs
        in_block = pos % bs
        for slot_np, bt in self._group_np:
            slot_np[:total] = bt[req_of_token, block_idx].astype(np.int64) * bs + in_block
        self.seq_lens_np[:num_reqs] = ends
        padded_reqs, padded_tokens = num_reqs, total
        if pad_to is not None and pad_to > num_reqs:
            self._pad(num_reqs, total, pad_to)
            padded_reqs, padded_tokens = pad_to, total + pad_to - num_reqs
        sampling = ends == num_tokens
        sample_rows = np.nonzero(sampling)[0]
        sample_token_idx = qsl[1 : num_reqs + 1][sample_rows].astype(np.int64) - 1
        self.sample_idx_np[: len(sample_rows)] = sample_token_idx
        self._upload(padded_tokens, padded_reqs, len(sample_rows))
        return StepInputs(
            num_reqs=num_reqs,
            num_tokens=total,
            num_padded_tokens=padded_tokens,
            max_query_len=int(counts_np.max()) if num_reqs else 0,
            max_seq_len=int(ends.max()) if num_reqs else 0,
            total_seq_len=int(ends.sum()),
            sample_rows=sample_rows,
            sample_token_idx=sample_token_idx,
            query_start_loc_np=qsl[: num_reqs + 1].copy(),
            pending_token_idx=pending[0],
            pending_req_ids=pending[1],
            pending_sample_rows=pending[2],
        )

    def _fill_ids_and_blocks(
        self, states: list[CachedRequestState], counts: list[int]
    ) -> tuple[np.ndarray, np.ndarray, tuple[list[int], list[str], list[int]]]:
        """Writes each request's input ids and block-table rows (one Python iteration per
        request). Returns its first position, its token count with pending samples, and the
        flat indices, request ids and previous-step sample rows of input ids only the device
        holds."""
        num_reqs = len(states)
        ids_np = self.input_ids_np
        starts = np.empty(num_reqs, dtype=np.int64)
        num_tokens = np.empty(num_reqs, dtype=np.int64)
        pending_idx: list[int] = []
        pending_reqs: list[str] = []
        pending_rows: list[int] = []
        fill_rows = self._fill_block_row if self._single_full else self._fill_group_rows
        offset = 0
        for i, state in enumerate(states):
            start = state.num_computed_tokens
            n = counts[i]
            starts[i] = start
            prompt = state.prompt_token_ids
            p = len(prompt)
            known = p + len(state.output_token_ids)
            # The step samples when its tokens reach the last known or pending token.
            num_tokens[i] = known + state.num_pending
            if start + n > known and (n != 1 or not state.num_pending):
                raise RuntimeError(
                    f"request {state.req_id}: {n} token(s) at {start} reach past its known tokens"
                )
            if n == 1:
                # Decode (or the last prompt token): one element, no list slicing.
                if start >= known:
                    ids_np[offset] = 0  # sampled by the previous step; copied on the device
                    pending_idx.append(offset)
                    pending_reqs.append(state.req_id)
                    pending_rows.append(state.sample_row)
                else:
                    ids_np[offset] = (
                        prompt[start] if start < p else state.output_token_ids[start - p]
                    )
            else:
                ids_np[offset : offset + n] = state.token_slice(start, start + n)
            fill_rows(i, state, start)
            offset += n
        return starts, num_tokens, (pending_idx, pending_reqs, pending_rows)

    def _fill_block_row(self, i: int, state: CachedRequestState, start: int) -> None:
        """One full-attention group: row `i` is rewritten only when another state wrote it
        or the request got a new block since."""
        num_blocks = len(state.block_ids)
        if self._row_state[i] is not state or self._row_shape[i] != num_blocks:
            self.block_table_np[i, :num_blocks] = state.block_ids
            self._row_state[i] = state
            self._row_shape[i] = num_blocks

    def _fill_group_rows(self, i: int, state: CachedRequestState, start: int) -> None:
        """Several groups: row `i` of every group's table for `state` (first query at
        `start`), rewritten only when another state wrote it, the request got a new block or
        lost one to its window (the null block takes its place, by the scheduler's rule)."""
        tables = (state.block_ids, *state.extra_block_ids)
        shape = tuple(
            (len(ids), num_dead_blocks(start, w, self.block_size))
            for ids, w in zip(tables, self.group_windows)
        )
        if self._row_state[i] is state and self._row_shape[i] == shape:
            return
        for (_, bt), ids, (num_blocks, dead) in zip(self._group_np, tables, shape):
            bt[i, :num_blocks] = ids
            if dead:
                bt[i, : min(dead, num_blocks)] = NULL_BLOCK_ID
        self._row_state[i] = state
        self._row_shape[i] = shape

    def _pad(self, num_reqs: int, num_tokens: int, pad_to: int) -> None:
        """Dummy requests of one token each up to `pad_to` requests (a graph's batch size)."""
        pad = pad_to - num_reqs
        end = num_tokens + pad
        self.input_ids_np[num_tokens:end] = 0
        self.positions_np[num_tokens:end] = 0
        for slot_np, _ in self._group_np:
            slot_np[num_tokens:end] = -1
        self.query_start_loc_np[num_reqs + 1 : pad_to + 1] = num_tokens + self._arange[1 : pad + 1]
        self.seq_lens_np[num_reqs:pad_to] = 1

    def _upload(self, num_tokens: int, num_reqs: int, num_sampling: int) -> None:
        if self.device.type == "cpu":
            return
        nb = True
        self.input_ids[:num_tokens].copy_(self.input_ids_cpu[:num_tokens], non_blocking=nb)
        self.positions[:num_tokens].copy_(self.positions_cpu[:num_tokens], non_blocking=nb)
        self.slot_mapping[:num_tokens].copy_(self.slot_mapping_cpu[:num_tokens], non_blocking=nb)
        self.query_start_loc[: num_reqs + 1].copy_(
            self.query_start_loc_cpu[: num_reqs + 1], non_blocking=nb
        )
        self.seq_lens[:num_reqs].copy_(self.seq_lens_cpu[:num_reqs], non_blocking=nb)
        self.block_table[:num_reqs].copy_(self.block_table_cpu[:num_reqs], non_blocking=nb)
        for sm, sm_cpu, bt, bt_cpu in zip(self.extra_slot_mappings, self.extra_slot_mapping_cpu,
                                          self.extra_block_tables, self.extra_block_table_cpu):
            sm[:num_tokens].copy_(sm_cpu[:num_tokens], non_blocking=nb)
            bt[:num_reqs].copy_(bt_cpu[:num_reqs], non_blocking=nb)
        if num_sampling:
            self.sample_idx[:num_sampling].copy_(
                self.sample_idx_cpu[:num_sampling], non_blocking=nb
            )
        self._uploaded.record()
