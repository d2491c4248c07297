"""Compiles the small-M GEMV kernels ahead of time for a GPU target, with no GPU present.

    python benchmarks/gemv_aot.py             # sm_90 (H100/H200), the default configs
    python benchmarks/gemv_aot.py --grid      # every config of benchmarks/gpu_gemv.py's grid

Catches lowering errors the interpreter (which the tests use) lets through and prints each
variant's registers, stack (spills) and shared memory from cuobjdump: registers bound the
programs per SM, and so the loads in flight, of these memory-bound kernels.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from triton.backends.compiler import GPUTarget  # noqa: E402

from benchmarks.gpu_gemv import _grid  # noqa: E402
from benchmarks.int_gemm_aot import _compile  # noqa: E402
from pagedllm.model_executor.layers.ops import fp8_gemv, gemv_config, int_gemv  # noqa: E402
from pagedllm.model_executor.layers.ops.gemv_config import GemvConfig  # noqa: E402

INT_SIGNATURE = {
    "x_ptr": "*bf16", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "g_ptr": "*i32",
    "out_ptr": "*bf16", "partial_ptr": "*fp32", "lock_ptr": "*i32", "M": "i32", "N": "i32",
    "K": "i32", "stride_xm": "i32", "K_PER_SPLIT": "i32", "SPLIT_K": "i32",
}
FP8_SIGNATURE = {
    "x_ptr": "*bf16", "w_ptr": "*u8", "s_ptr": "*fp32", "out_ptr": "*bf16",
    "partial_ptr": "*fp32", "lock_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32",
    "stride_xm": "i32", "stride_wn": "i32", "K_PER_SPLIT": "i32", "SPLIT_K": "i32",
}


def _int_consts(cfg: GemvConfig, m: int, bits: int, group_mode: int) -> dict:
    pack = 32 // bits
    block_k = max(cfg.block_k, 16 * pack) if cfg.use_dot else max(cfg.block_k, pack)
    magic, offset = int_gemv._magic(__import__("torch").bfloat16, bits)
    return {"BITS": bits, "GROUP_SIZE": 128 if group_mode == 0 else 32,
            "GROUP_MODE": group_mode, "BLOCK_M": gemv_config.block_m(m, cfg.use_dot),
            "BLOCK_N": cfg.block_n, "WORDS": block_k // pack, "HAS_SPLIT": True,
            "USE_DOT": cfg.use_dot, "SWAP_AB": cfg.swap_ab, "DOT_FP32": False,
            "MAGIC": magic, "MAGIC_OFFSET": offset, "PREFETCH": cfg.prefetch,
            "INPLACE": cfg.inplace}


def _fp8_consts(cfg: GemvConfig, m: int) -> dict:
    return {"BLOCK_M": gemv_config.block_m(m, cfg.use_dot), "BLOCK_N": cfg.block_n,
            "BLOCK_K": max(cfg.block_k, 16), "HAS_SPLIT": True, "USE_DOT": cfg.use_dot,
            "SWAP_AB": cfg.swap_ab, "DOT_FP32": False, "PREFETCH": cfg.prefetch}


def _configs(kind: str, m: int, grid: bool) -> list[GemvConfig]:
    if not grid:
        return [gemv_config.default_config(kind, m)]
    seen: list[GemvConfig] = []
    for cfg in _grid(kind, m, smoke=False):
        cfg = GemvConfig(cfg.block_n, cfg.block_k, 0, cfg.num_warps, cfg.num_stages,
                         cfg.use_dot, cfg.swap_ab, cfg.prefetch, cfg.inplace)  # splits: runtime
        if cfg not in seen:
            seen.append(cfg)
    return seen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--grid", action="store_true")
    parser.add_argument("--kinds", default="int4,int8,fp8")
    parser.add_argument("--ms", default="1,2,16,32")
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    failed = 0
    for kind in args.kinds.split(","):
        for m in (int(v) for v in args.ms.split(",")):
            for cfg in _configs(kind, m, args.grid):
                variants = ([("", _fp8_consts(cfg, m))] if kind == "fp8" else
                            [(f" group-mode {g}", _int_consts(cfg, m, int(kind[3:]), g))
                             for g in ((0, 1, 2) if not args.grid else (0,))])
                for extra, consts in variants:
                    fn = fp8_gemv._fp8_gemv_kernel if kind == "fp8" else int_gemv._int_gemv_kernel
                    sig = FP8_SIGNATURE if kind == "fp8" else INT_SIGNATURE
                    label = f"{kind} M={m} {cfg}{extra}"
                    t0 = time.perf_counter()
                    try:
                        res = _compile(fn, sig, consts, target, cfg.num_warps,
                                       cfg.num_stages)
                        print(f"ok   {label}: {res} ({time.perf_counter() - t0:.0f}s)",
                              flush=True)
                    except Exception as e:  # noqa: BLE001 - report every variant
                        failed += 1
                        print(f"FAIL {label}: {type(e).__name__}: {str(e)[:1500]}", flush=True)
    print(f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
