"""fp8 (e4m3) KV cache values in plain torch: how the cache stores a key or value and how
readers get it back. Per layer, one scale for keys and one for values (1.0 unless the
checkpoint carries `k_scale` / `v_scale`); the Triton kernels do the same arithmetic.
"""

from __future__ import annotations

import torch

FP8_KV_DTYPE = torch.float8_e4m3fn
_FP8_MAX = 448.0
# vLLM's --kv-cache-dtype names and the cache dtype each means ("auto": the model dtype).
KV_CACHE_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None, "fp8": FP8_KV_DTYPE, "fp8_e4m3": FP8_KV_DTYPE,
}


def is_fp8_kv(kv_cache: torch.Tensor) -> bool:
    return kv_cache.dtype == FP8_KV_DTYPE


def quantize_kv(x: torch.Tensor, cache_dtype: torch.dtype, scale: float) -> torch.Tensor:
    """x as the cache stores it: a plain cast, or for fp8 x / scale saturated and rounded
    (multiplied by 1 / scale, as the kernel does)."""
    if cache_dtype != FP8_KV_DTYPE:
        return x.to(cache_dtype)
    inv = torch.tensor(1.0 / scale, dtype=torch.float32)
    return torch.clamp(x.float() * inv, -_FP8_MAX, _FP8_MAX).to(cache_dtype)


def dequantize_kv(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """Cached values back in `dtype` (fp8: times their scale)."""
    if x.dtype != FP8_KV_DTYPE:
        return x.to(dtype)
    return x.to(dtype) * scale
