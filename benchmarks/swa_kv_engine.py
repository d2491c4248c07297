"""KV memory of one 32k-token Gemma 3 request through the real engine (GPU), with and without
sliding-window freeing.

Gemma 3 4B text shapes with dummy weights; one request of --context prompt tokens and --decode
greedy tokens; the KV blocks held are read from the block pool after every `LLMEngine.step()`:
after the prefill, at the peak and in the last decode step, with the KV cache groups (the
default) and with --disable-hybrid-kv-cache-manager, each mode in its own process. Prints one
JSON line per mode (GiB, how many such requests the KV budget holds at the peak, first tokens).

    python benchmarks/swa_kv_engine.py [--context 32768] [--decode 32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_GIB = float(1 << 30)
MODEL_DIR = "/tmp/pagedllm_models/gemma-3-4b-text-dummy"


def _save_config() -> object:
    from transformers import Gemma3TextConfig

    cfg = Gemma3TextConfig(
        hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, sliding_window=1024, sliding_window_pattern=6,
        vocab_size=262144, max_position_embeddings=131072, query_pre_attn_scalar=256,
        architectures=["Gemma3ForCausalLM"],
    )  # fmt: skip
    cfg.save_pretrained(MODEL_DIR)
    return cfg


def measure(hybrid: bool, context: int, decode: int) -> dict:
    import torch

    from pagedllm import LLM, SamplingParams

    cfg = _save_config()
    prompt = torch.randint(10, 200000, (context,), generator=torch.Generator().manual_seed(0))
    t0 = time.time()
    llm = LLM(MODEL_DIR, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=context + decode + 16, gpu_memory_utilization=0.85,
              disable_hybrid_kv_cache_manager=not hybrid)  # fmt: skip
    engine = llm.llm_engine
    scheduler = engine.engine_core.scheduler
    kvm = scheduler.kv_cache_manager
    per_block = (2 * kvm.block_size * cfg.num_key_value_heads * cfg.head_dim * 2
                 * kvm.spec.layers_per_block)  # fmt: skip
    engine.add_request("r", {"prompt_token_ids": prompt.tolist()},
                       SamplingParams(temperature=0, max_tokens=decode, ignore_eos=True))
    peak = after_prefill = last = 0
    tokens: list[int] = []
    t1 = time.time()
    while engine.has_unfinished_requests():
        outs = engine.step()
        held = kvm.num_usable_blocks - kvm.block_pool.num_free_blocks
        peak = max(peak, held)
        req = scheduler.requests.get("r")
        if req is not None:
            last = held
            if req.num_computed_tokens >= context and not after_prefill:
                after_prefill = held
        tokens += [t for o in outs if o.finished for t in o.outputs[0].token_ids]
    return {
        "mode": "groups" if hybrid else "one_group", "num_groups": kvm.spec.num_groups,
        "layers_per_block": kvm.spec.layers_per_block,
        "gib_after_prefill": after_prefill * per_block / _GIB, "gib_peak": peak * per_block / _GIB,
        "gib_last_decode": last * per_block / _GIB,
        "requests_at_peak": kvm.num_usable_blocks / max(peak, 1),
        "startup_s": round(t1 - t0, 1), "run_s": round(time.time() - t1, 1),
        "first_tokens": tokens[:8],
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--mode", choices=["groups", "one_group"], default=None,
                    help=argparse.SUPPRESS)  # one mode, in this process
    args = ap.parse_args()
    if args.mode is not None:
        print(json.dumps(measure(args.mode == "groups", args.context, args.decode)), flush=True)
        return
    for mode in ("groups", "one_group"):
        proc = subprocess.run(
            [sys.executable, __file__, "--mode", mode, "--context", str(args.context),
             "--decode", str(args.decode)],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        print(lines[-1] if lines else proc.stderr[-3000:], flush=True)


if __name__ == "__main__":
    main()
