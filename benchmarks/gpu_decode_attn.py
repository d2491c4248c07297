"""Small-batch decode attention on the GPU: split counts and split sizes as a decode graph runs them.

    PYTHONUNBUFFERED=1 timeout 300 python3 benchmarks/gpu_decode_attn.py
    TRITON_INTERPRET=1 python3 benchmarks/gpu_decode_attn.py --smoke   # CPU, logic only

At one to a few requests, decode attention is a chain of two short launches per layer (the
split-KV kernel and its combine); their latency, not the KV bytes, sets its time (0.32 ms of a
4.66 ms batch-1 step on the H200, ten times the KV-read floor). For each (batch, context) case,
Llama-3.1-8B heads (32 / 8 KV, head_dim 128, bf16, block 16), every variant is checked
against the torch reference and timed as one CUDA graph of back-to-back calls, each on
another layer's KV cache (copies together larger than the L2, as in a decode step; at least 20
calls, `gpu_gemv._bench`), median of 5 replays: the unified kernel (no split), and split counts x fewest keys per split
(`AttentionLaunchConfig.min_split_keys`, a runtime value: a graph captured with NUM_SPLITS
splits uses only as many as the context fills) x key tile. "engine" is what a decode graph of
that batch size replays today (splits chosen for max_model_len, the default split size).
"""

from __future__ import annotations

import argparse
import sys

import torch
from gpu_gemv import _bench  # noqa: E402 (one CUDA graph of back-to-back calls, median of 5)
from gpu_kernels import make_attn_batch, pa, rel_err  # noqa: E402 (sets up the import path)

NH, NKV, HD = 32, 8, 128
L2_BYTES = 60 << 20
MAX_MODEL_LEN = 4096


def variants(smoke: bool) -> list[tuple[str, int, object]]:
    C = pa.AttentionLaunchConfig
    if smoke:
        return [("unified", 1, None), ("s4 k32 n16", 4, C(block_n=16, min_split_keys=32))]
    out = [("unified", 1, None)]
    for splits in (4, 8, 16, 32):
        for keys in (32, 64, 128, 256):
            for block_n in (32, 64):
                if block_n <= keys:
                    out.append((f"s{splits} k{keys} n{block_n}", splits,
                                C(block_n=block_n, min_split_keys=keys)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    smoke = args.smoke or not cuda
    device = "cuda" if cuda else "cpu"
    sms = torch.cuda.get_device_properties(0).multi_processor_count if cuda else 8
    cases = [(1, 100)] if smoke else [(1, 512), (1, 768), (1, 1024), (1, 2048), (2, 768),
                                      (4, 768), (8, 600), (16, 600), (32, 429)]
    gen = torch.Generator().manual_seed(0)
    print("| batch | context | engine us (splits) | unified us | best us | best variant | "
          "2nd | 3rd |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    failed = False
    for batch, ctx in cases:
        reqs = [(ctx - 1, 1)] * batch
        one = make_attn_batch(reqs, NH, NKV, HD, device, gen)
        kv_bytes = one.kv_cache.numel() * 2
        copies = 1 if not cuda else max(1, min(32, -(-int(2.5 * L2_BYTES) // kv_bytes)))
        batches = [one] + [make_attn_batch(reqs, NH, NKV, HD, device, gen)
                           for _ in range(copies - 1)]
        ref = pa.paged_attention_ref(one.query, one.kv_cache, one.query_start_loc,
                                     one.seq_lens, one.block_table, HD**-0.5)
        engine_splits = pa.choose_num_splits(batch, NKV, 1, MAX_MODEL_LEN, sms)
        timed = {}
        for label, splits, cfg in [("engine", engine_splits, None), *variants(smoke)]:
            outs = [torch.full_like(b.query, float("nan")) for b in batches]

            def fn(b, out, splits=splits, cfg=cfg):
                pa.paged_attention(b.query, b.kv_cache, b.query_start_loc, b.seq_lens,
                                   b.block_table, b.num_reqs, 1, HD**-0.5, num_splits=splits,
                                   out=out, config=cfg)

            try:
                fn(batches[0], outs[0])
                err = rel_err(outs[0], ref)
            except Exception as e:  # a config the compiler refuses: skip it
                print(f"  {batch}x{ctx} {label}: {type(e).__name__}: {str(e)[:100]}")
                continue
            if not err <= 1e-2:
                failed = True
                print(f"  FAIL {batch}x{ctx} {label}: rel err {err:.1e}", flush=True)
                continue
            if not cuda:
                timed[label] = 0.0
                continue
            timed[label] = _bench([lambda b=b, o=o: fn(b, o) for b, o in zip(batches, outs)],
                                  device)
        ranked = sorted((us, label) for label, us in timed.items()
                        if label not in ("engine", "unified"))
        top = [f"{label} {us:.1f}" for us, label in ranked[:3]] + ["", "", ""]
        print(f"| {batch} | {ctx} | {timed.get('engine', float('nan')):.1f} ({engine_splits}) | "
              f"{timed.get('unified', float('nan')):.1f} | "
              f"{ranked[0][0] if ranked else float('nan'):.1f} | {top[0]} | {top[1]} | "
              f"{top[2]} |", flush=True)
        del batches
        if cuda:
            torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
