"""`pagedllm bench throughput`: offline throughput on the BENCHMARKS.md workloads.

Workloads are seeded token-id prompts (`make_workload`); the model is either a path or
`random:llama-3.1-8b` / `random:tiny`, a Llama of that configuration with seeded random weights
built directly on the device and saved as safetensors (`build_random_llama`), then loaded
through the normal loader. Optionally HF transformers `generate` runs on the first N requests
in static batches (the naive-serving peer), and pagedllm on the same N for the ratio.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np

# Llama-3.1-8B's configuration (hidden 4096, 32 layers, GQA 32/8, llama3 rope scaling).
LLAMA_3_1_8B: dict = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "rope_type": "llama3",
    },
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
}

TINY_LLAMA: dict = {
    **LLAMA_3_1_8B, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 1000,
    "max_position_embeddings": 8192, "bos_token_id": 1, "eos_token_id": 2,
    "torch_dtype": "float32",
}  # fmt: skip

# Llama-3.1-70B's configuration: run it with --load-format dummy (weights made on the GPUs).
LLAMA_3_1_70B: dict = {
    **LLAMA_3_1_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
    "num_attention_heads": 64, "num_key_value_heads": 8,
}  # fmt: skip

# SmolLM2-135M's shapes (the default model's): CPU figures of parallel layouts.
SMOLLM2_135M: dict = {
    **LLAMA_3_1_8B, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
    "max_position_embeddings": 8192, "rope_theta": 100000.0, "rope_scaling": None,
    "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
}  # fmt: skip

# Other families' configurations, for --load-format dummy only (build_random_llama writes
# Llama-shaped tensors): Mixtral-8x7B (about 13B active of 47B parameters) and Gemma-2-9B.
MIXTRAL_8X7B: dict = {
    **LLAMA_3_1_8B, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
    "vocab_size": 32000, "max_position_embeddings": 32768, "rope_theta": 1e6,
    "rope_scaling": None, "num_local_experts": 8, "num_experts_per_tok": 2,
    "sliding_window": None, "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip
GEMMA_2_9B: dict = {
    "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_size": 3584,
    "intermediate_size": 14336, "num_hidden_layers": 42, "num_attention_heads": 16,
    "num_key_value_heads": 8, "head_dim": 256, "vocab_size": 256000,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256,
    "sliding_window": 4096, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
    "tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
    "torch_dtype": "bfloat16",
}  # fmt: skip

RANDOM_MODELS = {"llama-3.1-8b": LLAMA_3_1_8B, "llama-3.1-70b": LLAMA_3_1_70B, "tiny": TINY_LLAMA,
                 "smollm2-135m": SMOLLM2_135M, "mixtral-8x7b": MIXTRAL_8X7B,
                 "gemma-2-9b": GEMMA_2_9B}
DUMMY_ONLY = frozenset({"mixtral-8x7b", "gemma-2-9b"})

WORKLOADS = ("sharegpt-shaped", "prefill-heavy", "decode-heavy", "single-stream", "batch-16")

# Ceilings measured on the H200 (docs/BENCHMARKS.md): copy bandwidth and dense bf16 matmul.
H200_BANDWIDTH = 4.2e12
H200_BF16_FLOPS = 785e12


def _param_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (v, h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })  # fmt: skip
    return shapes


def build_random_llama(
    out_dir: str,
    config: dict,
    dtype: str = "bfloat16",
    seed: int = 0,
    std: float = 0.02,
    device: str | None = None,
) -> str:
    """Writes config.json + model.safetensors of a seeded random Llama; returns out_dir.

    Tensors are drawn on `device` (the GPU when present: seconds for 8B) with one seeded
    generator; norm weights are 1. Skips the work when the directory already holds the model.
    """
    import torch
    from safetensors.torch import save_file

    path = os.path.join(out_dir, "model.safetensors")
    if os.path.exists(path) and os.path.exists(os.path.join(out_dir, "config.json")):
        return out_dir
    os.makedirs(out_dir, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tdtype = getattr(torch, dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    tensors = {}
    for name, shape in _param_shapes(config).items():
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=tdtype, device=device)
        else:
            t = torch.randn(shape, generator=gen, dtype=torch.float32, device=device)
            t = t.mul_(std).to(tdtype)
        tensors[name] = t.cpu()
    save_file(tensors, path, metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump({**config, "torch_dtype": dtype}, f, indent=1)
    return out_dir


def resolve_model_arg(
    model: str, dtype: str, cache_dir: str = "/tmp/pagedllm_models", load_format: str = "auto"
) -> str:
    """`random:NAME` -> a built random model directory (only its config.json under
    `--load-format dummy`); anything else is returned as is."""
    if not model.startswith("random:"):
        return model
    # random:NAME, or random:NAME:gptq / :awq for a random int4 checkpoint of that config.
    name, _, method = model.split(":", 1)[1].partition(":")
    if name not in RANDOM_MODELS:
        raise SystemExit(f"unknown random model {name!r}; known: {sorted(RANDOM_MODELS)}")
    from pagedllm.entrypoints.bench_quant import build_random_int4_llama, quant_config_for

    weights = load_format != "dummy"
    if weights and name in DUMMY_ONLY:
        raise SystemExit(f"random:{name} needs --load-format dummy (no writer for its tensors)")
    if method and weights:
        return build_random_int4_llama(os.path.join(cache_dir, f"{name}-{method}"),
                                       RANDOM_MODELS[name], method)
    d = dtype if dtype != "auto" else RANDOM_MODELS[name]["torch_dtype"]
    if not weights:
        # The dummy loader makes the weights; an int4 method still needs its quantization_config.
        config = {**RANDOM_MODELS[name], "torch_dtype": "float16" if method else d}
        if method:
            config["quantization_config"] = quant_config_for(method)
        out_dir = os.path.join(cache_dir, f"{name}-{method or d}-config")
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
        return out_dir
    return build_random_llama(os.path.join(cache_dir, f"{name}-{d}"), RANDOM_MODELS[name], d)


@dataclass(slots=True)
class Workload:
    name: str
    prompts: list[list[int]]
    output_lens: list[int]


def make_workload(name: str, vocab_size: int, num_requests: int | None = None) -> Workload:
    """The BENCHMARKS.md workloads: seeded lengths, then seeded random token ids."""
    rng = np.random.default_rng(0)
    if name == "sharegpt-shaped":
        n = 1000
        ins = rng.lognormal(math.log(215) - 0.5, 1.0, n)
        outs = rng.lognormal(math.log(198) - 0.5, 1.0, n)
        in_lens = np.clip(np.rint(ins), 4, 2048).astype(int)
        out_lens = np.clip(np.rint(outs), 4, 2048).astype(int)
    elif name == "prefill-heavy":
        in_lens, out_lens = np.full(1000, 1024), np.full(1000, 128)
    elif name == "decode-heavy":
        in_lens, out_lens = np.full(1000, 128), np.full(1000, 1024)
    elif name == "single-stream":
        in_lens, out_lens = np.full(1, 512), np.full(1, 256)
    elif name == "batch-16":  # small-batch decode: 16 streams of 512 in / 256 out at once
        in_lens, out_lens = np.full(16, 512), np.full(16, 256)
    else:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(WORKLOADS)}")
    prompts = [rng.integers(0, vocab_size, int(n)).tolist() for n in in_lens]
    n = num_requests or len(prompts)
    return Workload(name, prompts[:n], [int(x) for x in out_lens[:n]])


class StageTimer:
    """Wall time per engine stage (host), and GPU time of the model forward (CUDA events).

    Wraps bound methods of one engine in place; `report()` reads the events (one sync at the
    end, none per step).
    """

    def __init__(self, llm) -> None:
        import torch

        self.wall: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.events: list[tuple[object, object, bool, int, int]] = []
        self._restore: list[tuple[object, str, bool, object]] = []
        engine = llm.llm_engine
        core = engine.engine_core
        runner = core.executor.worker.model_runner
        for obj, name in ((core.scheduler, "schedule"), (core.executor, "execute_model"),
                          (core.executor, "submit"),
                          (core.scheduler, "update_from_output"),
                          (engine.output_processor, "process_outputs")):  # fmt: skip
            self._wrap_wall(obj, name)
        orig = runner._run_model
        cuda = runner.device.type == "cuda"

        def run_model(step, graph_size):
            if not cuda:
                return orig(step, graph_size)
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            out = orig(step, graph_size)
            e1.record()
            self.events.append((e0, e1, graph_size is not None, step.num_tokens, step.num_reqs))
            return out

        self._restore.append((runner, "_run_model", "_run_model" in vars(runner), orig))
        runner._run_model = run_model

    def _wrap_wall(self, obj, name: str) -> None:
        orig = getattr(obj, name)
        self._restore.append((obj, name, name in vars(obj), orig))

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - t0
                self.calls[name] = self.calls.get(name, 0) + 1

        setattr(obj, name, timed)

    def report(self) -> dict:
        """Unwraps the engine and returns the totals."""
        import torch

        for obj, name, had, orig in reversed(self._restore):
            if had:
                setattr(obj, name, orig)
            else:
                delattr(obj, name)
        if self.events:
            torch.cuda.synchronize()
        graph = [e0.elapsed_time(e1) / 1e3 for e0, e1, g, *_ in self.events if g]
        eager = [e0.elapsed_time(e1) / 1e3 for e0, e1, g, *_ in self.events if not g]
        first = self.events[0][0] if self.events else None
        # Per step: GPU start (ms from the first step), GPU ms, graph?, tokens, requests.
        timeline = [
            (round(first.elapsed_time(e0), 3), round(e0.elapsed_time(e1), 3), int(g), n, r)
            for e0, e1, g, n, r in self.events
        ]
        return {
            "host_wall_s": self.wall, "calls": self.calls,
            "forward_gpu_s_graph": sum(graph), "steps_graph": len(graph),
            "forward_gpu_s_eager": sum(eager), "steps_eager": len(eager),
            "tokens_eager": sum(e[3] for e in self.events if not e[2]),
            "timeline": timeline,
        }  # fmt: skip


def summarize_timeline(timeline: list[tuple[float, float, int, int, int]]) -> dict:
    """GPU time per kind of step (eager; graph steps by batch size) and idle gaps between steps."""
    buckets = [(1, 32), (33, 128), (129, 256), (257, 1 << 30)]
    out: dict[str, dict] = {}

    def add(key: str, ms: float, tokens: int) -> None:
        b = out.setdefault(key, {"steps": 0, "gpu_s": 0.0, "tokens": 0})
        b["steps"] += 1
        b["gpu_s"] += ms / 1e3
        b["tokens"] += tokens

    for _, ms, graph, tokens, reqs in timeline:
        if not graph:
            add("eager", ms, tokens)
            continue
        lo, hi = next(b for b in buckets if b[0] <= reqs <= b[1])
        add(f"graph batch {lo}-{hi if hi < 1 << 30 else 'max'}", ms, tokens)
    idle = sum(
        max(0.0, nxt[0] - (cur[0] + cur[1])) for cur, nxt in zip(timeline, timeline[1:])
    )  # fmt: skip
    out["gpu_idle_between_steps_s"] = idle / 1e3
    return out


def run_pagedllm(llm, wl: Workload) -> dict:
    """Submits every request at once (greedy, ignore_eos); returns timing and token counts."""
    from pagedllm import SamplingParams

    params = [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for o in wl.output_lens]
    prompts = [{"prompt_token_ids": p} for p in wl.prompts]
    # Earlier runs must not turn this one's prompts into prefix-cache hits.
    llm.llm_engine.engine_core.reset_prefix_cache()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return _rates(wl, elapsed, out_tokens)


def _rates(wl: Workload, elapsed: float, out_tokens: int) -> dict:
    in_tokens = sum(len(p) for p in wl.prompts)
    return {
        "requests": len(wl.prompts), "seconds": elapsed, "output_tokens": out_tokens,
        "req_per_s": len(wl.prompts) / elapsed, "output_tok_per_s": out_tokens / elapsed,
        "total_tok_per_s": (in_tokens + out_tokens) / elapsed,
    }  # fmt: skip


def run_hf(model_dir: str, wl: Workload, batch_size: int, dtype: str = "bfloat16") -> dict:
    """HF `generate` in static batches (left-padded); a batch runs to its longest output."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model = model.to("cuda").eval()
    total_out = 0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for s in range(0, len(wl.prompts), batch_size):
        batch = wl.prompts[s : s + batch_size]
        outs = wl.output_lens[s : s + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.int64)
        mask = torch.zeros(len(batch), width, dtype=torch.int64)
        for i, p in enumerate(batch):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        with torch.inference_mode():
            model.generate(
                input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=max(outs),
                min_new_tokens=max(outs), do_sample=False, eos_token_id=None, pad_token_id=0,
            )  # fmt: skip
        total_out += sum(outs)  # useful tokens: what each request asked for
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    del model
    torch.cuda.empty_cache()
    return _rates(wl, elapsed, total_out)


def roofline(
    wl: Workload, cfg: dict, max_num_seqs: int, elem_bytes: int = 2, num_gpus: int = 1
) -> dict:
    """Lower bounds on the workload's time: matmul FLOPs at the measured bf16 rate, and bytes
    (weights once per decode step at full batch, plus every KV read) at the copy bandwidth,
    both spread over `num_gpus` (tensor parallelism; communication not counted)."""
    h, inter, v, layers = (cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"],
                           cfg["num_hidden_layers"])  # fmt: skip
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    batch = min(max_num_seqs, len(wl.prompts))
    # A mixture of experts computes top_k experts per token and reads the experts a step's
    # batch routes to (at most all of them).
    experts, top_k = cfg.get("num_local_experts", 1), cfg.get("num_experts_per_tok", 1)
    attn = layers * (h * (q + 2 * kv) + q * h) + 2 * v * h
    params = attn + layers * 3 * h * inter * top_k  # computed per token
    params_read = attn + layers * 3 * h * inter * min(experts, top_k * batch)
    ins = np.array([len(p) for p in wl.prompts], dtype=np.float64)
    outs = np.array(wl.output_lens, dtype=np.float64)
    flops = 2.0 * params * float(ins.sum() + outs.sum())
    kv_per_token = 2 * layers * kv * elem_bytes
    kv_reads = float((outs * ins + outs * (outs - 1) / 2).sum()) * kv_per_token
    steps = math.ceil(outs.sum() / batch)
    t_bytes = (steps * params_read * elem_bytes + kv_reads) / (H200_BANDWIDTH * num_gpus)
    t_flops = flops / (H200_BF16_FLOPS * num_gpus)
    t = max(t_bytes, t_flops)
    return {
        "params": params, "t_flops_s": t_flops, "t_bytes_s": t_bytes, "t_floor_s": t,
        "output_tok_per_s_bound": outs.sum() / t, "req_per_s_bound": len(wl.prompts) / t,
    }  # fmt: skip


def add_throughput_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", choices=WORKLOADS, default="sharegpt-shaped")
    p.add_argument("--model", default="random:llama-3.1-8b",
                   help="model path, or random:llama-3.1-8b / random:tiny (built on the device)")
    p.add_argument("--num-prompts", type=int, default=None, help="first N requests only")
    p.add_argument("--output-len", type=int, default=None,
                   help="every request's output length (default: the dataset's)")
    p.add_argument("--hf-compare", type=int, default=0,
                   help="also run HF generate and pagedllm on the first N requests (0 = off)")
    p.add_argument("--hf-batch-size", type=int, default=32)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="default: the engine's (1024 on GPUs with 70+ GiB, else 256)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--quantization", "-q", default=None,
                   help="fp8 / awq / gptq / bitsandbytes / compressed-tensors (vLLM's names)")
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--load-format", default="auto",
                   choices=["auto", "safetensors", "gguf", "dummy"],
                   help="dummy: random weights made in place (random:NAME then writes no file)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    p.add_argument("--pp-batch-queue", action=argparse.BooleanOptionalAction, default=None,
                   help="pipeline micro-batches in flight (sets PAGEDLLM_PP_BATCH_QUEUE)")
    p.add_argument("--distributed-executor-backend", choices=("uni", "mp", "ray"), default=None)
    p.add_argument("--output-json", default=None)
    p.add_argument("--profile-stages", action="store_true",
                   help="report host time per engine stage and GPU time of the forward")
    p.add_argument("--llm", default=None, help=argparse.SUPPRESS)  # reuse an engine (scripts)


def _engine_extras(args: argparse.Namespace) -> dict:
    """Engine options only passed when set, so older call sites keep the defaults."""
    extras = {}
    for name, default in (("quantization", None), ("kv_cache_dtype", "auto"),
                          ("load_format", "auto"), ("tensor_parallel_size", 1),
                          ("pipeline_parallel_size", 1), ("distributed_executor_backend", None)):
        value = getattr(args, name, default)
        if value != default:
            extras[name] = value
    return extras


def make_llm(args: argparse.Namespace, model_dir: str):
    from pagedllm import LLM

    if getattr(args, "pp_batch_queue", None) is not None:
        os.environ["PAGEDLLM_PP_BATCH_QUEUE"] = "1" if args.pp_batch_queue else "0"
    t0 = time.perf_counter()
    llm = LLM(
        model=model_dir, dtype=args.dtype, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
        async_scheduling=getattr(args, "async_scheduling", None), device=args.device, skip_tokenizer_init=True, seed=0,
        **_engine_extras(args),
    )  # fmt: skip
    startup = time.perf_counter() - t0
    executor = llm.llm_engine.engine_core.executor
    timings = dict(executor.collective_rpc("timings")[0])  # rank 0's start-up stages
    timings.update(getattr(llm.llm_engine, "startup_timings", {}))
    timings["startup_total"] = startup
    timings["startup_excl_weights"] = startup - timings.get("load_model", 0.0)
    return llm, timings, executor.collective_rpc("memory_profile")[0]


def run_throughput(args: argparse.Namespace) -> dict:
    model_dir = resolve_model_arg(args.model, args.dtype,
                                  load_format=getattr(args, "load_format", "auto"))
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    wl = make_workload(args.dataset, cfg["vocab_size"], args.num_prompts)
    if getattr(args, "output_len", None):
        wl = Workload(wl.name, wl.prompts, [args.output_len] * len(wl.prompts))
    llm, timings, memory = args.llm or make_llm(args, model_dir)
    rng = np.random.default_rng(12345)  # warm-up prompts unrelated to the workload's
    warm = [rng.integers(0, cfg["vocab_size"], n).tolist() for n in (300, 40)]
    run_pagedllm(llm, Workload("warm-up", warm, [8, 8]))
    result: dict = {"dataset": wl.name, "startup": timings, "memory": memory}
    profile = getattr(args, "profile_stages", False)
    if profile and llm.llm_engine.config.parallel_config.world_size > 1:
        raise SystemExit("--profile-stages instruments one in-process worker; use -tp 1 -pp 1")
    timer = StageTimer(llm) if profile else None
    core = llm.llm_engine.engine_core
    overlapped = core.num_overlapped_steps
    result["pagedllm"] = run_pagedllm(llm, wl)
    result["pp_batch_queue"] = {"max_concurrent_batches": core.max_concurrent_batches,
                                "peak_in_flight": core.peak_batches_in_flight,
                                "overlapped_steps": core.num_overlapped_steps - overlapped}
    if timer is not None:
        result["stages"] = timer.report()
        result["stages"]["by_step_kind"] = summarize_timeline(result["stages"]["timeline"])
    max_num_seqs = llm.llm_engine.config.scheduler_config.max_num_seqs
    result["roofline"] = roofline(wl, cfg, max_num_seqs,
                                  num_gpus=llm.llm_engine.config.parallel_config.world_size)
    rl = result["roofline"]
    result["pagedllm"]["roofline_fraction"] = rl["t_floor_s"] / result["pagedllm"]["seconds"]
    if args.hf_compare:
        n = args.hf_compare
        sub = Workload(wl.name, wl.prompts[:n], wl.output_lens[:n])
        result["pagedllm_first_n"] = run_pagedllm(llm, sub)
        hf_dtype = cfg.get("torch_dtype", "bfloat16") if args.dtype == "auto" else args.dtype
        result["hf_first_n"] = run_hf(model_dir, sub, args.hf_batch_size, hf_dtype)
        result["ratio_vs_hf"] = (
            result["hf_first_n"]["seconds"] / result["pagedllm_first_n"]["seconds"]
        )
    return result


def _cmd_throughput(args: argparse.Namespace) -> int:
    result = run_throughput(args)
    timeline = result.get("stages", {}).pop("timeline", None)
    print(json.dumps(result, indent=1, default=float))
    if args.output_json:
        if timeline is not None:  # per-step detail: the file only
            result["stages"]["timeline"] = timeline
        with open(args.output_json, "w") as f:
            f.write(json.dumps(result, indent=1, default=float))
    return 0


def register_subcommand(subparsers) -> None:
    """Adds `bench` with its `throughput` subcommand to the `pagedllm` parser."""
    bench = subparsers.add_parser("bench", help="benchmarks (throughput)")
    sub = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    tp = sub.add_parser("throughput", help="offline throughput on a BENCHMARKS.md workload")
    add_throughput_args(tp)
    tp.set_defaults(func=_cmd_throughput)
    from pagedllm.entrypoints.bench_serve import register_subcommand as register_serve

    register_serve(sub)  # `pagedllm bench serve` (issue #7)
