"""Offline throughput on CPU: pagedllm vs HF transformers `generate` on the same requests.

48 requests, 16-256 input and 16-128 output tokens (seeded random token ids, ignore_eos), all
submitted at once to pagedllm; HF runs them in static batches of 16 (left-padded; a batch runs
until its longest request is done). Prints one table and a JSON line.

    python benchmarks/offline_throughput.py [--num-requests 48] [--hf-batch 16] [--skip-hf]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_requests(n: int, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    in_lens = rng.integers(16, 257, size=n)
    out_lens = rng.integers(16, 129, size=n)
    prompts = [rng.integers(100, vocab - 100, size=int(L)).tolist() for L in in_lens]
    return prompts, [int(o) for o in out_lens]


def run_pagedllm(llm, prompts, out_lens):
    from pagedllm import SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for o in out_lens]
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    dt = time.perf_counter() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    assert n_out == sum(out_lens), (n_out, sum(out_lens))
    return dt, n_out


def run_hf(model, prompts, out_lens, batch: int, pad_id: int):
    total_useful = 0
    t0 = time.perf_counter()
    for s in range(0, len(prompts), batch):
        ps, os_ = prompts[s : s + batch], out_lens[s : s + batch]
        width = max(len(p) for p in ps)
        ids = torch.full((len(ps), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(ps), width), dtype=torch.long)
        for i, p in enumerate(ps):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        with torch.inference_mode():
            model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max(os_),
                min_new_tokens=max(os_), do_sample=False, pad_token_id=pad_id,
            )
        total_useful += sum(os_)
    return time.perf_counter() - t0, total_useful


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="default: the SmolLM2 GGUF")
    ap.add_argument("--num-requests", type=int, default=48)
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    from pagedllm import LLM

    t0 = time.perf_counter()
    llm = LLM(model=args.model)
    load_s = time.perf_counter() - t0
    vocab = llm.llm_engine.model_config.vocab_size
    prompts, out_lens = make_requests(args.num_requests, vocab)
    run_pagedllm(llm, prompts[:4], [4] * 4)  # warm-up
    p_dt, p_out = run_pagedllm(llm, prompts, out_lens)
    p_in = sum(len(p) for p in prompts)
    rows = [("pagedllm", p_dt, p_out)]
    hf_dt = None
    if not args.skip_hf:
        from transformers import AutoModelForCausalLM

        path = llm.llm_engine.model_config.model_path
        if path.endswith(".gguf"):
            model = AutoModelForCausalLM.from_pretrained(
                os.path.dirname(path), gguf_file=os.path.basename(path), torch_dtype=torch.float32
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
        model.eval()
        pad = llm.get_tokenizer().pad_token_id or 0
        run_hf(model, prompts[:2], [2, 2], 2, pad)  # warm-up
        hf_dt, hf_out = run_hf(model, prompts, out_lens, args.hf_batch, pad)
        rows.append((f"HF generate (static batches of {args.hf_batch})", hf_dt, hf_out))
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:
        commit = "unknown"
    print(f"\nmodel load {load_s:.1f} s; {args.num_requests} requests, {p_in} prompt tokens, "
          f"{sum(out_lens)} output tokens; torch threads {torch.get_num_threads()}; commit {commit}")
    print(f"{'system':42s} {'time s':>8s} {'req/s':>8s} {'out tok/s':>10s} {'total tok/s':>12s}")
    for name, dt, n_out in rows:
        print(f"{name:42s} {dt:8.2f} {args.num_requests / dt:8.2f} {n_out / dt:10.1f} "
              f"{(n_out + p_in) / dt:12.1f}")
    result = {"pagedllm_s": p_dt, "hf_s": hf_dt, "commit": commit,
              "speedup": (hf_dt / p_dt) if hf_dt else None}
    if hf_dt:
        print(f"pagedllm / HF throughput: {hf_dt / p_dt:.2f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
