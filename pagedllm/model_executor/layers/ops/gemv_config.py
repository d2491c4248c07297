"""Launch configurations of the small-M GEMV kernels (`int_gemv.py`, `fp8_gemv.py`).

At M = 1..32 (decode) a quantized GEMM is bound by streaming its packed weights, so the
kernels read each weight once, spread over every SM by splitting K. Two ways to multiply,
chosen per M: FMA (`use_dot=False`, each weight dequantized once and multiplied by the M
activation rows on the CUDA cores, one 2-D accumulator per row; the default up to M = 2,
where a tensor-core tile would waste 14/16 of its rows; the sweep tries it up to M = 4) and `tl.dot` (M padded to 16 or 32 rows; `swap_ab` computes
(W^T x^T)^T so the dequantized weight is the register operand A).

`TUNED` holds the winners of `benchmarks/gpu_gemv.py` on the H200, keyed by
(kind, M bucket, N, K); shapes not in it fall back to `default_config`.
`PAGEDLLM_GEMV_CONFIG` may name a JSON file of the same table (what the sweep writes with
`--json`), read once, for tuning without editing this module.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass

import torch
import triton

from pagedllm import envs

# The GEMVs replace the previous path up to these M (module constants for the GPU sweep;
# PAGEDLLM_INT_GEMV_MAX_M / PAGEDLLM_FP8_GEMV_MAX_M override them, 0 turns a GEMV off).
# From the second H200 sweep: the int4 GEMV beats the int GEMM up to M = 2 (1.27-1.54x bf16
# at M = 1; tensor-core forms lose to bf16 from M = 4), the fp8 GEMV beats W8A8 + _scaled_mm
# at every M <= 16 (1.49-1.68x bf16 at M = 1, 1.1-1.3x at M = 2..16).
INT_GEMV_MAX_M = 2
FP8_GEMV_MAX_M = 16


def int_gemv_max_m() -> int:
    return envs.gemv_max_m("int", INT_GEMV_MAX_M)


# 16-bit weights ("bf16" kind, bf16 or fp16) take the GEMV only for shapes with a tuned entry
# (TUNED or PAGEDLLM_GEMV_CONFIG; the sweep writes one only where it beat cuBLAS) and at most
# this many rows (PAGEDLLM_DENSE_GEMV_MAX_M overrides it, 0: cuBLAS always); past it cuBLAS.
DENSE_GEMV_MAX_M = 2


def fp8_gemv_max_m() -> int:
    return envs.gemv_max_m("fp8", FP8_GEMV_MAX_M)


def dense_gemv_max_m() -> int:
    return min(envs.gemv_max_m("dense", DENSE_GEMV_MAX_M), DENSE_GEMV_MAX_M)


M_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
KINDS: tuple[str, ...] = ("int4", "int8", "fp8")


@dataclass(frozen=True, slots=True)
class GemvConfig:
    block_n: int
    block_k: int  # input rows per step (int: a multiple of the values per int32 word)
    split_k: int  # 0: chosen from the SM count
    num_warps: int
    num_stages: int
    use_dot: bool = False
    swap_ab: bool = False
    prefetch: bool = False  # load block i + 1 before block i's math (registers, not stages)
    inplace: bool = False  # int FMA, one row: planes unpacked in place (`int_gemv._plane_inplace`)

    def to_json(self) -> dict:
        return asdict(self)


# (kind, M bucket, N, K) -> config; pasted from benchmarks/gpu_gemv.py's JSON, the second
# H200 sweep (2026-12-02, the 2-D FMA forms; docs/benchmarks.md); M = 1 (both kinds) and
# int4 M = 2 from the third, `--wide` sweep (2026-12-02: in-place planes, more splits), kept
# only where it beat the second sweep's entry in the same run.
TUNED: dict[tuple[str, int, int, int], GemvConfig] = {
    ("fp8", 1, 4096, 4096): GemvConfig(32, 512, 0, 8, 3),
    ("fp8", 1, 4096, 14336): GemvConfig(32, 512, 2, 8, 3),
    ("fp8", 1, 6144, 4096): GemvConfig(32, 512, 1, 8, 3),
    ("fp8", 1, 28672, 4096): GemvConfig(32, 256, 1, 8, 3),
    ("fp8", 2, 4096, 4096): GemvConfig(64, 128, 4, 8, 3),
    ("fp8", 2, 4096, 14336): GemvConfig(64, 128, 16, 4, 3, use_dot=True),
    ("fp8", 2, 6144, 4096): GemvConfig(64, 128, 4, 4, 3, use_dot=True),
    ("fp8", 2, 28672, 4096): GemvConfig(64, 128, 4, 4, 3, use_dot=True),
    ("fp8", 4, 4096, 4096): GemvConfig(64, 128, 4, 4, 3, use_dot=True),
    ("fp8", 4, 4096, 14336): GemvConfig(64, 128, 16, 4, 3, use_dot=True),
    ("fp8", 4, 6144, 4096): GemvConfig(64, 128, 4, 4, 3, use_dot=True),
    ("fp8", 4, 28672, 4096): GemvConfig(64, 128, 4, 4, 3, use_dot=True),
    ("fp8", 8, 4096, 4096): GemvConfig(32, 128, 0, 4, 3, use_dot=True),
    ("fp8", 8, 4096, 14336): GemvConfig(64, 128, 0, 4, 3, use_dot=True),
    ("fp8", 8, 6144, 4096): GemvConfig(64, 128, 4, 4, 3, use_dot=True),
    ("fp8", 8, 28672, 4096): GemvConfig(64, 128, 4, 4, 3, use_dot=True),
    ("fp8", 16, 4096, 4096): GemvConfig(32, 128, 0, 4, 3, use_dot=True),
    ("fp8", 16, 4096, 14336): GemvConfig(32, 128, 0, 4, 3, use_dot=True),
    ("fp8", 16, 6144, 4096): GemvConfig(64, 128, 4, 4, 3, use_dot=True),
    ("fp8", 16, 28672, 4096): GemvConfig(64, 128, 4, 4, 3, use_dot=True),
    ("fp8", 32, 4096, 4096): GemvConfig(64, 128, 4, 4, 3, use_dot=True),
    ("fp8", 32, 4096, 14336): GemvConfig(64, 128, 0, 4, 3, use_dot=True),
    ("fp8", 32, 6144, 4096): GemvConfig(64, 128, 4, 4, 3, use_dot=True),
    ("fp8", 32, 28672, 4096): GemvConfig(64, 128, 4, 4, 3, use_dot=True),
    # 16-bit weights: the wide sweep's winners where they beat cuBLAS (2026-12-02, H200;
    # M = 1: qkv 1.13x, o 1.17x, gate_up 1.03x, down 1.06x, LM head 1.05x; M = 2: o 1.10x,
    # down 1.03x, LM head 1.05x; qkv and gate_up at M = 2 stay on cuBLAS).
    ("bf16", 1, 6144, 4096): GemvConfig(16, 512, 0, 8, 3),
    ("bf16", 1, 4096, 4096): GemvConfig(8, 512, 1, 4, 3, prefetch=True),
    ("bf16", 1, 28672, 4096): GemvConfig(8, 512, 0, 4, 3),
    ("bf16", 1, 4096, 14336): GemvConfig(8, 512, 1, 4, 3, prefetch=True),
    ("bf16", 1, 128256, 4096): GemvConfig(64, 128, 0, 4, 3, use_dot=True, swap_ab=True),
    ("bf16", 2, 4096, 4096): GemvConfig(8, 512, 0, 4, 3),
    ("bf16", 2, 4096, 14336): GemvConfig(64, 128, 4, 4, 3, use_dot=True, swap_ab=True),
    ("bf16", 2, 128256, 4096): GemvConfig(64, 128, 0, 4, 3, use_dot=True, swap_ab=True),
    ("int4", 1, 4096, 4096): GemvConfig(64, 256, 0, 4, 3, prefetch=True, inplace=True),
    ("int4", 1, 4096, 14336): GemvConfig(64, 256, 16, 4, 3, prefetch=True, inplace=True),
    ("int4", 1, 6144, 4096): GemvConfig(64, 256, 4, 4, 3, prefetch=True, inplace=True),
    ("int4", 1, 28672, 4096): GemvConfig(64, 256, 4, 4, 3, prefetch=True, inplace=True),
    ("int4", 2, 4096, 4096): GemvConfig(32, 256, 0, 4, 3),
    ("int4", 2, 4096, 14336): GemvConfig(32, 256, 0, 4, 3),
    ("int4", 2, 6144, 4096): GemvConfig(64, 256, 0, 4, 3),
    ("int4", 2, 28672, 4096): GemvConfig(32, 256, 1, 4, 3),
    ("int4", 4, 4096, 4096): GemvConfig(32, 128, 0, 4, 3),
    ("int4", 4, 4096, 14336): GemvConfig(64, 256, 4, 8, 3),
    ("int4", 4, 6144, 4096): GemvConfig(32, 128, 4, 4, 3),
    ("int4", 4, 28672, 4096): GemvConfig(64, 256, 0, 8, 3),
    ("int4", 8, 4096, 4096): GemvConfig(64, 128, 0, 4, 3, use_dot=True),
    ("int4", 8, 4096, 14336): GemvConfig(128, 128, 16, 4, 3, use_dot=True, swap_ab=True),
    ("int4", 8, 6144, 4096): GemvConfig(128, 128, 0, 4, 3, use_dot=True, swap_ab=True),
    ("int4", 8, 28672, 4096): GemvConfig(128, 128, 4, 4, 3, use_dot=True, swap_ab=True),
    ("int4", 16, 4096, 4096): GemvConfig(64, 128, 0, 4, 3, use_dot=True),
    ("int4", 16, 4096, 14336): GemvConfig(128, 128, 16, 4, 3, use_dot=True, swap_ab=True),
    ("int4", 16, 6144, 4096): GemvConfig(128, 128, 0, 4, 3, use_dot=True, swap_ab=True),
    ("int4", 16, 28672, 4096): GemvConfig(128, 128, 4, 4, 3, use_dot=True, swap_ab=True),
    ("int4", 32, 4096, 4096): GemvConfig(128, 128, 0, 4, 3, use_dot=True, swap_ab=True),
    ("int4", 32, 4096, 14336): GemvConfig(128, 128, 16, 4, 3, use_dot=True, swap_ab=True),
    ("int4", 32, 6144, 4096): GemvConfig(128, 128, 0, 4, 3, use_dot=True, swap_ab=True),
    ("int4", 32, 28672, 4096): GemvConfig(128, 128, 0, 4, 3, use_dot=True, swap_ab=True),
}  # fmt: skip


def m_bucket(m: int) -> int:
    """The smallest bucket >= m (configs are tuned per bucket)."""
    for bucket in M_BUCKETS:
        if m <= bucket:
            return bucket
    return M_BUCKETS[-1]


def block_m(m: int, use_dot: bool) -> int:
    """Rows of x per program: all of them; a dot needs at least 16."""
    rows = triton.next_power_of_2(max(m, 1))
    return max(rows, 16) if use_dot else rows


def default_config(kind: str, m: int) -> GemvConfig:
    """Defaults for shapes the tuned table lacks: FMA (one 2-D accumulator per row) up to 2 rows, tensor
    cores above. From the first H200 sweep (docs/kernels.md): int4 FMA 64 x 128 won at M = 1
    on every Llama-3.1-8B shape; fp8 follows the 2-D form of the MoE GEMV (16 x 128 tiles,
    8 warps: 3.7 TB/s at one token)."""
    if kind == "bf16" and m <= 2:  # 16-bit weights: twice fp8's bytes per value
        return GemvConfig(block_n=32, block_k=256, split_k=0, num_warps=8, num_stages=3)
    if kind in ("fp8", "bf16"):
        if m <= 2:
            return GemvConfig(block_n=16, block_k=128, split_k=0, num_warps=8, num_stages=3)
        return GemvConfig(block_n=64, block_k=128, split_k=0, num_warps=4, num_stages=3,
                          use_dot=True)
    if m <= 2:
        return GemvConfig(block_n=64, block_k=128, split_k=0, num_warps=4, num_stages=3)
    return GemvConfig(block_n=64, block_k=128, split_k=0, num_warps=4, num_stages=3,
                      use_dot=True)


@functools.cache
def _file_table(path: str) -> dict[tuple[str, int, int, int], GemvConfig]:
    with open(path) as f:
        rows = json.load(f)
    return {(r["kind"], int(r["m"]), int(r["n"]), int(r["k"])): GemvConfig(**r["config"])
            for r in rows}


def tuned(kind: str, m: int, n: int, k: int) -> GemvConfig | None:
    """The tuned config of a shape (the file's over TUNED), or None."""
    key = (kind, m_bucket(m), n, k)
    path = envs.gemv_config_file()
    if path:
        hit = _file_table(path).get(key)
        if hit is not None:
            return hit
    return TUNED.get(key)


def lookup(kind: str, m: int, n: int, k: int) -> GemvConfig:
    """The tuned config of a shape, else the default."""
    return tuned(kind, m, n, k) or default_config(kind, m)


_NUM_SMS: dict[int, int] = {}


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _NUM_SMS:
        _NUM_SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _NUM_SMS[index]


def split_for(split_k: int, block_k: int, tiles: int, k: int, device: torch.device,
              no_split_from: float | None = None) -> int:
    """K splits: `split_k` when set (> 0); none when `no_split_from` is given and the output
    tiles alone give that many programs per SM; else enough for ~4 programs per SM with every
    split streaming at least four K blocks. Never more splits than K blocks."""
    blocks = triton.cdiv(k, block_k)
    if split_k > 0:
        return max(1, min(split_k, blocks))
    sms = num_sms(device)
    if no_split_from is not None and tiles >= no_split_from * sms:
        return 1
    return max(1, min(max(1, blocks // 4), triton.cdiv(4 * sms, tiles)))
