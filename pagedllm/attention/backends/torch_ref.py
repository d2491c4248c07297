"""Plain-PyTorch attention over the paged KV cache: the CPU backend and the reference.

Decodes (one query token) are batched into one padded gather + SDPA call; prefills and
prefill chunks (with or without a cached prefix) run one request at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedllm.attention.backend import AttentionBackend, AttentionMetadata, register_backend


def write_to_kv_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 = skip
) -> None:
    num_slots = kv_cache.shape[1] * kv_cache.shape[2]
    k_flat = kv_cache[0].view(num_slots, *kv_cache.shape[3:])
    v_flat = kv_cache[1].view(num_slots, *kv_cache.shape[3:])
    n = key.shape[0]
    slots = slot_mapping[:n]
    valid = slots >= 0
    if not bool(valid.all()):
        slots = slots[valid]
        key = key[valid]
        value = value[valid]
    k_flat.index_copy_(0, slots, key.to(kv_cache.dtype))
    v_flat.index_copy_(0, slots, value.to(kv_cache.dtype))


def gather_kv(
    kv_cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one request: [seq_len, num_kv_heads, head_dim] each."""
    block_size = kv_cache.shape[2]
    num_blocks = (seq_len + block_size - 1) // block_size
    ids = block_ids[:num_blocks].long()
    k = kv_cache[0].index_select(0, ids).flatten(0, 1)[:seq_len]
    v = kv_cache[1].index_select(0, ids).flatten(0, 1)[:seq_len]
    return k, v


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
    ) -> torch.Tensor:
        write_to_kv_cache(key, value, kv_cache, metadata.slot_mapping)
        out = torch.zeros_like(query)
        qsl = metadata.query_start_loc_cpu
        sl = metadata.seq_lens_cpu
        if qsl is None:
            qsl = metadata.query_start_loc.cpu()
        if sl is None:
            sl = metadata.seq_lens.cpu()
        qsl_list = qsl.tolist()
        sl_list = sl.tolist()
        num_heads, num_kv_heads = query.shape[1], key.shape[1]
        gqa = num_heads != num_kv_heads
        decode_idx: list[int] = []
        for i in range(metadata.num_reqs):
            start, end = qsl_list[i], qsl_list[i + 1]
            q_len, seq_len = end - start, sl_list[i]
            if q_len == 0:
                continue
            if q_len == 1 and metadata.causal:
                decode_idx.append(i)
                continue
            k, v = gather_kv(kv_cache, metadata.block_table[i], seq_len)
            q = query[start:end].transpose(0, 1)  # [num_heads, q_len, head_dim]
            k = k.transpose(0, 1).to(query.dtype)
            v = v.transpose(0, 1).to(query.dtype)
            if not metadata.causal:
                mask = None
                is_causal = False
            elif q_len == seq_len and sliding_window is None:
                mask, is_causal = None, True
            else:
                mask = _prefill_mask(q_len, seq_len, sliding_window, query.device)
                is_causal = False
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=gqa
            )
            out[start:end] = o.transpose(0, 1)
        if decode_idx:
            self._batched_decode(
                query, kv_cache, metadata, qsl_list, sl_list, decode_idx, scale, sliding_window, out
            )
        return out

    @staticmethod
    def _batched_decode(
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        qsl_list: list[int],
        sl_list: list[int],
        decode_idx: list[int],
        scale: float,
        sliding_window: int | None,
        out: torch.Tensor,
    ) -> None:
        block_size = kv_cache.shape[2]
        device = query.device
        rows = torch.tensor([qsl_list[i] for i in decode_idx], device=device)
        lens = torch.tensor([sl_list[i] for i in decode_idx], device=device)
        max_len = int(max(sl_list[i] for i in decode_idx))
        max_blocks = (max_len + block_size - 1) // block_size
        idx = torch.tensor(decode_idx, device=device)
        tables = metadata.block_table.index_select(0, idx)[:, :max_blocks].long()
        # [num_decodes, max_blocks * block_size, num_kv_heads, head_dim]
        k = kv_cache[0][tables].flatten(1, 2)
        v = kv_cache[1][tables].flatten(1, 2)
        k_pos = torch.arange(k.shape[1], device=device)[None, :]
        mask = k_pos < lens[:, None]
        if sliding_window is not None:
            mask &= k_pos >= (lens[:, None] - sliding_window)
        q = query.index_select(0, rows).unsqueeze(2)  # [num_decodes, num_heads, 1, head_dim]
        o = F.scaled_dot_product_attention(
            q,
            k.transpose(1, 2).to(query.dtype),
            v.transpose(1, 2).to(query.dtype),
            attn_mask=mask[:, None, None, :],
            scale=scale,
            enable_gqa=query.shape[1] != k.shape[2],
        )
        out.index_copy_(0, rows, o.squeeze(2))


@register_backend("torch_ref")
def _make() -> AttentionBackend:
    return TorchRefBackend()
