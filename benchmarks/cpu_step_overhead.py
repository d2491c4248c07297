"""CPU ms per one-stream decode step outside the matmuls: every `UnquantizedLinearMethod.apply`
and the LM head return zeros, the rest of the step (norms, RoPE, KV write, attention, module
calls, input preparation, sampling, scheduling) runs as served. Process CPU time, best of 3.

    OMP_NUM_THREADS=1 python benchmarks/cpu_step_overhead.py [--prompt-len 128] [--output-len 128]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import pagedllm.model_executor.layers.linear as linear
    import pagedllm.model_executor.models.llama as llama
    from pagedllm import LLM, SamplingParams

    linear.UnquantizedLinearMethod.apply = (
        lambda self, layer, x, bias=None: x.new_zeros(x.shape[0], layer.weight.shape[0]))
    llama.compute_logits = lambda head, h: torch.zeros(h.shape[0], head.org_vocab_size)
    llm = LLM(model=None, dtype="float32", enable_prefix_caching=False)
    rng = np.random.default_rng(0)

    def run(n: int) -> float:
        prompt = {"prompt_token_ids": rng.integers(100, 40000, size=args.prompt_len).tolist()}
        sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        c = time.process_time()
        llm.generate([prompt], sp, use_tqdm=False)
        return time.process_time() - c

    run(4)
    n = args.output_len
    best = min((run(n + 1) - run(1)) / n * 1000 for _ in range(3))
    print(f"prompt {args.prompt_len}: {best:.2f} CPU ms per decode step outside the matmuls")


if __name__ == "__main__":
    main()
