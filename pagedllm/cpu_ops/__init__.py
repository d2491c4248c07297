"""C++ ops of the CPU decode step around the matmuls (torch.ops.pagedllm_cpu).

One dispatch per op instead of several torch ops each: RMSNorm with the residual add fused
in place (torch's own mean of squares inside, so the result is `torch.rms_norm`'s bit for
bit), SiLU-and-mul (torch's SiLU bit for bit: one pass through libtorch's own vectorised exp on
AVX-512 and AVX2, else torch's SiLU inside), RoPE on q and k in place (the torch
path's roundings, bit for bit) (neox and GPT-J styles, partial rotary),
the KV-cache write, and paged decode attention that reads each request's blocks through its
block table in place (GQA, sliding window, soft cap; float32 and bfloat16 caches). Sources
in csrc/ (AVX-512, AVX2 and portable builds, chosen at run time); built, cached and loaded
by `pagedllm/cpp_extension.py`, prebuilt by the Makefile (`python -m pagedllm.cpu_ops
--build`). When the build fails, or with PAGEDLLM_CPU_OPS=0, `enabled()` is False and every
caller keeps its torch path; CUDA tensors never come here.

Callers check `supports(*tensors)` (CPU, float32/bfloat16) before calling an op; the ops
check shapes and strides themselves and raise on anything else.
"""

from __future__ import annotations

import os

import torch

from pagedllm import envs
from pagedllm.cpp_extension import CppExtension

_CSRC = os.path.join(os.path.dirname(__file__), "csrc")
_EXT = CppExtension(
    "pagedllm_cpu", _CSRC, ("cpu_ops.cpp", "cpu_avx512.cpp", "cpu_avx2.cpp", "cpu_generic.cpp"),
    ("cpu_kernels.h", "cpu_kernels_impl.h"), envs.cpu_ops_build_dir,
    fail_env="PAGEDLLM_CPU_OPS_FAIL",
    fallback="the CPU decode step keeps its plain torch ops (slower)",
    extra_cflags=("-O3", "-fopenmp", "-ffp-contract=off"),
)
_DTYPES = (torch.float32, torch.bfloat16)
_enabled: bool | None = None


def available() -> bool:
    """Whether the extension is built and loaded (building it on the first call)."""
    return _EXT.available()


def enabled() -> bool:
    """Whether CPU callers should use these ops (built and not switched off)."""
    global _enabled
    if _enabled is None:
        _enabled = envs.cpu_ops_enabled() and available()
    return _enabled


def reset_for_tests() -> None:
    global _enabled
    _enabled = None
    _EXT.reset_for_tests()


def supports(*tensors: torch.Tensor) -> bool:
    """Whether these tensors may take the ops: enabled, on the CPU, one float32/bfloat16
    dtype. (Called per layer: plain loops, no generators.)"""
    if not (_enabled if _enabled is not None else enabled()):
        return False
    dtype = tensors[0].dtype
    if dtype not in _DTYPES:
        return False
    for t in tensors:
        if not t.is_cpu or t.dtype != dtype:
            return False
    return True


def isa() -> str:
    """The kernel build this CPU runs: "avx512", "avx2" or "portable"."""
    return {1: "avx512", 2: "avx2"}.get(int(torch.ops.pagedllm_cpu.isa()), "portable")


def set_portable(on: bool) -> None:
    """Tests and benchmarks: the portable kernels even on an AVX-512 CPU."""
    torch.ops.pagedllm_cpu.set_portable(on)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """[rows, d] -> x / sqrt(mean(x^2) + eps) * weight (bf16: normed x rounded first), as
    `RMSNorm`'s torch path computes it."""
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    torch.ops.pagedllm_cpu.rms_norm(out, x, weight, eps)
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual); the sum is written into `residual` in place
    (as the CUDA kernel does)."""
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    torch.ops.pagedllm_cpu.fused_add_rms_norm(out, x, residual, weight, eps)
    return out, residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[rows, 2d] (gate | up) -> [rows, d] silu(gate) * up."""
    out = x.new_empty(x.shape[0], x.shape[1] // 2)
    torch.ops.pagedllm_cpu.silu_and_mul(out, x)
    return out


def silu_one_pass(d: int, dtype: torch.dtype) -> bool:
    """Tests: whether SiLU-and-mul of width d takes the one-pass AVX-512 kernel (checked
    once against at::silu) rather than at::silu + mul."""
    return torch.ops.pagedllm_cpu.silu_one_pass(d, dtype == torch.bfloat16)


def rope_(
    positions: torch.Tensor,  # [num_tokens] int64
    query: torch.Tensor,  # [num_tokens, num_heads * head_size], rows may be strided
    key: torch.Tensor,  # [num_tokens, num_kv_heads * head_size]
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim] float32: cos | sin
    head_size: int,
    is_neox_style: bool,
) -> None:
    """Rotates the first rotary_dim dims of every head of query and key in place."""
    torch.ops.pagedllm_cpu.rope(positions, query, key, cos_sin_cache, head_size, is_neox_style)


def write_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [>= num_tokens] int64, -1 = skip
) -> None:
    torch.ops.pagedllm_cpu.write_kv(key, value, kv_cache, slot_mapping)


def decode_attention(
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim], rows `rows` written
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor,  # [num_reqs, max_blocks] int32
    seq_lens: torch.Tensor,  # [num_reqs] int32, the query token included
    rows: torch.Tensor,  # [n] int64 query rows of single-token decodes
    reqs: torch.Tensor,  # [n] int64 their request indices
    scale: float,
    sliding_window: int | None,
    logits_soft_cap: float | None,
) -> None:
    """Each decode row attends to its request's last min(seq_len, window) cached tokens."""
    torch.ops.pagedllm_cpu.decode_attention(
        out, query, kv_cache, block_table, seq_lens, rows, reqs, scale, sliding_window or 0,
        logits_soft_cap or 0.0,
    )


def main() -> None:
    _EXT.build_main(__doc__.splitlines()[0],
                    lambda: f"CPU ops built ({isa()}) in {envs.cpu_ops_build_dir()}")


if __name__ == "__main__":
    main()
