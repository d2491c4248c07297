"""KV memory per request with and without sliding-window freeing, from the block counts the
real scheduler and KV cache manager hold while one long prompt is prefilled (in chunks of
--max-num-batched-tokens) and decoded. No forward runs: the model only decides the KV cache
groups (from its transformers config, as the engine builds them) and what a block costs.

    python benchmarks/swa_kv_memory.py --model gemma-3-4b --context 32768

Prints one JSON line per model: blocks and GiB held in the last prefill chunk, at the peak
and in the last decode step, with
groups (freeing) and with one group (--disable-hybrid-kv-cache-manager, today's layout), and
how many such requests a KV budget holds.
"""

from __future__ import annotations

import argparse
import json

from pagedllm.config import CacheConfig, SchedulerConfig
from pagedllm.core.kv_cache_groups import build_kv_cache_spec, layer_windows
from pagedllm.core.request import Request
from pagedllm.core.scheduler import Scheduler
from pagedllm.core.scheduler_output import ModelRunnerOutput
from pagedllm.sampling_params import SamplingParams

# Text-model shapes of the released Gemma 3 checkpoints (config.json of each).
GEMMA3_SHAPES = {
    "gemma-3-1b": dict(num_hidden_layers=26, num_key_value_heads=1, head_dim=256,
                       sliding_window=512),
    "gemma-3-4b": dict(num_hidden_layers=34, num_key_value_heads=4, head_dim=256,
                       sliding_window=1024),
    "gemma-3-12b": dict(num_hidden_layers=48, num_key_value_heads=8, head_dim=256,
                        sliding_window=1024),
    "gemma-3-27b": dict(num_hidden_layers=62, num_key_value_heads=16, head_dim=128,
                        sliding_window=1024),
}  # fmt: skip
_GIB = float(1 << 30)


def _hf_config(name: str):
    from transformers import Gemma3TextConfig

    shape = GEMMA3_SHAPES[name]
    return Gemma3TextConfig(**shape, sliding_window_pattern=6)


def measure(name: str, context: int, decode: int, block_size: int, chunk: int, hybrid: bool,
            dtype_bytes: int = 2) -> dict:  # fmt: skip
    """Blocks one request of `context` prompt tokens (+ `decode` outputs) holds."""
    hf = _hf_config(name)
    max_len = context + decode
    spec = build_kv_cache_spec(layer_windows(hf), max_len, hybrid)
    num_blocks = spec.max_blocks(max_len, block_size, chunk) + spec.num_reserved_blocks
    sched = Scheduler(
        SchedulerConfig(max_num_batched_tokens=chunk, max_num_seqs=1, max_model_len=max_len),
        CacheConfig(block_size=block_size), num_blocks=num_blocks, max_model_len=max_len,
        kv_cache_spec=spec,
    )  # fmt: skip
    sp = SamplingParams(max_tokens=decode, ignore_eos=True)
    sched.add_request(Request("r", [1] * context, sp, None, 0.0, block_size=block_size))
    kvm = sched.kv_cache_manager
    after_prefill = peak = decoding = 0
    while sched.has_unfinished_requests():
        so = sched.schedule()
        peak = max(peak, kvm.num_held_blocks("r"))
        req = sched.requests["r"]
        done = req.num_computed_tokens >= req.num_tokens
        if done and not after_prefill:
            after_prefill = kvm.num_held_blocks("r")
        decoding = kvm.num_held_blocks("r")
        sched.update_from_output(so, ModelRunnerOutput(["r"], [[2] if done else []]))
    assert kvm.num_free_blocks == kvm.num_usable_blocks
    layer_block = 2 * block_size * hf.num_key_value_heads * hf.head_dim * dtype_bytes
    per_block = layer_block * spec.layers_per_block
    return {
        "groups": spec.num_groups, "layers_per_block": spec.layers_per_block,
        "blocks_after_prefill": after_prefill, "blocks_peak": peak,
        "gib_after_prefill": after_prefill * per_block / _GIB,
        "gib_peak": peak * per_block / _GIB, "blocks_last_decode": decoding,
        "gib_last_decode": decoding * per_block / _GIB, "block_mib": per_block / (1 << 20),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", nargs="+", default=["gemma-3-4b", "gemma-3-12b", "gemma-3-27b"],
                    choices=sorted(GEMMA3_SHAPES))
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--kv-budget-gib", type=float, default=100.0,
                    help="KV cache memory to count concurrent requests in (bf16)")
    args = ap.parse_args()
    for name in args.model:
        row = {"model": name, "context": args.context, "decode": args.decode,
               "block_size": args.block_size, "chunk": args.max_num_batched_tokens}
        for label, hybrid in (("freeing", True), ("no_freeing", False)):
            m = measure(name, args.context, args.decode, args.block_size,
                        args.max_num_batched_tokens, hybrid)
            m["concurrent_requests"] = int(args.kv_budget_gib // m["gib_peak"])
            row[label] = m
        row["memory_ratio"] = row["freeing"]["gib_peak"] / row["no_freeing"]["gib_peak"]
        print(json.dumps(row))


if __name__ == "__main__":
    main()
