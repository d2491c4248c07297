"""`pagedllm bench serve`: datasets, arrivals and metrics offline; then a few prompts against a
live CPU server with the default model, through the `pagedllm` CLI."""

from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np
import pytest

from pagedllm.entrypoints import bench_serve as bs
from pagedllm.entrypoints.bench import _engine_extras, make_workload, resolve_model_arg
from pagedllm.entrypoints.cli import main as cli_main
from tests.entrypoints.remote_server import RemoteServer


# ---- offline ----
def test_sharegpt_shaped_follows_the_recipe():
    reqs = bs.sample_sharegpt_shaped(1000, seed=0)
    ins = np.array([r.prompt_len for r in reqs])
    outs = np.array([r.output_len for r in reqs])
    assert ins.min() >= 4 and ins.max() <= 2048 and outs.min() >= 4 and outs.max() <= 2048
    # Log-normal with means 215 / 198 (clipping and 1000 samples move the mean a little).
    assert 170 < ins.mean() < 260 and 155 < outs.mean() < 240
    # The median of a log-normal is exp(mu) = mean * e^-0.5.
    assert abs(np.median(ins) / (215 * math.exp(-0.5)) - 1) < 0.15
    assert all(len(r.prompt) == r.prompt_len for r in reqs)
    ids = np.concatenate([r.prompt for r in reqs[:50]])
    assert ids.min() >= 1000 and ids.max() < 32000
    # The recipe draws inputs first from default_rng(seed), then outputs.
    rng = np.random.default_rng(0)
    first_in = np.clip(np.rint(rng.lognormal(math.log(215) - 0.5, 1.0, 1000)), 4, 2048)
    assert ins.tolist() == first_in.astype(int).tolist()
    again = bs.sample_sharegpt_shaped(1000, seed=0)
    assert [r.prompt for r in again[:5]] == [r.prompt for r in reqs[:5]]
    assert bs.sample_sharegpt_shaped(5, seed=1)[0].prompt != reqs[0].prompt
    assert {r.output_len for r in bs.sample_sharegpt_shaped(20, output_len=7)} == {7}


def test_random_dataset_lengths():
    exact = bs.sample_random(10, input_len=32, output_len=8, seed=3)
    assert {(r.prompt_len, r.output_len, len(r.prompt)) for r in exact} == {(32, 8, 32)}
    spread = bs.sample_random(200, input_len=100, output_len=10, seed=3, range_ratio=0.5)
    lens = [r.prompt_len for r in spread]
    assert min(lens) >= 50 and max(lens) <= 150 and len(set(lens)) > 20
    with pytest.raises(ValueError):
        bs.sample_random(1, 8, 8, range_ratio=1.0)


def test_arrivals_are_poisson():
    assert bs.arrival_delays(5, float("inf"), 0) == [0.0] * 5
    gaps = np.array(bs.arrival_delays(4000, 10.0, 0))
    assert abs(gaps.mean() - 0.1) < 0.01
    assert abs(gaps.std() - 0.1) < 0.015  # exponential: std == mean
    assert bs.arrival_delays(10, 10.0, 0) == bs.arrival_delays(10, 10.0, 0)


def test_compute_metrics_by_hand():
    a = bs.RequestResult(success=True, ttft=0.1, latency=0.4, itl=[0.1, 0.1, 0.1],
                         prompt_len=10, output_len=4, expected_output_len=4)
    b = bs.RequestResult(success=True, ttft=0.3, latency=0.5, itl=[0.2],
                         prompt_len=20, output_len=2, expected_output_len=3)
    c = bs.RequestResult(success=False, error="HTTP 500", expected_output_len=4)
    m = bs.compute_metrics([a, b, c], duration_s=2.0)
    assert (m["completed"], m["failed"]) == (2, 1)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (30, 6)
    assert m["output_len_mismatches"] == 1
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["output_throughput"] == pytest.approx(3.0)
    assert m["total_token_throughput"] == pytest.approx(18.0)
    assert m["mean_ttft_ms"] == pytest.approx(200.0)
    assert m["median_ttft_ms"] == pytest.approx(200.0)
    # TPOT: (0.4 - 0.1) / 3 = 100 ms and (0.5 - 0.3) / 1 = 200 ms.
    assert m["mean_tpot_ms"] == pytest.approx(150.0)
    assert m["mean_itl_ms"] == pytest.approx(125.0)
    assert m["median_itl_ms"] == pytest.approx(100.0)
    assert m["p99_itl_ms"] == pytest.approx(np.percentile([100, 100, 100, 200], 99))
    assert m["p90_e2el_ms"] == pytest.approx(np.percentile([400, 500], 90))
    report = bs.format_report(m)
    for label in ("Successful requests:", "Failed requests:", "Median TTFT (ms):",
                  "P99 ITL (ms):", "P90 TPOT (ms):", "Output token throughput (tok/s):"):
        assert label in report
    empty = bs.compute_metrics([c], 1.0)
    assert empty["completed"] == 0 and empty["mean_ttft_ms"] == 0.0


def test_chat_prompt_text_is_words():
    text = bs.prompt_text([1000, 1001, 1002])
    assert len(text.split()) == 3 and text == bs.prompt_text([1000, 1001, 1002])
    assert bs.prompt_text("as is") == "as is"


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    r = bs.RequestResult(success=True, ttft=0.05, latency=0.2, itl=[0.03, 0.04, 0.05],
                         output_len=4)
    path = tmp_path / "p.png"
    bs.write_plot(str(path), [r, r])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- live server ----
@pytest.fixture(scope="module")
def server():
    """One torch thread: robust to a busy shared machine (see tests/e2e/test_soak.py)."""
    srv = RemoteServer(["--served-model-name", "smol", "--disable-uvicorn-access-log",
                        "--disable-log-requests"], env={"OMP_NUM_THREADS": "1"})
    yield srv
    srv.stop()


def _run(server, tmp_path, *extra: str) -> tuple[int, dict]:
    out = tmp_path / "result.json"
    rc = cli_main(["bench", "serve", "--base-url", server.url, "--result-file", str(out),
                   "--disable-tqdm", *extra])
    return rc, json.loads(out.read_text())


def test_bench_completions_live(server, tmp_path, capsys):
    n, inp, outp = 6, 24, 5
    rc, res = _run(server, tmp_path, "--dataset", "random", "--num-prompts", str(n),
                   "--random-input-len", str(inp), "--random-output-len", str(outp),
                   "--max-concurrency", "3", "--plot", str(tmp_path / "lat.png"))
    assert rc == 0
    assert "Serving Benchmark Result" in capsys.readouterr().out
    assert res["model"] == "smol" and res["endpoint"] == "/v1/completions"
    assert (res["completed"], res["failed"], res["num_prompts"]) == (n, 0, n)
    # Token-id prompts are counted exactly by the server's usage.
    assert res["total_input_tokens"] == n * inp
    assert res["total_output_tokens"] == n * outp and res["output_len_mismatches"] == 0
    assert res["request_throughput"] == pytest.approx(n / res["duration_s"])
    for key in ("ttft", "tpot", "itl", "e2el"):
        vals = [res[f"{s}_{key}_ms"] for s in ("mean", "median", "p90", "p99")]
        assert all(v > 0 for v in vals), (key, vals)
        assert res[f"median_{key}_ms"] <= res[f"p99_{key}_ms"]
    assert res["median_ttft_ms"] < res["median_e2el_ms"]
    assert all(1 <= len(gaps) <= outp - 1 for gaps in res["itls"])
    assert res["errors"] == [""] * n and res["request_rate"] == "inf"
    assert (tmp_path / "lat.png").stat().st_size > 1000


def test_bench_chat_with_rate_live(server, tmp_path):
    rc, res = _run(server, tmp_path, "--endpoint", "/v1/chat/completions", "--dataset",
                   "sharegpt-shaped", "--sharegpt-output-len", "4", "--num-prompts", "3",
                   "--request-rate", "20", "--seed", "1")
    assert rc == 0
    assert (res["completed"], res["failed"]) == (3, 0)
    assert res["total_output_tokens"] == 12 and res["request_rate"] == 20.0
    # Chat prompts are words plus the chat template: the server counts them.
    assert res["total_input_tokens"] > 0
    assert res["mean_ttft_ms"] > 0


def test_bench_counts_failures(server, tmp_path):
    rc, res = _run(server, tmp_path, "--model", "no-such-model", "--skip-test-request",
                   "--dataset", "random", "--num-prompts", "2", "--random-input-len", "8",
                   "--random-output-len", "2")
    assert rc == 1
    assert (res["completed"], res["failed"]) == (0, 2)
    assert all(e.startswith("HTTP 404") for e in res["errors"])
    # Without --skip-test-request the probe fails fast and nothing is written.
    assert cli_main(["bench", "serve", "--base-url", server.url, "--model", "nope",
                     "--num-prompts", "2", "--disable-tqdm"]) == 1



def test_throughput_workloads_and_config_only_random_models(tmp_path):
    wl = make_workload("batch-16", vocab_size=1000)
    assert len(wl.prompts) == 16 and {len(p) for p in wl.prompts} == {512}
    assert set(wl.output_lens) == {256}
    d = resolve_model_arg("random:llama-3.1-70b", "bfloat16", cache_dir=str(tmp_path),
                          load_format="dummy")
    cfg = json.loads((tmp_path / "llama-3.1-70b-bfloat16-config" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 80 and cfg["hidden_size"] == 8192
    assert os.listdir(d) == ["config.json"]
    d = resolve_model_arg("random:llama-3.1-70b:gptq", "auto", cache_dir=str(tmp_path),
                          load_format="dummy")
    cfg = json.loads(open(os.path.join(d, "config.json")).read())
    assert os.listdir(d) == ["config.json"] and cfg["quantization_config"]["bits"] == 4
    ns = argparse.Namespace(quantization="fp8", kv_cache_dtype="auto", load_format="dummy",
                            tensor_parallel_size=2, pipeline_parallel_size=1)
    assert _engine_extras(ns) == {"quantization": "fp8", "load_format": "dummy",
                                  "tensor_parallel_size": 2}


def test_random_int4_checkpoints_have_the_published_layouts(tmp_path):
    from safetensors import safe_open

    from pagedllm.entrypoints.bench import RANDOM_MODELS, TINY_LLAMA

    assert RANDOM_MODELS["tiny"] is TINY_LLAMA
    for method in ("gptq", "awq"):
        d = resolve_model_arg(f"random:tiny:{method}", "auto", cache_dir=str(tmp_path))
        cfg = json.loads(open(os.path.join(d, "config.json")).read())
        assert cfg["quantization_config"]["quant_method"] == method
        with safe_open(os.path.join(d, "model.safetensors"), "pt") as f:
            qw = f.get_tensor("model.layers.0.mlp.down_proj.qweight")
            scales = f.get_tensor("model.layers.0.mlp.down_proj.scales")
        h, inter = TINY_LLAMA["hidden_size"], TINY_LLAMA["intermediate_size"]
        expected = (inter // 8, h) if method == "gptq" else (inter, h // 8)
        assert tuple(qw.shape) == expected and qw.dtype.is_signed
        assert tuple(scales.shape) == (inter // 128, h)
