"""Plain-PyTorch attention over the paged KV cache: the CPU backend and the reference.

A step with few decodes (one query token each; up to `_MAX_INPLACE_DECODES`) reads each one's
KV in place, run of consecutive blocks by run (`inplace_decode.py`: no per-step copy of the
context). More decodes are batched: one gather of their blocks and one fused SDPA call per
layer, with the gather indices and the length mask built once per step. Prefills without a
cached prefix attend to their fresh K/V directly; prefill chunks with a cached prefix gather
their blocks. Both run one request at a time through SDPA.

An fp8 cache stores k / k_scale and v / v_scale (`attention/fp8_kv.py`); every read takes the
cached values (also a prefill's own keys, as the Triton kernels do), folds k_scale into the
softmax scale and multiplies the output by v_scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pagedllm import cpu_ops
from pagedllm.attention.backend import AttentionBackend, AttentionMetadata, register_backend
from pagedllm.attention.backends.inplace_decode import (
    InplaceDecode,
    inplace_decode,
    plan_inplace_decode,
)
from pagedllm.attention.fp8_kv import is_fp8_kv, quantize_kv


def _raw(kv_cache: torch.Tensor) -> torch.Tensor:
    """The cache as index ops can take it: CPU torch has no index_copy / index_select for
    fp8, so an fp8 cache is moved as its bytes (callers view the result back)."""
    return kv_cache.view(torch.uint8) if is_fp8_kv(kv_cache) else kv_cache


def write_to_kv_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 = skip
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    valid: torch.Tensor | None = None,  # [num_tokens] bool, slot_mapping >= 0, when all known
) -> None:
    """Writes every token whose slot is >= 0. `valid` is None when the caller knows every
    slot is valid (the step plan checks that once, not per layer)."""
    if (key.dtype == kv_cache.dtype and slot_mapping.dtype == torch.int64
            and kv_cache.is_contiguous() and _rows_of_heads(key) and _rows_of_heads(value)
            and cpu_ops.supports(key, value, kv_cache)):
        cpu_ops.write_kv(key, value, kv_cache, slot_mapping)  # skips slots < 0 itself
        return
    num_slots = kv_cache.shape[1] * kv_cache.shape[2]
    raw = _raw(kv_cache)
    flat = raw.view(2, num_slots, *kv_cache.shape[3:])
    n = key.shape[0]
    slots = slot_mapping[:n]
    if valid is not None:
        slots = slots[valid]
        key = key[valid]
        value = value[valid]
    if key.dtype != kv_cache.dtype or raw is not kv_cache:
        key = quantize_kv(key, kv_cache.dtype, k_scale).view(raw.dtype)
        value = quantize_kv(value, kv_cache.dtype, v_scale).view(raw.dtype)
    flat[0].index_copy_(0, slots, key)
    flat[1].index_copy_(0, slots, value)


def _rows_of_heads(x: torch.Tensor) -> bool:
    """[num_tokens, heads, head_dim] with each token's heads contiguous (rows may be strided)."""
    return x.dim() == 3 and x.stride(2) == 1 and x.stride(1) == x.shape[2]


def gather_kv(
    kv_cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one request: [seq_len, num_kv_heads, head_dim] each."""
    block_size = kv_cache.shape[2]
    num_blocks = (seq_len + block_size - 1) // block_size
    ids = block_ids[:num_blocks].long()
    raw = _raw(kv_cache)
    k = raw[0].index_select(0, ids).flatten(0, 1)[:seq_len].view(kv_cache.dtype)
    v = raw[1].index_select(0, ids).flatten(0, 1)[:seq_len].view(kv_cache.dtype)
    return k, v


def attend(
    q: torch.Tensor,  # [n, num_heads, q_len, head_dim]
    k: torch.Tensor,  # [n, num_kv_heads, seq_len, head_dim]
    v: torch.Tensor,
    mask: torch.Tensor | None,  # bool (True = may attend) or additive, broadcast to scores
    is_causal: bool,
    scale: float,
    logits_soft_cap: float | None,
) -> torch.Tensor:  # [n, num_heads, q_len, head_dim]
    """SDPA, or, with a soft cap (Gemma 2: scores -> cap * tanh(scores / cap) before the mask,
    which SDPA cannot express), the same attention written out in fp32."""
    gqa = q.shape[1] != k.shape[1]
    if not logits_soft_cap:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=gqa
        )
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    scores = (q.float() @ kf.transpose(-1, -2)) * scale
    scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
    if is_causal:
        q_len, seq_len = scores.shape[-2:]
        mask = _prefill_mask(q_len, seq_len, None, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else (
            scores + mask.float())
    return (torch.softmax(scores, dim=-1) @ vf).to(q.dtype)


def _prefill_mask(
    q_len: int, seq_len: int, sliding_window: int | None, device: torch.device
) -> torch.Tensor:
    """[q_len, seq_len] bool, True = may attend."""
    q_pos = torch.arange(seq_len - q_len, seq_len, device=device)[:, None]
    k_pos = torch.arange(seq_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    return mask


@dataclass(slots=True)
class _DecodeGroup:
    """Decodes of similar context length, gathered and attended together."""

    rows: torch.Tensor  # [n] flat query rows
    blocks: torch.Tensor  # [n * num_blocks] block ids
    num_blocks: int
    bias: torch.Tensor  # [n, 1, 1, num_blocks * block_size] 0 / -inf


@dataclass(slots=True)
class _StepPlan:
    """What every layer of one step shares: which rows are decodes and how to gather them."""

    prefills: list[tuple[int, int, int, int]]  # (request index, start, end, seq_len)
    decode_groups: list[_DecodeGroup]
    inplace: list[InplaceDecode]  # decodes read in place (few decodes in the step)
    # The step's query rows are exactly the in-place (or C++) decodes, in order: their outputs
    # are the layer's output (no scatter into a zeroed buffer).
    inplace_only: bool
    # Every decode through the C++ kernel (cpu_ops.decode_attention): (query rows, request
    # indices) [n] int64 each; then decode_groups and inplace are empty.
    cpu_decodes: tuple[torch.Tensor, torch.Tensor] | None = None


# Decodes are split into up to this many groups by context length, so a short request does
# not pay for gathering and masking the longest one's context.
_MAX_DECODE_GROUPS = 4
_MIN_GROUP_SIZE = 8
# Up to this many decodes in a step read the cache in place, one request at a time; more are
# gathered and batched (fewer Python-level calls per layer).
_MAX_INPLACE_DECODES = 4


def _decode_group(
    md: AttentionMetadata, reqs: list[int], rows: list[int], lens: list[int],
    block_size: int, sliding_window: int | None,
) -> _DecodeGroup:
    device = md.block_table.device
    end = (max(lens) + block_size - 1) // block_size
    # With a window, blocks before every query's window are skipped (freed ones among them).
    first = 0 if sliding_window is None else max(0, min(lens) - sliding_window) // block_size
    num_blocks = end - first
    idx = torch.tensor(reqs, device=device)
    blocks = md.block_table.index_select(0, idx)[:, first:end].long().reshape(-1)
    lens_t = torch.tensor(lens, device=device)[:, None]
    k_pos = torch.arange(first * block_size, end * block_size, device=device)[None, :]
    allowed = k_pos < lens_t
    if sliding_window is not None:
        allowed &= k_pos >= lens_t - sliding_window
    bias = torch.zeros(allowed.shape, dtype=torch.float32, device=device)
    bias.masked_fill_(~allowed, float("-inf"))
    return _DecodeGroup(torch.tensor(rows, device=device), blocks, num_blocks, bias[:, None, None])


def _plan(
    md: AttentionMetadata, block_size: int, sliding_window: int | None, soft_cap: bool,
    num_rows: int, cpu_kernel: bool = False,
) -> _StepPlan:
    qsl = (md.query_start_loc_cpu if md.query_start_loc_cpu is not None
           else md.query_start_loc.cpu()).tolist()
    sl = (md.seq_lens_cpu if md.seq_lens_cpu is not None else md.seq_lens.cpu()).tolist()
    prefills, decodes = [], []
    for i in range(md.num_reqs):
        start, end = qsl[i], qsl[i + 1]
        if end == start:
            continue
        if end - start == 1 and md.causal:
            decodes.append(i)
        else:
            prefills.append((i, start, end, sl[i]))
    if cpu_kernel and decodes:
        rows = [qsl[i] for i in decodes]
        only = not prefills and rows == list(range(num_rows))
        return _StepPlan(prefills, [], [], only,
                         (torch.tensor(rows), torch.tensor(decodes)))
    if not soft_cap and 0 < len(decodes) <= _MAX_INPLACE_DECODES and (
        md.block_table.device.type == "cpu"
    ):
        tables = md.block_table.index_select(
            0, torch.tensor(decodes, device=md.block_table.device)
        ).tolist()
        inplace = [
            plan_inplace_decode(qsl[i], table, sl[i], block_size, sliding_window)
            for i, table in zip(decodes, tables, strict=True)
        ]
        only = not prefills and [d.row for d in inplace] == list(range(num_rows))
        return _StepPlan(prefills, [], inplace, only)
    decodes.sort(key=lambda i: sl[i])
    num_groups = max(1, min(_MAX_DECODE_GROUPS, len(decodes) // _MIN_GROUP_SIZE))
    groups = []
    for g in range(num_groups):
        part = decodes[g * len(decodes) // num_groups : (g + 1) * len(decodes) // num_groups]
        if part:
            groups.append(_decode_group(
                md, part, [qsl[i] for i in part], [sl[i] for i in part], block_size,
                sliding_window,
            ))
    return _StepPlan(prefills, groups, [], False)


def _cpu_kernel(query: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata) -> bool:
    """Whether this step's decodes take the C++ paged decode kernel (CPU, float32/bf16
    cache in the query's dtype, int32 block table and lengths)."""
    return (md.causal and md.block_table.dtype == torch.int32
            and md.seq_lens.dtype == torch.int32 and md.seq_lens.is_contiguous()
            and md.block_table.stride(-1) == 1 and kv_cache.is_contiguous()
            and cpu_ops.supports(query, kv_cache) and md.block_table.device.type == "cpu")


class TorchRefBackend(AttentionBackend):
    name = "torch_ref"

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> torch.Tensor:
        if metadata.backend_cache is None:
            metadata.backend_cache = {}
        cache = metadata.backend_cache
        if "valid_slots" not in cache:
            # None when every slot is written (the usual case): no mask op per layer.
            valid = metadata.slot_mapping[: key.shape[0]] >= 0
            cache["valid_slots"] = None if bool(valid.all()) else valid
        write_to_kv_cache(
            key, value, kv_cache, metadata.slot_mapping, k_scale, v_scale, cache["valid_slots"]
        )
        fp8 = is_fp8_kv(kv_cache)
        if fp8:
            # Cached values are k / k_scale: scores take k_scale in the softmax scale and
            # outputs v_scale afterwards.
            scale = scale * k_scale
        soft_cap = bool(logits_soft_cap)
        plan_key = ("torch_ref", sliding_window, soft_cap)
        plan = cache.get(plan_key)
        if plan is None:
            plan = _plan(metadata, kv_cache.shape[2], sliding_window, soft_cap, query.shape[0],
                         _cpu_kernel(query, kv_cache, metadata))
            cache[plan_key] = plan
        if plan.cpu_decodes is not None:
            rows, reqs = plan.cpu_decodes
            out = torch.empty_like(query) if plan.inplace_only else torch.zeros_like(query)
            cpu_ops.decode_attention(out, query, kv_cache, metadata.block_table,
                                     metadata.seq_lens, rows, reqs, scale, sliding_window,
                                     logits_soft_cap)
            if plan.inplace_only:
                return out
        elif plan.inplace_only:
            outs = [inplace_decode(query, kv_cache, d, scale) for d in plan.inplace]
            out = outs[0][None] if len(outs) == 1 else torch.stack(outs)
            if fp8 and v_scale != 1.0:
                out.mul_(v_scale)
            return out
        else:
            out = torch.zeros_like(query)
        for d in plan.inplace:
            out[d.row] = inplace_decode(query, kv_cache, d, scale)
        for i, start, end, seq_len in plan.prefills:
            q_len = end - start
            if q_len == seq_len and not fp8:
                k, v = key[start:end], value[start:end]  # nothing cached before: no gather
            else:
                k, v = gather_kv(kv_cache, metadata.block_table[i], seq_len)
            # 4-D inputs ([1, heads, len, head_dim]) take PyTorch's fused CPU kernel; 3-D ones
            # fall back to the slow math path.
            q = query[start:end].transpose(0, 1)[None]
            k = k.transpose(0, 1).to(query.dtype)[None]
            v = v.transpose(0, 1).to(query.dtype)[None]
            if not metadata.causal:
                mask, is_causal = None, False
            elif q_len == seq_len and sliding_window is None:
                mask, is_causal = None, True
            else:
                mask = _prefill_mask(q_len, seq_len, sliding_window, query.device)
                is_causal = False
            o = attend(q, k, v, mask, is_causal, scale, logits_soft_cap)
            out[start:end] = o[0].transpose(0, 1)
        for group in plan.decode_groups:
            decoded = self._decode(query, kv_cache, group, scale, logits_soft_cap)
            out.index_copy_(0, group.rows, decoded)
        if fp8 and v_scale != 1.0:
            out.mul_(v_scale)
        return out

    @staticmethod
    def _decode(
        query: torch.Tensor, kv_cache: torch.Tensor, group: _DecodeGroup, scale: float,
        logits_soft_cap: float | None = None,
    ) -> torch.Tensor:
        """[num_decodes, num_heads, head_dim] for the step's single-token queries."""
        n = group.rows.shape[0]
        _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
        num_heads = query.shape[1]
        length = group.num_blocks * block_size
        # [n, num_kv_heads, length, head_dim] as strided views of the gathered blocks: the fused
        # CPU SDPA kernel takes them without a copy (5x faster than two matmuls here).
        raw = _raw(kv_cache)
        k = raw[0].index_select(0, group.blocks).view(kv_cache.dtype)
        v = raw[1].index_select(0, group.blocks).view(kv_cache.dtype)
        k = k.view(n, length, num_kv_heads, head_dim)
        v = v.view(n, length, num_kv_heads, head_dim)
        q = query.index_select(0, group.rows).view(n, num_heads, 1, head_dim)
        o = attend(
            q, k.transpose(1, 2).to(query.dtype), v.transpose(1, 2).to(query.dtype),
            group.bias.to(query.dtype), False, scale, logits_soft_cap,
        )
        return o.view(n, num_heads, head_dim)


@register_backend("torch_ref")
def _make() -> AttentionBackend:
    return TorchRefBackend()
