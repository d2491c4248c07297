"""Serving latency on the GPU (issue #7): a random Llama-3.1-8B behind `pagedllm serve`,
measured with `pagedllm bench serve` at several request rates. Run on the device machine:

    python3 benchmarks/gpu_serve.py --rates 10,20,40,inf --num-prompts 1000 --out results/

The random model has no tokenizer, so a synthetic word-level tokenizer covering its whole
vocabulary ("t0" .. "tN") is written beside it; requests send token-id prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def write_synthetic_tokenizer(model_dir: str, vocab_size: int, eos_id: int) -> None:
    """A word-level tokenizer with one token per id, so every sampled id detokenizes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    if os.path.exists(os.path.join(model_dir, "tokenizer.json")):
        return
    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.save(os.path.join(model_dir, "tokenizer.json"))
    with open(os.path.join(model_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": f"t{eos_id}",
                   "model_max_length": 131072}, f)


def wait_ready(url: str, timeout: float, server: subprocess.Popen) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"server exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(1)
    raise SystemExit("server did not become ready")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", default="10,20,40,inf")
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--out", default="serve_results")
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--max-num-seqs", type=int, default=None, help="default: the server's")
    ap.add_argument("--seed", type=int, default=0, help="workload seed of the first rate (+1 each)")
    ap.add_argument("--server-args", default="", help="extra `pagedllm serve` flags")
    ap.add_argument("--load-format", default="auto",
                    help="dummy: random weights made on the GPU, no checkpoint written")
    args = ap.parse_args()
    from pagedllm.entrypoints.bench import resolve_model_arg

    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    model_dir = resolve_model_arg("random:llama-3.1-8b", "bfloat16", load_format=args.load_format)
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    eos = cfg.get("eos_token_id", 128001)
    write_synthetic_tokenizer(model_dir, cfg["vocab_size"], eos[0] if isinstance(eos, list) else eos)
    print(f"model ready in {time.time() - t0:.1f} s", flush=True)
    url = f"http://127.0.0.1:{args.port}"
    log = open(os.path.join(args.out, "server.log"), "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", model_dir, "--port",
         str(args.port), "--served-model-name", "llama-3.1-8b-random", "--max-model-len", "4096",
         *(["--max-num-seqs", str(args.max_num_seqs)] if args.max_num_seqs else []),
         "--disable-log-requests",
         "--disable-uvicorn-access-log", "--load-format", args.load_format,
         *args.server_args.split()],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
    )
    rows = []
    try:
        t1 = time.time()
        wait_ready(url, 300, server)
        print(f"server ready in {time.time() - t1:.1f} s", flush=True)
        for i, rate in enumerate(args.rates.split(",")):
            result = os.path.join(args.out, f"rate_{rate}.json")
            # A new seed per rate: random token-id prompts never hit the prefix cache that
            # the previous rate's run left behind, so every rate starts cold.
            cmd = [sys.executable, "-m", "pagedllm.entrypoints.cli", "bench", "serve",
                   "--base-url", url, "--model", "llama-3.1-8b-random", "--dataset",
                   "sharegpt-shaped", "--num-prompts", str(args.num_prompts), "--request-rate",
                   rate, "--seed", str(args.seed + i), "--result-file", result, "--disable-tqdm"]
            subprocess.run(cmd, cwd=ROOT, check=False)
            if os.path.exists(result):
                with open(result) as f:
                    rows.append((rate, json.load(f)))
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    print("| rate | req/s | out tok/s | median TTFT ms | p99 TTFT ms | median TPOT ms | "
          "p99 TPOT ms | median ITL ms | failed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for rate, r in rows:
        def g(*keys, r=r):
            for k in keys:
                if k in r:
                    return r[k]
            return float("nan")
        print(f"| {rate} | {g('request_throughput'):.2f} | {g('output_throughput'):.0f} | "
              f"{g('median_ttft_ms'):.1f} | {g('p99_ttft_ms'):.1f} | {g('median_tpot_ms'):.2f} | "
              f"{g('p99_tpot_ms'):.2f} | {g('median_itl_ms'):.2f} | {g('failed', 'num_failed')} |",
              flush=True)


if __name__ == "__main__":
    main()
