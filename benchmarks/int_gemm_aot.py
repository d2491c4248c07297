"""Compiles the int GEMM kernels ahead of time for a GPU target, with no GPU present.

    python benchmarks/int_gemm_aot.py            # sm_90 (H100/H200), representative variants
    python benchmarks/int_gemm_aot.py --all      # every unpack x bits x tile x split x groups
    python benchmarks/int_gemm_aot.py --arch 80  # another compute capability

Catches lowering errors of the Triton code for the real target (the interpreter, which the
tests use, accepts programs the compiler may refuse) and prints each variant's register and
stack (spill) use from cuobjdump, since registers bound occupancy, and so the loads in
flight, of the memory-bound decode GEMM.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from pagedllm.model_executor.layers.ops import int_gemm as ig  # noqa: E402

GEMM_SIGNATURE = {
    "x_ptr": "*bf16", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "g_ptr": "*i32",
    "out_ptr": "*bf16", "partial_ptr": "*fp32", "lock_ptr": "*i32", "M": "i32", "N": "i32",
    "K": "i32", "stride_xm": "i32", "K_PER_SPLIT": "i32", "SPLIT_K": "i32",
}
DEQUANT_SIGNATURE = {"qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "g_ptr": "*i32",
                     "out_ptr": "*bf16", "N": "i32", "K": "i32"}
TILES = ((16, 64, 128), (32, 64, 128), (64, 128, 64), (128, 128, 64))


def _variants(everything: bool) -> list[dict]:
    out = []
    for unpack, bits, (bm, bn, bk), split, gpb, gidx in itertools.product(
            ig.UNPACK_MODES, ig.KERNEL_BITS, TILES, (1, 3), (True, False), (False, True)):
        if (gpb and gidx) or (bm == 128 and split > 1):
            continue
        if not everything and not (bits == 4 and bm in (16, 32, 64) and not (gidx and split > 1)):
            continue
        if unpack == "planes":
            bk = max(bk, 16 * (32 // bits))
        out.append({"HAS_SPLIT": split > 1, "BITS": bits, "GROUP_SIZE": 128, "HAS_GIDX": gidx,
                    "GROUP_PER_BLOCK": gpb, "UNPACK": ig.UNPACK_MODES[unpack],
                    "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "DOT_UPCAST": False})
    return out


def _resources(cubin: bytes) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True,
                              text=True).stdout
    for line in text.splitlines():
        if "REG:" in line:
            fields = dict(item.split(":") for item in line.split() if ":" in item)
            return f"regs {fields.get('REG')} stack {fields.get('STACK')}"
    return "?"


# Arguments the launcher sees as multiples of 16 on real shapes (Triton specializes those, and
# 16-byte-aligned pointers, at run time): without the hint loads are not vectorized and the
# register counts read far too high.
ALIGNED_INTS = ("N", "K", "stride_xm", "stride_wn", "K_PER_SPLIT")


def _compile(fn, signature: dict, consts: dict, target: GPUTarget, warps: int,
             stages: int = 3) -> str:
    sig = {**signature, **dict.fromkeys(consts, "constexpr")}
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]]
             for name, ty in signature.items() if ty.startswith("*") or name in ALIGNED_INTS}
    kernel = triton.compile(ASTSource(fn, sig, consts, attrs), target=target,
                            options={"num_warps": warps, "num_stages": stages})
    return f"{_resources(kernel.asm['cubin'])} smem {kernel.metadata.shared}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--all", action="store_true")
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    names = {v: k for k, v in ig.UNPACK_MODES.items()}
    failed = 0
    for consts in _variants(args.all):
        label = (f"{names[consts['UNPACK']]} {consts['BITS']}-bit {consts['BLOCK_M']}x"
                 f"{consts['BLOCK_N']}x{consts['BLOCK_K']} split {consts['HAS_SPLIT']} "
                 f"{'group/block' if consts['GROUP_PER_BLOCK'] else 'g_idx' if consts['HAS_GIDX'] else 'group/row'}")
        t0 = time.perf_counter()
        try:
            res = _compile(ig._int_gemm_kernel, GEMM_SIGNATURE, consts, target,
                           8 if consts["BLOCK_M"] >= 64 else 4)  # as choose_config
            print(f"ok   {label}: {res} ({time.perf_counter() - t0:.0f}s)", flush=True)
        except Exception as e:  # noqa: BLE001 - report every variant
            failed += 1
            print(f"FAIL {label}: {type(e).__name__}: {str(e)[:1500]}", flush=True)
    for bits in ig.KERNEL_BITS:
        consts = {"BITS": bits, "GROUP_SIZE": 128, "HAS_GIDX": False, "GROUP_PER_BLOCK": True,
                  "BLOCK_K": 64, "BLOCK_N": 128}
        try:
            res = _compile(ig._int_dequant_kernel, DEQUANT_SIGNATURE, consts, target, 4)
            print(f"ok   dequant {bits}-bit: {res}", flush=True)
        except Exception as e:  # noqa: BLE001
            failed += 1
            print(f"FAIL dequant {bits}-bit: {type(e).__name__}: {str(e)[:1500]}", flush=True)
    print(f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
