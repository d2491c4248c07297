"""Persistent input buffers for one step, and the vectorized step-input preparation.

Every per-step model input lives in a buffer allocated once at the largest size a step can have
(`max_num_batched_tokens` tokens, `max_num_seqs` requests): a host staging copy (pinned on CUDA,
so the upload is asynchronous) and a device copy. A step fills the host arrays with numpy (one
Python iteration per request, none per token), uploads the used prefix non-blocking, and hands
out views of the device buffers. CUDA graphs capture those same device buffers, so replaying a
graph only needs the buffers refilled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

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


class InputBuffers:
    """Host (pinned on CUDA) and device buffers for input ids, positions, slots and metadata."""

    def __init__(
        self,
        max_num_tokens: int,
        max_num_reqs: int,
        max_blocks_per_req: int,
        block_size: int,
        device: torch.device,
    ) -> None:
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
        # req_id -> (state, number of blocks, row) as written into block_table_np last step.
        self._block_arrays: dict[str, tuple[CachedRequestState, int, int]] = {}
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
        bt = self.block_table_np
        starts, num_tokens, pending_idx, pending_reqs = self._fill_ids_and_blocks(states, counts)
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
        self.slot_mapping_np[:total] = bt[req_of_token, block_idx].astype(np.int64) * bs + pos % bs
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
            pending_token_idx=pending_idx,
            pending_req_ids=pending_reqs,
        )

    def _fill_ids_and_blocks(
        self, states: list[CachedRequestState], counts: list[int]
    ) -> tuple[np.ndarray, np.ndarray, list[int], list[str]]:
        """Writes each request's input ids and block-table row (one Python iteration per
        request). Returns its first position, its token count with pending samples, and the
        flat indices (and request ids) of input ids only the device holds."""
        num_reqs = len(states)
        ids_np = self.input_ids_np
        bt = self.block_table_np
        starts = np.empty(num_reqs, dtype=np.int64)
        num_tokens = np.empty(num_reqs, dtype=np.int64)
        bt_cache = self._block_arrays
        new_cache: dict[str, tuple[CachedRequestState, int, int]] = {}
        pending_idx: list[int] = []
        pending_reqs: list[str] = []
        offset = 0
        for i, state in enumerate(states):
            start = state.num_computed_tokens
            n = counts[i]
            starts[i] = start
            known = state.num_tokens
            # The step samples when its tokens reach the last known or pending token.
            num_tokens[i] = known + state.num_pending
            if start + n > known and (n != 1 or not state.num_pending):
                raise RuntimeError(
                    f"request {state.req_id}: {n} token(s) at {start} reach past its known tokens"
                )
            if n == 1:
                # Decode (or the last prompt token): one element, no list slicing.
                p = len(state.prompt_token_ids)
                if start >= known:
                    ids_np[offset] = 0  # sampled by the previous step; copied on the device
                    pending_idx.append(offset)
                    pending_reqs.append(state.req_id)
                else:
                    ids_np[offset] = (
                        state.prompt_token_ids[start]
                        if start < p
                        else state.output_token_ids[start - p]
                    )
            else:
                ids_np[offset : offset + n] = state.token_slice(start, start + n)
            # A state's block table only grows (a resumed request gets a new state object):
            # the row is rewritten only when the request moved rows or got a new block.
            cached = bt_cache.get(state.req_id)
            num_blocks = len(state.block_ids)
            if cached is None or cached[0] is not state or cached[1] != num_blocks or (
                cached[2] != i
            ):
                bt[i, :num_blocks] = state.block_ids
            new_cache[state.req_id] = (state, num_blocks, i)
            offset += n
        self._block_arrays = new_cache
        return starts, num_tokens, pending_idx, pending_reqs

    def _pad(self, num_reqs: int, num_tokens: int, pad_to: int) -> None:
        """Dummy requests of one token each up to `pad_to` requests (a graph's batch size)."""
        pad = pad_to - num_reqs
        end = num_tokens + pad
        self.input_ids_np[num_tokens:end] = 0
        self.positions_np[num_tokens:end] = 0
        self.slot_mapping_np[num_tokens:end] = -1
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
        if num_sampling:
            self.sample_idx[:num_sampling].copy_(
                self.sample_idx_cpu[:num_sampling], non_blocking=nb
            )
        self._uploaded.record()
