"""GPU correctness of the whole engine against HF transformers (run on the device machine).

1. A small random Llama in fp32: pagedllm's greedy tokens equal HF's, for a request alone and
   for the same requests in one batch of 64 (CUDA graphs on, the default).
2. The random Llama-3.1-8B configuration in bf16: last-position prefill logits vs HF (cosine),
   and how far greedy outputs agree between batch size 1 and batch size 64 (first divergence).
3. Embeddings: a random encoder with all-MiniLM-L6-v2's configuration, fp32 and bf16, 16 inputs
   of 3-500 tokens in one `LLM.embed` call vs HF's CLS vector, normalized (cosine).

Usage: python benchmarks/gpu_correctness.py [--skip-8b] [--skip-tiny] [--skip-embed] [--json OUT]
       [--extra-stds 0.01]  (the 8B logit check again on a model drawn with init std 0.01)
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pagedllm import LLM, SamplingParams  # noqa: E402
from pagedllm.entrypoints.bench import (  # noqa: E402
    LLAMA_3_1_8B,
    TINY_LLAMA,
    build_random_llama,
)


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt], device="cuda")
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
            min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def _hf_last_logits(model, prompts: list[list[int]]) -> torch.Tensor:
    with torch.inference_mode():
        rows = [model(torch.tensor([p], device="cuda")).logits[0, -1].float().cpu() for p in prompts]
    return torch.stack(rows)


def _cosines(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).tolist()


def _greedy(llm: LLM, prompts: list[list[int]], n: int) -> list[list[int]]:
    sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def check_tiny_fp32(report: dict) -> None:
    from transformers import AutoModelForCausalLM

    d = build_random_llama("/tmp/pagedllm_models/tiny-correctness", TINY_LLAMA, "float32",
                           seed=1, std=0.05)  # fmt: skip
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 1000, int(n)).tolist() for n in rng.integers(4, 200, 64)]
    n_out = 48
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).cuda().eval()
    ref = [_hf_greedy(hf, p, n_out) for p in prompts]
    del hf
    llm = LLM(model=d, dtype="float32", skip_tokenizer_init=True, max_model_len=1024,
              gpu_memory_utilization=0.3)  # fmt: skip
    alone = _greedy(llm, prompts[:1], n_out)[0]
    batch = _greedy(llm, prompts, n_out)
    mism = [i for i in range(64) if batch[i] != ref[i]]
    report["tiny_fp32"] = {
        "alone_equals_hf": alone == ref[0],
        "batch64_equal_hf": 64 - len(mism),
        "batch64_mismatches": {i: _first_divergence(batch[i], ref[i]) for i in mism},
    }
    print("tiny fp32:", report["tiny_fp32"], flush=True)
    del llm
    torch.cuda.empty_cache()


MINILM_CONFIG = dict(
    vocab_size=30522, hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
    num_attention_heads=12, max_position_embeddings=512, type_vocab_size=2, hidden_act="gelu",
)


def check_embed(report: dict, device: str = "cuda") -> None:
    """Random MiniLM-shaped encoder: pagedllm's pooled embeddings vs HF's CLS vectors."""
    import transformers

    path = "/tmp/pagedllm_models/minilm-random"
    config = transformers.BertConfig(**MINILM_CONFIG)
    config.architectures = ["BertModel"]
    torch.manual_seed(3)
    hf = transformers.BertModel(config).eval()
    hf.save_pretrained(path, safe_serialization=True)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(1000, 30000, int(n)).tolist() for n in rng.integers(3, 500, 16)]
    result = {}
    for dtype in ("float32", "bfloat16"):
        model = hf.to(device=device, dtype=getattr(torch, dtype))
        with torch.inference_mode():
            ref = [model(torch.tensor([p], device=device)).last_hidden_state[0, 0].float()
                   for p in prompts]  # fmt: skip
        ref = [torch.nn.functional.normalize(r, dim=0) for r in ref]
        llm = LLM(model=path, dtype=dtype, skip_tokenizer_init=True, device=device,
                  gpu_memory_utilization=0.3)  # fmt: skip
        outs = llm.embed([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
        got = [torch.tensor(o.outputs.embedding, device=device) for o in outs]
        cos = [float(torch.dot(g, r)) for g, r in zip(got, ref)]
        result[dtype] = {"cosine_min": min(cos), "cosine_mean": sum(cos) / len(cos)}
        del llm
        gc.collect()
    report["embed_minilm_random"] = result
    print("embed (random MiniLM config):", result, flush=True)


def _pagedllm_last_logits(llm: LLM, prompts: list[list[int]]) -> torch.Tensor:
    """Last-position logits of each prompt from one prefill step (compute_logits hooked)."""
    runner = llm.llm_engine.engine_core.executor.worker.model_runner
    captured: list[torch.Tensor] = []
    orig = runner.model.compute_logits

    def capture(hidden: torch.Tensor) -> torch.Tensor:
        logits = orig(hidden)
        captured.append(logits.float().cpu())
        return logits

    runner.model.compute_logits = capture
    try:
        _greedy(llm, prompts, 1)
    finally:
        runner.model.compute_logits = orig
    return torch.cat(captured)[: len(prompts)]


def _hf_logit_cosines(model_dir: str, prompts: list[list[int]], ours: torch.Tensor) -> dict:
    """pagedllm bf16 vs HF bf16, and both against an fp32 evaluation of the same weights."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    hf_logits = _hf_last_logits(hf, prompts)
    del hf
    torch.cuda.empty_cache()
    hf32 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    fp32_logits = _hf_last_logits(hf32, prompts)
    del hf32
    torch.cuda.empty_cache()
    cos = _cosines(ours, hf_logits)
    return {
        "prefill_logits_cosine_min": min(cos),
        "prefill_logits_cosine": cos,
        "pagedllm_bf16_vs_hf_fp32_cosine_min": min(_cosines(ours, fp32_logits)),
        "hf_bf16_vs_hf_fp32_cosine_min": min(_cosines(hf_logits, fp32_logits)),
    }


def _8b_prompts() -> list[list[int]]:
    rng = np.random.default_rng(2)
    vocab = LLAMA_3_1_8B["vocab_size"]
    return [rng.integers(0, vocab, int(n)).tolist() for n in rng.integers(16, 512, 64)]


def check_8b_bf16(report: dict, model_dir: str) -> None:
    from transformers import AutoModelForCausalLM

    prompts = _8b_prompts()
    llm = LLM(model=model_dir, dtype="bfloat16", skip_tokenizer_init=True, max_model_len=4096,
              gpu_memory_utilization=0.5)  # fmt: skip
    n_logit = 8
    ours = _pagedllm_last_logits(llm, prompts[:n_logit])
    n_out = 128
    alone = [_greedy(llm, [p], n_out)[0] for p in prompts[:8]]
    batch = _greedy(llm, prompts, n_out)
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    hf_greedy = [_hf_greedy(hf, p, n_out) for p in prompts[:4]]
    del hf
    torch.cuda.empty_cache()
    report["llama8b_bf16"] = {
        **_hf_logit_cosines(model_dir, prompts[:n_logit], ours),
        "batch1_vs_batch64_first_divergence": [
            _first_divergence(alone[i], batch[i]) for i in range(8)
        ],
        "batch1_vs_hf_first_divergence": [
            _first_divergence(alone[i], hf_greedy[i]) for i in range(4)
        ],
        "output_len": n_out,
    }
    print("llama 8B bf16:", report["llama8b_bf16"], flush=True)


def check_8b_logits_at_std(report: dict, std: float) -> None:
    """The logit check on the same config drawn with another init std.

    With HF's 0.02 every random linear of the 4096-wide model has a gain of ~1.6, so rounding
    noise grows layer by layer and bf16 vs fp32 cosine bottoms out near 0.997 for any bf16
    engine; a smaller std gives a random model in a better-conditioned regime.
    """
    model_dir = f"/tmp/pagedllm_models/llama-3.1-8b-bfloat16-std{std}"
    build_random_llama(model_dir, LLAMA_3_1_8B, "bfloat16", std=std)
    prompts = _8b_prompts()[:8]
    llm = LLM(model=model_dir, dtype="bfloat16", skip_tokenizer_init=True, max_model_len=4096,
              gpu_memory_utilization=0.5, enforce_eager=True)  # fmt: skip
    ours = _pagedllm_last_logits(llm, prompts)
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    report[f"llama8b_bf16_std{std}"] = r = _hf_logit_cosines(model_dir, prompts, ours)
    print(f"llama 8B bf16, init std {std}:", r, flush=True)
    shutil.rmtree(model_dir, ignore_errors=True)  # 16 GB of disk


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-8b", action="store_true")
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--skip-embed", action="store_true")
    ap.add_argument("--device", default="cuda", help="cpu runs only the embedding check")
    ap.add_argument("--model-dir", default="/tmp/pagedllm_models/llama-3.1-8b-bfloat16")
    ap.add_argument("--json", default=None)
    ap.add_argument("--extra-stds", default="",
                    help="comma list: also check 8B prefill logits at these init stds")
    args = ap.parse_args()
    if args.device == "cpu":
        report = {"device": "cpu"}
        check_embed(report, "cpu")
        return 0
    report: dict = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d")}
    if not args.skip_embed:
        check_embed(report)
    if not args.skip_tiny:
        check_tiny_fp32(report)
    if not args.skip_8b:
        build_random_llama(args.model_dir, LLAMA_3_1_8B, "bfloat16")
        check_8b_bf16(report, args.model_dir)
    for std in (float(x) for x in args.extra_stds.split(",") if x):
        check_8b_logits_at_std(report, std)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    tiny = report.get("tiny_fp32", {"alone_equals_hf": True, "batch64_equal_hf": 64})
    ok = tiny["alone_equals_hf"] and tiny["batch64_equal_hf"] == 64
    if "embed_minilm_random" in report:
        ok = ok and all(r["cosine_min"] >= 0.999 for r in report["embed_minilm_random"].values())
    for key in (k for k in report if k.startswith("llama8b_bf16")):
        # >= 0.999 vs HF bf16, or, where bf16 rounding alone is further off than that (HF's
        # own bf16 vs fp32), at least as close to the fp32 evaluation as HF bf16 is.
        r = report[key]
        floor = r["hf_bf16_vs_hf_fp32_cosine_min"] - 1e-4
        ok = ok and (r["prefill_logits_cosine_min"] >= 0.999
                     or r["pagedllm_bf16_vs_hf_fp32_cosine_min"] >= floor)  # fmt: skip
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
