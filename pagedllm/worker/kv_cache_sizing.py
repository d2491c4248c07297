"""Start-up checks of the KV cache: whether the memory budget leaves room for it (vLLM's
rule: one request of max_model_len tokens must fit, else fail before serving, naming the
largest context that would and the flags that help), and whether its dtype can run here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)

_GIB = float(1 << 30)


@dataclass(frozen=True, slots=True)
class MemoryBudget:
    """What the profiling run measured, in bytes (per device)."""

    total: int
    gpu_memory_utilization: float
    weights: int
    activation_peak: int
    other: int  # non-torch memory, CUDA-graph reserve
    quantization: str | None
    kv_cache_dtype: str


def _flags(budget: MemoryBudget, need_context: bool) -> str:
    hints = []
    if budget.quantization is None:
        hints.append("--quantization fp8 (8-bit weights, half of 16-bit)")
    if budget.kv_cache_dtype == "auto":
        hints.append("--kv-cache-dtype fp8 (twice the KV blocks)")
    hints.append(f"a higher --gpu-memory-utilization (now {budget.gpu_memory_utilization})")
    if need_context:
        hints.append("a lower --max-model-len")
    else:
        hints.append("a lower --max-num-batched-tokens")
    hints.append("a larger --tensor-parallel-size (weights and KV split across GPUs)")
    return "; ".join(hints)


def _largest_fitting(num_blocks: int, max_model_len: int, blocks_for: Callable[[int], int]) -> int:
    """Longest context (<= max_model_len) whose request needs at most `num_blocks` blocks."""
    lo, hi = 0, max_model_len
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if blocks_for(mid) <= num_blocks:
            lo = mid
        else:
            hi = mid - 1
    return lo


def check_kv_cache_fits(
    budget: MemoryBudget, kv_bytes: int, bytes_per_block: int, block_size: int,
    max_model_len: int, blocks_for: Callable[[int], int] | None = None,
) -> int:
    """Blocks the budget leaves for the KV cache (`kv_bytes`); ValueError, with the largest
    context that fits and the flags that help, when not one max_model_len request fits.

    `blocks_for(num_tokens)`: blocks one request of that many tokens holds at most (KV cache
    groups with sliding windows hold fewer than ceil(num_tokens / block_size)), the reserved
    null block included."""
    if blocks_for is None:
        def blocks_for(n: int) -> int:
            return -(-n // block_size)
    used = (f"weights {budget.weights / _GIB:.2f} GiB"
            f"{f' ({budget.quantization})' if budget.quantization else ''}, activations "
            f"{budget.activation_peak / _GIB:.2f} GiB, other {budget.other / _GIB:.2f} GiB")
    allowed = f"gpu_memory_utilization {budget.gpu_memory_utilization} x " \
              f"{budget.total / _GIB:.1f} GiB"
    if kv_bytes <= 0:
        raise ValueError(
            f"the model does not fit: {used} leave no room for a KV cache within {allowed}. "
            f"Try {_flags(budget, need_context=False)}"
        )
    num_blocks = kv_bytes // bytes_per_block
    if blocks_for(max_model_len) > num_blocks:
        capacity = _largest_fitting(num_blocks, max_model_len, blocks_for)
        need = blocks_for(max_model_len) * bytes_per_block
        raise ValueError(
            f"max_model_len={max_model_len} needs {need / _GIB:.2f} GiB of KV cache for one "
            f"request, more than the {kv_bytes / _GIB:.2f} GiB left ({allowed}; {used}). The "
            f"largest context that fits is {capacity} tokens (--max-model-len {capacity}). "
            f"Try {_flags(budget, need_context=True)}"
        )
    return num_blocks


def check_kv_cache_dtype(
    model: nn.Module, kv_cache_dtype: str, cache_dtype: torch.dtype, device: torch.device
) -> None:
    """Logs the KV-cache dtype; refuses fp8 on GPUs without it and warns when an fp8 cache
    has no checkpoint scales."""
    from pagedllm.attention.fp8_kv import FP8_KV_DTYPE
    from pagedllm.model_executor.layers.attention import Attention

    logger.info("KV cache dtype: %s (%s)", kv_cache_dtype, str(cache_dtype).removeprefix("torch."))
    if cache_dtype != FP8_KV_DTYPE:
        return
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError(
            f"--kv-cache-dtype {kv_cache_dtype} needs a GPU with fp8 support (compute "
            f"capability >= 8.9, Ada or Hopper); {torch.cuda.get_device_name(device)} has "
            f"{torch.cuda.get_device_capability(device)}; use --kv-cache-dtype auto"
        )
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    if all(m.k_scale == 1.0 and m.v_scale == 1.0 for m in layers):
        logger.warning(
            "fp8 KV cache without k_scale / v_scale in the checkpoint: using 1.0 (keys and "
            "values beyond +-448 saturate; accuracy may drop)"
        )
