"""Writes this step's keys and values into the paged KV cache (Triton kernel + torch reference).

Cache layout: kv_cache [2, num_blocks, block_size, num_kv_heads, head_dim]. Token t goes to
flat slot slot_mapping[t] = block_id * block_size + offset; slot -1 means "do not write"
(padding rows, or tokens whose K/V is already cached).

An fp8 (e4m3) cache stores k / k_scale and v / v_scale, saturated to +-448 and rounded to
nearest even; readers multiply back (`dequantize_kv`). Other cache dtypes store plain casts
and never see the scales (the fp8 code is a compile-time specialisation of the kernel).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.attention.fp8_kv import FP8_KV_DTYPE, quantize_kv
from pagedllm.attention.ops.fp8_round import round_to_e4m3_grid


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim]
    value_ptr,  # [num_tokens, num_kv_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping_ptr,  # [num_tokens] int64
    stride_k_t,
    stride_k_h,
    stride_v_t,
    stride_v_h,
    stride_c_b,
    stride_c_t,
    stride_c_h,
    inv_k_scale,  # 1 / k_scale (fp8 caches only)
    inv_v_scale,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HD_PAD: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HD_PAD)
    mask = (heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < HEAD_DIM)
    src_k = key_ptr + token * stride_k_t + heads[:, None] * stride_k_h + dims[None, :]
    src_v = value_ptr + token * stride_v_t + heads[:, None] * stride_v_h + dims[None, :]
    dst = block * stride_c_b + offset * stride_c_t + heads[:, None] * stride_c_h + dims[None, :]
    k = tl.load(src_k, mask=mask)
    v = tl.load(src_v, mask=mask)
    if KV_FP8:
        k = round_to_e4m3_grid(tl.clamp(k.to(tl.float32) * inv_k_scale, -448.0, 448.0))
        v = round_to_e4m3_grid(tl.clamp(v.to(tl.float32) * inv_v_scale, -448.0, 448.0))
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 = skip
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Scatters key/value rows into their cache slots in place; rows with slot -1 are skipped.

    key/value may be strided views (e.g. slices of a fused QKV output) as long as head_dim is
    contiguous. Values are cast to the cache dtype (fp8: divided by their scale first).
    """
    num_tokens, num_kv_heads, head_dim = key.shape
    assert value.shape == key.shape, (value.shape, key.shape)
    assert slot_mapping.shape[0] >= num_tokens
    assert key.stride(-1) == 1 and value.stride(-1) == 1
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    assert k_cache.stride(-1) == 1 and k_cache.stride() == v_cache.stride()
    if num_tokens == 0:
        return
    _reshape_and_cache_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        1.0 / k_scale,
        1.0 / v_scale,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1],
        HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HD_PAD=triton.next_power_of_2(head_dim),
        KV_FP8=kv_cache.dtype == FP8_KV_DTYPE,
        num_warps=4,
    )


def reshape_and_cache_ref(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 = skip
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Pure-torch reference of `reshape_and_cache` (same in-place effect)."""
    num_tokens = key.shape[0]
    slots = slot_mapping[:num_tokens].long()
    keep = slots >= 0
    flat = kv_cache.view(2, -1, kv_cache.shape[3], kv_cache.shape[4])
    flat[0, slots[keep]] = quantize_kv(key[keep], kv_cache.dtype, k_scale)
    flat[1, slots[keep]] = quantize_kv(value[keep], kv_cache.dtype, v_scale)
