"""One stream on CPU: prefill and decode tok/s of pagedllm and of llama.cpp on the same GGUF.

A prompt of P random token ids (default 128), then N greedy decode tokens (default 128, EOS
ignored). pagedllm runs once per `--dtype` (default: `auto`, i.e. `LLM(model=...)` defaults,
and `float32`), each in its own process; prefill tok/s = P / time to the first token, decode
tok/s = N / (time of a P+N run - time of a P+1 run), best of `--repeats` on fresh random prompts
(prefix caching never hits). Each rate is also given per process CPU second (times the
thread count), which a shared machine disturbs less than the wall clock.

The peer is llama.cpp through llama-cpp-python, which is NOT a pagedllm dependency: install it
in the benchmark's own virtual environment (it compiles llama.cpp from the sdist, ~10-40 min on
2 cores) and pass that interpreter:

    python -m venv /tmp/llamacpp
    CMAKE_BUILD_PARALLEL_LEVEL=2 /tmp/llamacpp/bin/pip install llama-cpp-python numpy
    OMP_NUM_THREADS=1 python benchmarks/cpu_single_stream.py --threads 1 \\
        --llama-cpp-python /tmp/llamacpp/bin/python

`--random-gguf Q4_K|Q8_0` first writes a random Qwen2.5-1.5B configuration (28 layers, hidden
1536, 12 heads / 2 KV heads, intermediate 8960, tied embeddings) as a GGUF file with gguf's
writer — random quantized blocks, not a quantization of anything — with the bundled SmolLM2
tokenizer (so vocab 49152 instead of Qwen's 151936: 1.3B parameters) and benchmarks that file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Runs under the peer's interpreter: llama_cpp and numpy only. argv[1] is a JSON job.
_LLAMA_CPP_WORKER = r"""
import json, sys, time
import numpy as np
from llama_cpp import Llama

job = json.loads(sys.argv[1])
P, N, T = job["prompt_len"], job["output_len"], job["threads"]
llm = Llama(model_path=job["gguf"], n_threads=T, n_threads_batch=T, n_ctx=P + N + 16,
            n_batch=max(P, 32), n_ubatch=max(P, 32), verbose=False)
vocab = llm.n_vocab()
rng = np.random.default_rng(job["seed"])


def last_argmax():
    # Without logits_all, llama-cpp-python keeps no scores; read the context's last logits.
    return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))


best = {"prefill_tok_s": 0.0, "decode_tok_s": 0.0, "prefill_tok_cpu_s": 0.0,
        "decode_tok_cpu_s": 0.0}
for rep in range(job["repeats"] + 1):  # the first is a warm-up
    llm.reset()
    toks = rng.integers(100, vocab - 100, size=P).tolist()
    t, c = time.perf_counter(), time.process_time()
    llm.eval(toks)
    prefill, prefill_cpu = time.perf_counter() - t, time.process_time() - c
    nxt = last_argmax()
    t, c = time.perf_counter(), time.process_time()
    for _ in range(N):
        llm.eval([nxt])
        nxt = last_argmax()
    decode, decode_cpu = time.perf_counter() - t, time.process_time() - c
    if rep:
        for key, value in (("prefill_tok_s", P / prefill), ("decode_tok_s", N / decode),
                           ("prefill_tok_cpu_s", P * T / prefill_cpu),
                           ("decode_tok_cpu_s", N * T / decode_cpu)):
            best[key] = max(best[key], value)
print(json.dumps(best))
"""


def _pagedllm_worker(job: dict) -> dict:
    """One pagedllm configuration, in this (fresh) process."""
    import torch

    torch.set_num_threads(job["threads"])
    from pagedllm import LLM, SamplingParams

    kwargs = {"dtype": job["dtype"]} if job["dtype"] != "auto" else {}
    t = time.perf_counter()
    llm = LLM(model=job["model"], max_model_len=job["prompt_len"] + job["output_len"] + 16,
              **kwargs)
    load_s = time.perf_counter() - t
    vocab = llm.llm_engine.model_config.vocab_size
    rng = np.random.default_rng(job["seed"])
    P, N = job["prompt_len"], job["output_len"]

    def timed(max_tokens: int) -> tuple[float, float]:
        """(wall s, process CPU s) of one request."""
        prompt = {"prompt_token_ids": rng.integers(100, vocab - 100, size=P).tolist()}
        sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        t0, c0 = time.perf_counter(), time.process_time()
        out = llm.generate([prompt], sp, use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == max_tokens
        return time.perf_counter() - t0, time.process_time() - c0

    timed(8)  # warm-up
    best = {"prefill_tok_s": 0.0, "decode_tok_s": 0.0, "prefill_tok_cpu_s": 0.0,
            "decode_tok_cpu_s": 0.0}
    T = job["threads"]
    for _ in range(job["repeats"]):
        (first, first_cpu), (whole, whole_cpu) = timed(1), timed(N + 1)
        for key, value in (("prefill_tok_s", P / first),
                           ("decode_tok_s", N / max(whole - first, 1e-9)),
                           ("prefill_tok_cpu_s", P * T / first_cpu),
                           ("decode_tok_cpu_s", N * T / max(whole_cpu - first_cpu, 1e-9))):
            best[key] = max(best[key], value)
    return {**best, "load_s": load_s, "model_path": llm.llm_engine.model_config.model_path}


def _run_json(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# Qwen2.5-1.5B-Instruct's shape: hidden, layers, heads, KV heads, intermediate.
QWEN25_1_5B = (1536, 28, 12, 2, 8960)


def write_random_qwen2_gguf(
    path: str, qtype: str, seed: int = 0, shape: tuple[int, ...] = QWEN25_1_5B
) -> str:
    """A random Qwen2-architecture GGUF of `shape` (every matrix `qtype`, norms and biases
    f32) with the bundled SmolLM2 tokenizer. Quantized blocks are random bytes with small
    finite scales."""
    import gguf

    from pagedllm.model_executor.loader.resolve import default_model_path

    donor = gguf.GGUFReader(default_model_path())
    hidden, layers, heads, kv_heads, inter = shape
    head_dim = hidden // heads
    vocab = len(donor.fields["tokenizer.ggml.tokens"].data)
    qt = gguf.GGMLQuantizationType[qtype]
    block, type_size = gguf.GGML_QUANT_SIZES[qt]
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, "qwen2")
    w.add_name("random-qwen2.5-1.5b")
    w.add_context_length(32768)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type({"Q4_K": 15, "Q8_0": 7}[qtype])
    for name, field in donor.fields.items():
        if name.startswith("tokenizer."):
            _copy_field(w, name, field)

    def matrix(rows: int, cols: int) -> np.ndarray:
        raw = rng.integers(0, 256, size=(rows, cols // block * type_size), dtype=np.uint8)
        blocks = raw.reshape(rows, cols // block, type_size)
        scale = 2e-3 if qtype == "Q8_0" else 2e-4  # Q4_K: times 6-bit sub-scales
        scales = (rng.random((rows, cols // block, 1)) * scale + scale / 20).astype(np.float16)
        blocks[..., :2] = scales.view(np.uint8)  # d (Q8_0, Q4_K): small, finite
        if qtype == "Q4_K":
            blocks[..., 2:4] = (scales * 0.5).view(np.uint8)  # dmin
        return raw

    def add(name: str, array: np.ndarray, quantized: bool) -> None:
        # a quantized tensor is its bytes, [rows, blocks * type_size] uint8
        w.add_tensor(name, array, raw_dtype=qt if quantized else None)

    add("token_embd.weight", matrix(vocab, hidden), True)
    add("output_norm.weight", np.ones(hidden, np.float32), False)
    shapes = {"attn_q": (heads * head_dim, hidden), "attn_k": (kv_heads * head_dim, hidden),
              "attn_v": (kv_heads * head_dim, hidden), "attn_output": (hidden, hidden),
              "ffn_gate": (inter, hidden), "ffn_up": (inter, hidden), "ffn_down": (hidden, inter)}
    for i in range(layers):
        for part, (rows, cols) in shapes.items():
            add(f"blk.{i}.{part}.weight", matrix(rows, cols), True)
        for part in ("attn_q", "attn_k", "attn_v"):
            rows = shapes[part][0]
            add(f"blk.{i}.{part}.bias", (rng.standard_normal(rows) * 0.02).astype(np.float32),
                False)
        for part in ("attn_norm", "ffn_norm"):
            add(f"blk.{i}.{part}.weight", np.ones(hidden, np.float32), False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _copy_field(w, name: str, field) -> None:
    """One key/value of a GGUFReader field into a writer (arrays of strings or numbers)."""
    import gguf

    types = field.types
    if types[0] == gguf.GGUFValueType.ARRAY:
        if types[-1] == gguf.GGUFValueType.STRING:
            value = [bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data]
        else:
            value = [field.parts[i].tolist()[0] for i in field.data]
        w.add_array(name, value)
    elif types[0] == gguf.GGUFValueType.STRING:
        w.add_string(name, bytes(field.parts[field.data[0]]).decode("utf-8"))
    else:
        w.add_key_value(name, field.parts[field.data[0]].tolist()[0], types[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a .gguf file (default: the bundled SmolLM2)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--dtype", default="auto,float32", help="comma-separated pagedllm dtypes")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--llama-cpp-python", default=None,
                    help="python interpreter with llama-cpp-python installed (the peer)")
    ap.add_argument("--random-gguf", choices=["Q4_K", "Q8_0"], default=None,
                    help="write and benchmark a random Qwen2.5-1.5B configuration")
    ap.add_argument("--random-gguf-path", default=None)
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._worker:
        print(json.dumps(_pagedllm_worker(json.loads(args._worker))))
        return
    model = args.model
    if args.random_gguf:
        model = args.random_gguf_path or f"/tmp/random-qwen2.5-1.5b-{args.random_gguf}.gguf"
        if not os.path.exists(model):
            t = time.perf_counter()
            write_random_qwen2_gguf(model, args.random_gguf, args.seed)
            print(f"wrote {model} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    job = {"model": model, "prompt_len": args.prompt_len, "output_len": args.output_len,
           "threads": args.threads, "repeats": args.repeats, "seed": args.seed}
    env_note = f"threads {args.threads}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    rows = []
    gguf_path = model
    for dtype in [d.strip() for d in args.dtype.split(",") if d.strip()]:
        res = _run_json([sys.executable, os.path.abspath(__file__),
                         "--_worker", json.dumps({**job, "dtype": dtype})])
        gguf_path = res["model_path"]
        rows.append((f"pagedllm dtype={dtype}", res))
    if args.llama_cpp_python:
        if gguf_path is None or not str(gguf_path).endswith(".gguf"):
            from pagedllm.model_executor.loader.resolve import default_model_path

            gguf_path = default_model_path()
        res = _run_json([args.llama_cpp_python, "-c", _LLAMA_CPP_WORKER,
                         json.dumps({**job, "gguf": gguf_path})])
        rows.append(("llama.cpp (llama-cpp-python)", res))
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                         cwd=os.path.dirname(os.path.abspath(__file__))).strip()
    except Exception:
        commit = "unknown"
    print(f"\nmodel {gguf_path}; prompt {args.prompt_len}, decode {args.output_len} tokens; "
          f"{env_note}; commit {commit}")
    print("tok/s: wall clock; cpu: tokens x threads per process CPU second (the same on an idle "
          "machine, steadier on a shared one)")
    print(f"{'system':34s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'prefill cpu':>12s} "
          f"{'decode cpu':>11s}")
    for name, res in rows:
        print(f"{name:34s} {res['prefill_tok_s']:14.1f} {res['decode_tok_s']:13.1f} "
              f"{res['prefill_tok_cpu_s']:12.1f} {res['decode_tok_cpu_s']:11.1f}")
    print(json.dumps({"commit": commit, "model": gguf_path, **{n: r for n, r in rows}}))


if __name__ == "__main__":
    main()
