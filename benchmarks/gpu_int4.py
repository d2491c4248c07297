"""GPTQ / AWQ on the GPU: the int GEMM kernel table, random int4 Llama checkpoints, decode speed.

    python benchmarks/gpu_int4.py kernels                 # table at M = 1 .. 4096
    python benchmarks/gpu_int4.py write --out /tmp/pagedllm_models [--model llama-3.1-70b]
    python benchmarks/gpu_int4.py decode --out /tmp/pagedllm_models   # bf16 vs gptq vs awq
    python benchmarks/gpu_int4.py correctness [--graphs]  # small models through the GPU path
    TRITON_INTERPRET=1 python benchmarks/gpu_int4.py kernels --smoke  # CPU, logic only

`kernels`: Llama-3.1-8B projections (qkv 4096->6144, o 4096->4096, gate_up 4096->28672, down
14336->4096), 4-bit group 128 (and 8-bit), each unpack variant and, from M = 256, the dense
path (dequantize + cuBLAS, `PAGEDLLM_INT_GEMM_DENSE_MIN_M` sets where it starts); checked against the torch
reference; time vs bf16 cuBLAS (`F.linear`), and as a share of the floor set by streaming the
packed weights, scales and zero points (copy bandwidth measured at start-up).
`write`: random GPTQ (4-bit, g128, sym, format gptq) and AWQ (4-bit, g128) checkpoints of the
configuration, packed tensors drawn directly (every int32 is a valid packed word), for
`pagedllm bench throughput --model DIR` and `decode`.
`decode`: tokens/s of one stream and of 16 streams (128 new tokens each) per checkpoint.
`correctness`: small random Llama/Qwen checkpoints written as GPTQ/AWQ by the tests' writer
(tests/model_executor/quant_formats.py) run through `LLM` on the GPU, in fp32 (greedy tokens
must equal HF's on the dequantized fp32 weights, logprobs within 1e-3) and in bf16 (share of
greedy tokens agreeing, logprob gap), covering every kernel width, act order and the 3-bit
dense fallback. Eager by default: ten engines each capturing ~100 CUDA graphs (and compiling
the kernels for each size) took far longer than the 80 s the H200 session gave the step;
`--graphs` captures them (allow ~10 minutes). In bf16 the decode steps (<= 16 tokens) go
through the GEMV kernels (`ops/int_gemv.py`), prefill through the int GEMM / dense path.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pagedllm.model_executor.layers.ops.int_gemm import (  # noqa: E402
    choose_config,
    int_gemm,
    int_matmul,
)
from pagedllm.model_executor.layers.quantization.packed_int import (  # noqa: E402
    dequantize,
    int_linear_ref,
)

SHAPES_8B = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672),
             "down": (14336, 4096)}


def _bench(fn, device: str) -> float:
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    t0 = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t0)


def _copy_bandwidth(device: str) -> float:
    if device != "cuda":
        return 1e10
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    return 2 * n / (_bench(lambda: dst.copy_(src), device) * 1e-3)


def run_kernels(smoke: bool) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = {"tiny": (256, 96)} if smoke else SHAPES_8B
    ms_list = [1, 256] if smoke else [1, 16, 64, 256, 1024, 4096]
    bw = _copy_bandwidth(device)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    print("| shape | bits | M | unpack | split | rel err | kernel ms | bf16 ms | floor ms | "
          "floor/kernel | speed-up vs bf16 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    gen = torch.Generator(device=device).manual_seed(0)
    failed = False
    for name, (k, n) in shapes.items():
        for bits in (4, 8):
            group = 128 if not smoke else 32
            per_word = 32 // bits
            qweight = torch.randint(-2**31, 2**31 - 1, (k // per_word, n), generator=gen,
                                    device=device, dtype=torch.int64).to(torch.int32)
            groups = k // group
            zeros = torch.full((groups, n), float(2 ** (bits - 1)), device=device,
                               dtype=torch.float16)
            scales = (torch.rand(groups, n, generator=gen, device=device) * 0.004 + 0.001
                      ).half()
            # [N, K] dense weight for cuBLAS
            w_ref = dequantize(qweight, zeros, scales, bits, group).t().to(dtype).contiguous()
            for m in ms_list if bits == 4 else ms_list[:1]:
                x = torch.randn(m, k, generator=gen, device=device).to(dtype)
                ref = int_linear_ref(x, qweight, zeros, scales, bits, group)
                bf16_ms = _bench(lambda x=x, w=w_ref: torch.nn.functional.linear(x, w), device)
                nbytes = k * n * bits / 8 + 2 * groups * n * 2 + (m * k + m * n) * 2
                floor_ms = 1e3 * nbytes / bw
                args = (x, qweight, zeros, scales, bits, group)
                variants = {u: (lambda a=args, u=u: int_gemm(*a, unpack=u))
                            for u in ("gather", "reshape", "planes")}
                if m >= 256:  # dequantize to a 16-bit buffer, then cuBLAS
                    variants["dense"] = lambda a=args: int_matmul(*a, dense_min_m=1)
                for unpack, fn in variants.items():
                    out = fn()
                    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
                    ok = err < 1e-2
                    failed |= not ok
                    ms = _bench(fn, device)
                    split = choose_config(m, n, k, x.device).split_k
                    print(f"| {name} {k}x{n} | {bits} | {m} | {unpack} | {split} | {err:.1e}"
                          f"{'' if ok else ' FAIL'} | {ms:.4f} | {bf16_ms:.4f} | "
                          f"{floor_ms:.4f} | {floor_ms / ms:.0%} | {bf16_ms / ms:.2f}x |",
                          flush=True)
            del w_ref
            if device == "cuda":
                torch.cuda.empty_cache()
    return 1 if failed else 0


def _config(model: str) -> dict:
    from pagedllm.entrypoints.bench import RANDOM_MODELS

    return dict(RANDOM_MODELS[model])


def write_model(out_root: str, model: str, method: str) -> str:
    """A random int4 checkpoint of `model` (the published layout, drawn directly); its dir."""
    from pagedllm.entrypoints.bench_quant import build_random_int4_llama

    return build_random_int4_llama(os.path.join(out_root, f"{model}-{method}-int4"),
                                   _config(model), method)


def run_decode(out_root: str, model: str) -> None:
    import gc

    from pagedllm import LLM, SamplingParams
    from pagedllm.entrypoints.bench import LLAMA_3_1_8B, build_random_llama

    dirs = {m: write_model(out_root, model, m) for m in ("gptq", "awq")}
    if model == "llama-3.1-8b":
        dirs = {"bf16": build_random_llama(os.path.join(out_root, "llama-3.1-8b-bfloat16"),
                                           LLAMA_3_1_8B, "bfloat16"), **dirs}
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    results = {}
    for label, path in dirs.items():
        llm = LLM(model=path, skip_tokenizer_init=True, dtype="bfloat16", max_model_len=4096)
        for batch in (1, 16):
            prompts = [{"prompt_token_ids": list(range(100 + i, 164 + i))} for i in range(batch)]
            llm.generate(prompts, params, use_tqdm=False)  # warm-up (graphs, autotune)
            t0 = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            tps = batch * 128 / (time.perf_counter() - t0)
            results[(label, batch)] = tps
            print(f"{label} batch {batch}: {tps:.1f} tok/s", flush=True)
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    for batch in (1, 16):
        if ("bf16", batch) in results:
            for label in ("gptq", "awq"):
                ratio = results[(label, batch)] / results[("bf16", batch)]
                print(f"{label} / bf16 at batch {batch}: {ratio:.2f}x")


def run_correctness(out_root: str, smoke: bool, graphs: bool = False) -> int:
    """Each case is reported and timed on its own; one that raises (the first run on the
    H200 stopped at an `OutOfResources` of the fp32 tile) no longer ends the run."""
    import numpy as np

    from pagedllm import SamplingParams
    from tests.model_executor.quant_formats import QuantSpec

    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = {"hidden_size": 512, "intermediate_size": 1536, "num_attention_heads": 8,
            "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 2048,
            "max_position_embeddings": 2048}
    if smoke:  # CPU: the script's logic only (the CPU path dequantizes at load)
        size = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 512}
    cases = {
        "gptq4_act_qwen2": ("Qwen2ForCausalLM", QuantSpec("gptq", 4, 128, sym=False,
                                                          desc_act=True)),
        "gptq8_g64_llama": ("LlamaForCausalLM", QuantSpec("gptq", 8, 64)),
        "gptq2_v2_llama": ("LlamaForCausalLM", QuantSpec("gptq", 2, 32,
                                                         checkpoint_format="gptq_v2")),
        "gptq3_dense_qwen3": ("Qwen3ForCausalLM", QuantSpec("gptq", 3, 128, sym=False)),
        "awq_g128_llama": ("LlamaForCausalLM", QuantSpec("awq", group_size=128, sym=False)),
    }
    rng = np.random.default_rng(0)
    lengths = (7, 60) if smoke else (7, 60, 300, 1500)
    prompts = [rng.integers(0, size["vocab_size"], n).tolist() for n in lengths]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=1)
    failed = False
    for name, (arch, spec) in list(cases.items())[: 2 if smoke else None]:
        t0 = time.perf_counter()
        try:
            failed |= _correctness_case(name, arch, spec, size, prompts, params, out_root,
                                        device, graphs)
        except Exception as e:  # report the case and go on with the others
            failed = True
            print(f"{name}: FAIL {type(e).__name__}: {str(e)[:800]}", flush=True)
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return 1 if failed else 0


def _correctness_case(name, arch, spec, size, prompts, params, out_root, device,
                      graphs) -> bool:
    """One checkpoint of `run_correctness` in fp32 and bf16; True when it failed."""
    import gc

    from transformers import AutoModelForCausalLM

    from pagedllm import LLM
    from pagedllm.model_executor.loader.testing import build_random_hf_model_dir
    from tests.model_executor.conftest import tiny_config
    from tests.model_executor.quant_formats import write_quantized_checkpoint

    failed = False
    root = os.path.join(out_root, "int4-correctness", name)
    src = build_random_hf_model_dir(os.path.join(root, "fp32"), tiny_config(arch, **size),
                                    seed=1, std=0.05)
    quant, ref = os.path.join(root, "quant"), os.path.join(root, "ref")
    write_quantized_checkpoint(src, quant, ref, spec, seed=2)
    hf = AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32).to(device).eval()
    for dtype in ("float32", "bfloat16"):
        llm = LLM(model=quant, skip_tokenizer_init=True, dtype=dtype,
                  gpu_memory_utilization=0.3, enforce_eager=not graphs)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                            use_tqdm=False)
        agree, total, gap = 0, 0, 0.0
        for p, o in zip(prompts, outs):
            toks = o.outputs[0].token_ids
            seq = torch.tensor([p + toks], device=device)
            with torch.inference_mode():
                lps = torch.log_softmax(hf(seq).logits[0].float(), -1)
            hf_next = lps[len(p) - 1:-1].argmax(-1).tolist()
            agree += sum(a == b for a, b in zip(toks, hf_next))
            total += len(toks)
            for i, top in enumerate(o.outputs[0].logprobs):
                tok, lp = next(iter(top.items()))
                gap = max(gap, abs(lp.logprob - lps[len(p) - 1 + i, tok].item()))
        ok = (agree == total and gap < 1e-3) if dtype == "float32" else agree >= 0.9 * total
        failed |= not ok
        print(f"{name} {dtype}: greedy agree {agree}/{total}, max logprob gap {gap:.1e}"
              f"{'' if ok else '  FAIL'}", flush=True)
        del llm
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    del hf
    return failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["kernels", "write", "decode", "correctness"])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--graphs", action="store_true",
                        help="correctness: capture CUDA graphs (default eager)")
    parser.add_argument("--out", default="/tmp/pagedllm_models")
    parser.add_argument("--model", default="llama-3.1-8b",
                        choices=["llama-3.1-8b", "llama-3.1-70b", "tiny"])
    args = parser.parse_args()
    if args.what == "kernels":
        return run_kernels(args.smoke or not torch.cuda.is_available())
    if args.what == "write":
        for method in ("gptq", "awq"):
            print(write_model(args.out, args.model, method))
        return 0
    if args.what == "correctness":
        return run_correctness(args.out, args.smoke or not torch.cuda.is_available(),
                               args.graphs)
    run_decode(args.out, args.model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
