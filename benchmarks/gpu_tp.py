"""Tensor parallelism on the GPUs (run on a 2-GPU device machine): correctness and speed.

1. Tiny random Llama in fp32: greedy tokens of TP=2 == TP=1 == HF, one request alone and 64 in
   one batch (CUDA graphs and async scheduling on, the defaults), and PP=2 == TP=1.
2. Random Llama-3.1-8B configuration in bf16: the log-softmax of the last prefill position
   (all vocabulary entries, from the first sampled token's logprobs) under TP=2 vs TP=1,
   centered cosine (= cosine of the logits, which differ from logprobs by a constant).
3. Single stream 512 in / 256 out under TP=1 and TP=2, same session (tok/s and the ratio).

Usage: python benchmarks/gpu_tp.py [--skip-tiny] [--skip-8b] [--skip-speed] [--json OUT]
70B TP=2 throughput: pagedllm bench throughput --model random:llama-3.1-70b --load-format dummy
-tp 2 --dataset single-stream (and --dataset sharegpt-shaped).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pagedllm import LLM, SamplingParams  # noqa: E402
from pagedllm.entrypoints.bench import LLAMA_3_1_8B, TINY_LLAMA, build_random_llama  # noqa: E402


def _llm(model_dir: str, **kwargs) -> LLM:
    return LLM(model=model_dir, skip_tokenizer_init=True, max_model_len=2048,
               gpu_memory_utilization=0.5, **kwargs)  # fmt: skip


def _close(llm: LLM) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()


def _greedy(llm: LLM, prompts: list[list[int]], n: int) -> list[list[int]]:
    sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def check_tiny(report: dict) -> bool:
    from transformers import AutoModelForCausalLM

    d = build_random_llama("/tmp/pagedllm_models/tiny-tp", TINY_LLAMA, "float32", seed=1,
                           std=0.05)  # fmt: skip
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 1000, int(n)).tolist() for n in rng.integers(4, 200, 64)]
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).cuda().eval()
    with torch.inference_mode():
        ids = torch.tensor([prompts[0]], device="cuda")
        hf_alone = hf.generate(ids, max_new_tokens=32, do_sample=False, min_new_tokens=32,
                               eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
    del hf
    results = {}
    for name, kw in {"tp1": {}, "tp2": {"tensor_parallel_size": 2},
                     "pp2": {"pipeline_parallel_size": 2}}.items():  # fmt: skip
        llm = _llm(d, dtype="float32", **kw)
        results[name] = (_greedy(llm, prompts[:1], 32)[0], _greedy(llm, prompts, 32))
        _close(llm)
    tp1 = results["tp1"]
    report["tiny_fp32"] = {
        "tp1_alone_equals_hf": tp1[0] == hf_alone,
        "tp2_alone_equals_tp1": results["tp2"][0] == tp1[0],
        "tp2_batch64_equal_tp1": sum(a == b for a, b in zip(results["tp2"][1], tp1[1])),
        "pp2_batch64_equal_tp1": sum(a == b for a, b in zip(results["pp2"][1], tp1[1])),
    }
    print("tiny fp32:", report["tiny_fp32"], flush=True)
    r = report["tiny_fp32"]
    return (r["tp1_alone_equals_hf"] and r["tp2_alone_equals_tp1"]
            and r["tp2_batch64_equal_tp1"] == 64 and r["pp2_batch64_equal_tp1"] == 64)


def _last_logprobs(llm: LLM, prompts: list[list[int]], vocab: int) -> torch.Tensor:
    sp = SamplingParams(max_tokens=1, temperature=0.0, logprobs=vocab)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    rows = []
    for o in outs:
        row = torch.full((vocab,), float("nan"))
        for tok, lp in o.outputs[0].logprobs[0].items():
            row[tok] = lp.logprob
        rows.append(row)
    return torch.stack(rows)


def check_8b(report: dict, model_dir: str) -> bool:
    build_random_llama(model_dir, LLAMA_3_1_8B, "bfloat16")
    vocab = LLAMA_3_1_8B["vocab_size"]
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, vocab, n).tolist() for n in (17, 200, 511, 1024)]
    got = {}
    for tp in (1, 2):
        llm = _llm(model_dir, tensor_parallel_size=tp, max_logprobs=vocab)
        got[tp] = _last_logprobs(llm, prompts, vocab)
        _close(llm)
    a, b = (x - x.nanmean(dim=-1, keepdim=True) for x in (got[1], got[2]))
    cos = torch.nn.functional.cosine_similarity(a.nan_to_num(), b.nan_to_num(), dim=-1)
    report["llama8b_bf16_tp2_vs_tp1"] = {"centered_cosine": cos.tolist(),
                                         "cosine_min": float(cos.min())}  # fmt: skip
    print("8B bf16 TP=2 vs TP=1:", report["llama8b_bf16_tp2_vs_tp1"], flush=True)
    return float(cos.min()) >= 0.999


def check_speed(report: dict, model_dir: str) -> None:
    build_random_llama(model_dir, LLAMA_3_1_8B, "bfloat16")
    prompt = np.random.default_rng(3).integers(0, LLAMA_3_1_8B["vocab_size"], 512).tolist()
    sp = SamplingParams(max_tokens=256, temperature=0.0, ignore_eos=True)
    speeds = {}
    for tp in (1, 2):
        llm = _llm(model_dir, tensor_parallel_size=tp)
        llm.generate([{"prompt_token_ids": prompt[:100]}], sp, use_tqdm=False)  # warm-up
        t0 = time.perf_counter()
        llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)
        speeds[f"tp{tp}_tok_per_s"] = 256 / (time.perf_counter() - t0)
        _close(llm)
    speeds["tp2_over_tp1"] = speeds["tp2_tok_per_s"] / speeds["tp1_tok_per_s"]
    report["llama8b_single_stream"] = speeds
    print("8B single stream:", speeds, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--skip-8b", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--model-dir", default="/tmp/pagedllm_models/llama-3.1-8b-bfloat16")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    report: dict = {"device": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count()}
    ok = True
    if not args.skip_tiny:
        ok = check_tiny(report) and ok
    if not args.skip_8b:
        ok = check_8b(report, args.model_dir) and ok
    if not args.skip_speed:
        check_speed(report, args.model_dir)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
