"""Checks and times every Triton kernel against its torch reference and the memory/compute floor.

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_kernels.py          # on a CUDA GPU
    TRITON_INTERPRET=1 python3 benchmarks/gpu_kernels.py --smoke  # tiny shapes, CPU, logic only

Shapes follow Llama-3.1-8B (32 heads, 8 KV heads, head_dim 128, hidden 4096, MLP 14336), bf16,
block_size 16. Every output is poisoned (NaN) before a checked run, inputs are random, and the
check is ||out - ref|| / ||ref|| <= 1e-2 with no NaN left. The floor of a kernel is
max(bytes / copy bandwidth, flops / matmul rate), both ceilings measured at start-up.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _import_ops():
    """Imports the kernel modules without running pagedllm/__init__ (whose server-side
    dependencies the GPU image may lack)."""
    sys.path.insert(0, str(ROOT))
    if "pagedllm" not in sys.modules:
        pkg = types.ModuleType("pagedllm")
        pkg.__path__ = [str(ROOT / "pagedllm")]
        sys.modules["pagedllm"] = pkg
    from pagedllm.attention.ops import paged_attention as pa
    from pagedllm.attention.ops import reshape_and_cache as rc
    from pagedllm.model_executor.layers.ops import activation as act
    from pagedllm.model_executor.layers.ops import rms_norm as rn
    from pagedllm.model_executor.layers.ops import rotary as rot

    return pa, rc, act, rn, rot


pa, rc, act, rn, rot = _import_ops()

BLOCK_SIZE = 16
TOL = 1e-2


@dataclass
class Ceilings:
    bytes_per_s: float
    flops_per_s: float


@dataclass
class Row:
    name: str
    err: float
    kernel_ms: float
    ref_ms: float
    bytes: float
    flops: float

    def floor_ms(self, c: Ceilings) -> float:
        return 1e3 * max(self.bytes / c.bytes_per_s, self.flops / c.flops_per_s)


def bench(fn: Callable[[], object], device: str) -> float:
    """Median milliseconds of fn."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()  # surfaces launch errors here, not later


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("nan")  # unwritten (poisoned) or overflowed elements
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def measure_ceilings(device: str, smoke: bool) -> Ceilings:
    if device != "cuda":
        return Ceilings(bytes_per_s=1e10, flops_per_s=1e11)
    n = 1 << 30  # 1 GiB of bytes: copy reads and writes 2 GiB
    src = torch.empty(n, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), device)
    bw = 2 * n / (ms * 1e-3)
    m = 8192
    a = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    b = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    ms = bench(lambda: a @ b, device)
    return Ceilings(bytes_per_s=bw, flops_per_s=2 * m**3 / (ms * 1e-3))


# ---------------------------------------------------------------------------------------------
# attention


@dataclass
class AttnBatch:
    query: torch.Tensor  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    max_query_len: int
    max_seq_len: int
    total_seq_len: int
    bytes: float
    flops: float

    @property
    def num_reqs(self) -> int:
        return self.seq_lens.shape[0]


def make_attn_batch(
    reqs: list[tuple[int, int]],  # (cached, query_len)
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    device: str,
    gen: torch.Generator,
) -> AttnBatch:
    seq_lens = [c + q for c, q in reqs]
    nblocks = [math.ceil(s / BLOCK_SIZE) for s in seq_lens]
    num_blocks = sum(nblocks)
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    table = torch.zeros(len(reqs), max(nblocks), dtype=torch.int32)
    qsl, used = [0], 0
    for i, n in enumerate(nblocks):
        table[i, :n] = perm[used : used + n]
        used += n
        qsl.append(qsl[-1] + reqs[i][1])
    dt = torch.bfloat16
    query = torch.randn(qsl[-1], num_heads, head_dim, device=device, dtype=dt)
    kv_cache = torch.randn(
        2, num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, device=device, dtype=dt
    )
    esz = 2
    kv_bytes = sum(seq_lens) * num_kv_heads * head_dim * 2 * esz
    q_bytes = 2 * qsl[-1] * num_heads * head_dim * esz  # read q, write out
    pairs = sum(q * c + q * (q + 1) // 2 for c, q in reqs)
    return AttnBatch(
        query=query,
        kv_cache=kv_cache,
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_table=table.to(device),
        max_query_len=max(q for _, q in reqs),
        max_seq_len=max(seq_lens),
        total_seq_len=sum(seq_lens),
        bytes=kv_bytes + q_bytes + table.numel() * 4,
        flops=4.0 * pairs * num_heads * head_dim,
    )


def attn_cases(smoke: bool, gen: torch.Generator) -> dict[str, list[tuple[int, int]]]:
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=gen))
    if smoke:
        return {
            "mixed": [(r(20, 60), 1) for _ in range(4)] + [(16, 24)],
            "decode": [(r(20, 60), 1) for _ in range(4)],
            "long_decode": [(300, 1)],
        }
    decodes = [(r(1024, 4096) - 1, 1) for _ in range(64)]
    return {
        "mixed": decodes + [(256, 512)] * 4,
        "decode": decodes,
        "prefill": [(0, 2048)] * 4,
        "long_decode": [(32767, 1)],
        "long_decode_x4": [(32767, 1)] * 4,
        # One or two long contexts among short ones (sharegpt's tail): the unified launch
        # waits on the long requests' programs unless they are split.
        "skewed_21": [(599, 1)] * 19 + [(2999, 1)] * 2,
        "skewed_48": [(r(200, 800), 1) for _ in range(46)] + [(1999, 1), (3499, 1)],
        "skewed_96": [(r(200, 800), 1) for _ in range(93)] + [(2499, 1)] * 3,
        "uniform_32": [(429, 1)] * 32,
        "uniform_160": [(r(300, 600), 1) for _ in range(160)],
    }


def attn_configs(case: str, smoke: bool) -> list[tuple[str, int, object]]:
    """(label, num_splits, config) variants to time; the first is what the backend picks."""
    C = pa.AttentionLaunchConfig
    if smoke:
        return [("auto", 0, None)]
    if case in ("mixed", "prefill"):
        return [
            ("auto", 0, None),
            ("m64 n64 w4 s3", 1, C(64, 64, 4, 3)),
            ("m64 n32 w4 s3", 1, C(64, 32, 4, 3)),
            ("m128 n64 w8 s3", 1, C(128, 64, 8, 3)),
            ("m128 n32 w8 s3", 1, C(128, 32, 8, 3)),
            ("m32 n64 w4 s2", 1, C(32, 64, 4, 2)),
        ]
    if case == "decode":
        return [
            ("auto", 0, None),
            ("m16 n16 w4 s2", 1, C(16, 16, 4, 2)),
            ("m16 n64 w4 s2", 1, C(16, 64, 4, 2)),
            ("m16 n64 w8 s3", 1, C(16, 64, 8, 3)),
            ("m16 n32 w2 s3", 1, C(16, 32, 2, 3)),
        ]
    if case.startswith(("skewed", "uniform")):
        return [
            ("auto", 0, None),
            ("unified (no split)", 1, None),
            ("split4", 4, None),
            ("split8", 8, None),
            ("split16", 16, None),
        ]
    return [
        ("auto", 0, None),
        ("unified (no split)", 1, None),
        ("split n64 w4", 0, C(16, 64, 4, 2)),
        ("split n64 w8", 0, C(16, 64, 8, 2)),
        ("split16 n64 w4", 16, C(16, 64, 4, 2)),
        ("split64 n64 w4", 64, C(16, 64, 4, 2)),
    ]


def run_attention(device: str, smoke: bool, num_sms: int, rows: list[Row], log) -> None:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    nh, nkv, hd = (32, 8, 128) if not smoke else (4, 2, 64)
    scale = hd**-0.5
    for case, reqs in attn_cases(smoke, gen).items():
        b = make_attn_batch(reqs, nh, nkv, hd, device, gen)
        ref = pa.paged_attention_ref(
            b.query, b.kv_cache, b.query_start_loc, b.seq_lens, b.block_table, scale
        )
        auto_splits = pa.choose_num_splits(b.num_reqs, nkv, b.max_query_len, b.max_seq_len,
                                           num_sms, b.total_seq_len)  # fmt: skip

        def ref_fn(b=b):
            return pa.paged_attention_ref(
                b.query, b.kv_cache, b.query_start_loc, b.seq_lens, b.block_table, scale
            )

        ref_ms = bench(ref_fn, device)
        for label, splits, cfg in attn_configs(case, smoke):
            splits = splits or auto_splits
            if b.max_query_len > 1:
                splits = 1
            out = torch.full_like(b.query, float("nan"))

            def fn(b=b, out=out, splits=splits, cfg=cfg):
                pa.paged_attention(
                    b.query, b.kv_cache, b.query_start_loc, b.seq_lens, b.block_table,
                    b.num_reqs, b.max_query_len, scale,
                    num_splits=splits, out=out, config=cfg,
                )  # fmt: skip

            try:
                fn()
                sync(device)
                err = rel_err(out, ref)
                ms = bench(fn, device)
            except Exception as e:  # keep going: one bad config must not hide the others
                log(f"attention {case} {label}: FAILED {type(e).__name__}: {e}")
                err, ms = float("nan"), float("nan")
            name = f"attn {case} [{label}{' splits=' + str(splits) if splits > 1 else ''}]"
            rows.append(Row(name, err, ms, ref_ms, b.bytes, b.flops))
            log(f"{name}: err {err:.2e} kernel {ms:.4f} ms ref {ref_ms:.3f} ms")
        del b, ref


# ---------------------------------------------------------------------------------------------
# the other kernels


def run_reshape_and_cache(device: str, smoke: bool, rows: list[Row], log) -> None:
    t, nkv, hd = (8192, 8, 128) if not smoke else (40, 2, 64)
    num_blocks = 2 * t // BLOCK_SIZE
    key = torch.randn(t, nkv, hd, device=device, dtype=torch.bfloat16)
    value = torch.randn(t, nkv, hd, device=device, dtype=torch.bfloat16)
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device=device)[:t]
    slots[::7] = -1
    shape = (2, num_blocks, BLOCK_SIZE, nkv, hd)
    cache = torch.full(shape, float("nan"), device=device, dtype=torch.bfloat16)
    expect = cache.clone()
    rc.reshape_and_cache(key, value, cache, slots)
    sync(device)
    rc.reshape_and_cache_ref(key, value, expect, slots)
    same = torch.equal(cache.view(torch.int16), expect.view(torch.int16))
    err = 0.0 if same else float("nan")
    ms = bench(lambda: rc.reshape_and_cache(key, value, cache, slots), device)
    ref_ms = bench(lambda: rc.reshape_and_cache_ref(key, value, expect, slots), device)
    nbytes = 2 * 2 * key.numel() * 2 + slots.numel() * 8
    rows.append(Row(f"reshape_and_cache T={t}", err, ms, ref_ms, nbytes, 0))
    log(f"reshape_and_cache: bit-exact {same}")


def run_rms_norm(device: str, smoke: bool, rows: list[Row], log) -> None:
    t, h = (8192, 4096) if not smoke else (16, 96)
    dt = torch.bfloat16
    x = torch.randn(t, h, device=device, dtype=dt)
    res = torch.randn(t, h, device=device, dtype=dt)
    w = torch.randn(h, device=device, dtype=dt)
    ref_out, ref_sum = rn.rms_norm_ref(x, w, 1e-5, residual=res)
    res_k = res.clone()
    out, new_res = rn.fused_add_rms_norm(x, res_k, w, 1e-5)
    sync(device)
    err = max(rel_err(out, ref_out), rel_err(new_res, ref_sum))
    ms = bench(lambda: rn.fused_add_rms_norm(x, res_k, w, 1e-5), device)
    ref_ms = bench(lambda: rn.rms_norm_ref(x, w, 1e-5, residual=res), device)
    rows.append(Row(f"fused_add_rms_norm {t}x{h}", err, ms, ref_ms, (4 * t * h + h) * 2, 0))
    out = rn.rms_norm(x, w, 1e-5)
    sync(device)
    err = rel_err(out, rn.rms_norm_ref(x, w, 1e-5))
    ms = bench(lambda: rn.rms_norm(x, w, 1e-5), device)
    ref_ms = bench(lambda: rn.rms_norm_ref(x, w, 1e-5), device)
    rows.append(Row(f"rms_norm {t}x{h}", err, ms, ref_ms, (2 * t * h + h) * 2, 0))
    log("rms_norm done")


def run_rotary(device: str, smoke: bool, rows: list[Row], log) -> None:
    t, nh, nkv, hd, max_pos = (8192, 32, 8, 128, 131072) if not smoke else (16, 4, 2, 64, 64)
    inv_freq = 1.0 / (500000 ** (torch.arange(0, hd, 2, device=device).float() / hd))
    freqs = torch.outer(torch.arange(max_pos, device=device).float(), inv_freq)
    cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)  # [max_pos, hd]
    positions = torch.randint(0, max_pos, (t,), device=device)
    for neox in (True, False):
        qkv = torch.randn(t, (nh + 2 * nkv) * hd, device=device, dtype=torch.bfloat16)
        ref = qkv.clone()
        q, k = qkv[:, : nh * hd], qkv[:, nh * hd : (nh + nkv) * hd]
        rq, rk = ref[:, : nh * hd], ref[:, nh * hd : (nh + nkv) * hd]
        rot.rotary_embedding(positions, q, k, hd, cache, neox)
        sync(device)
        rot.rotary_embedding_ref(positions, rq, rk, hd, cache, neox)
        err = max(rel_err(q, rq), rel_err(k, rk))
        ms = bench(
            lambda q=q, k=k, n=neox: rot.rotary_embedding(positions, q, k, hd, cache, n), device
        )
        ref_ms = bench(
            lambda q=rq, k=rk, n=neox: rot.rotary_embedding_ref(positions, q, k, hd, cache, n),
            device,
        )
        nbytes = 2 * t * (nh + nkv) * hd * 2 + t * hd * 4 + t * 8
        style = "neox" if neox else "gptj"
        rows.append(Row(f"rotary {style} T={t}", err, ms, ref_ms, nbytes, 0))
    log("rotary done")


def run_silu_and_mul(device: str, smoke: bool, rows: list[Row], log) -> None:
    t, d = (8192, 14336) if not smoke else (8, 1500)
    x = torch.randn(t, 2 * d, device=device, dtype=torch.bfloat16)
    out = act.silu_and_mul(x)
    sync(device)
    err = rel_err(out, act.silu_and_mul_ref(x.float()))
    ms = bench(lambda: act.silu_and_mul(x), device)
    ref_ms = bench(lambda: act.silu_and_mul_ref(x), device)
    rows.append(Row(f"silu_and_mul {t}x{d}", err, ms, ref_ms, 3 * t * d * 2, 0))
    log("silu_and_mul done")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter)")
    parser.add_argument("--only", default="", help="comma list: attn,cache,norm,rotary,silu")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("no CUDA device: run with TRITON_INTERPRET=1 --smoke")
        return 2
    smoke = args.smoke or device == "cpu"
    log = lambda msg: print(msg, flush=True)
    if device == "cuda":
        import triton

        props = torch.cuda.get_device_properties(0)
        num_sms = props.multi_processor_count
        log(f"device {props.name}, {num_sms} SMs, torch {torch.__version__}, "
            f"triton {triton.__version__}")  # fmt: skip
    else:
        num_sms = 8
    ceil = measure_ceilings(device, smoke)
    log(f"ceilings: copy {ceil.bytes_per_s / 1e12:.2f} TB/s, "
        f"bf16 matmul {ceil.flops_per_s / 1e12:.0f} TFLOP/s")  # fmt: skip
    rows: list[Row] = []
    only = set(filter(None, args.only.split(",")))
    steps = [
        ("cache", lambda: run_reshape_and_cache(device, smoke, rows, log)),
        ("norm", lambda: run_rms_norm(device, smoke, rows, log)),
        ("rotary", lambda: run_rotary(device, smoke, rows, log)),
        ("silu", lambda: run_silu_and_mul(device, smoke, rows, log)),
        ("attn", lambda: run_attention(device, smoke, num_sms, rows, log)),
    ]
    failed = False
    for key, step in steps:
        if only and key not in only:
            continue
        try:
            step()
        except Exception as e:
            failed = True
            log(f"{key}: FAILED {type(e).__name__}: {e}")
    print()
    print("| kernel | rel err | kernel ms | ref ms | floor ms | floor/kernel | GB/s | TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ok = r.err <= TOL
        failed |= not ok
        floor = r.floor_ms(ceil)
        gbs = r.bytes / (r.kernel_ms * 1e-3) / 1e9
        tfs = r.flops / (r.kernel_ms * 1e-3) / 1e12
        print(f"| {r.name} | {r.err:.1e}{'' if ok else ' FAIL'} | {r.kernel_ms:.4f} | "
              f"{r.ref_ms:.3f} | {floor:.4f} | {floor / r.kernel_ms:.0%} | {gbs:.0f} | "
              f"{tfs:.0f} |")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
