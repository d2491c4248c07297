"""The default model with its GGUF weights packed (the CPU default) against the dequantized
float32 path: greedy-equal (both are float32; only rounding differs); the switches that
dequantize; the fallback when the kernels cannot build."""

from __future__ import annotations

import logging

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.model_executor.layers.quantization import gguf_kernels
from pagedllm.model_executor.loader.resolve import default_model_path
from tests.model_executor.conftest import load_ours, prefill_logits

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n   ",
    "Here are three tips for staying healthy:",
]
NEW_TOKENS = 20
# Largest float32 logit gap (top token minus the packed path's token) tolerated where the
# two paths first pick different tokens: the float kernels differ from the dequantized
# float32 path by rounding only (~1e-4 on the logits; int8 activations moved them by ~0.1).
NEAR_TIE = 0.01


@pytest.fixture(scope="module")
def packed_llm() -> LLM:
    llm = LLM(model=default_model_path(), kv_cache_space=0.2)  # dtype auto: packed by default
    assert llm.llm_engine.model_config.quantization == "gguf"
    return llm


def test_default_model_greedy_equals_float32(packed_llm: LLM) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = packed_llm.generate(PROMPTS, params)
    reference = load_ours(default_model_path())  # dtype float32: dequantized, unchanged
    matched = []
    for out in outs:
        prompt_ids = list(out.prompt_token_ids)
        got = list(out.outputs[0].token_ids)
        assert len(got) == NEW_TOKENS
        ids = torch.tensor(prompt_ids + got, dtype=torch.int64)
        logits = prefill_logits(reference, ids)  # [tokens, vocab] float32
        same = NEW_TOKENS
        for i, token in enumerate(got):
            row = logits[len(prompt_ids) + i - 1]
            if int(row.argmax()) != token:
                gap = float(row.max() - row[token])
                assert gap < NEAR_TIE, (out.prompt, i, gap)
                same = i
                break  # after a divergence the continuations differ legitimately
        matched.append(same)
    print("greedy tokens equal to float32 before the first (near-tie) divergence:", matched)
    assert sum(matched) >= NEW_TOKENS, matched


def test_packed_path_is_batch_invariant(packed_llm: LLM) -> None:
    """The same request alone, again from the prefix cache (its prefill shrinks to a few
    rows) and in a batch of mixed lengths: the same greedy tokens (the first wave's
    guarantee, which the int8-activation kernel broke: it turned last-bit differences of x
    into quantization steps of y)."""
    rng = torch.Generator().manual_seed(4)
    prompts = [torch.randint(300, 40000, (int(n),), generator=rng).tolist() for n in (40, 7, 23)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)

    def run(llm, ps):
        outs = llm.generate([{"prompt_token_ids": p} for p in ps], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    packed_llm.reset_prefix_cache()
    alone = [run(packed_llm, [p])[0] for p in prompts]
    assert run(packed_llm, prompts[:1]) == alone[:1]  # prefix-cache hit
    packed_llm.reset_prefix_cache()
    assert run(packed_llm, prompts) == alone  # one batch
    # chunked prefill (24-token steps: chunks through both kernels, attention summed in
    # another order) and mixed prefill/decode steps: the same tokens too
    chunked = LLM(model=default_model_path(), kv_cache_space=0.1, max_num_batched_tokens=24,
                  max_num_seqs=8)
    assert chunked.llm_engine.model_config.quantization == "gguf"
    assert run(chunked, prompts) == alone


def test_float32_flag_and_env_dequantize(monkeypatch: pytest.MonkeyPatch) -> None:
    from pagedllm.engine.arg_utils import EngineArgs
    from pagedllm.model_executor.loader import resolve_model

    resolved = resolve_model(None)
    # an explicit dtype dequantizes; dtype auto keeps the weights packed (the CPU default)
    for dtype in ("float32", "bfloat16"):
        assert EngineArgs(dtype=dtype)._resolve_quantization(resolved, resolved.hf_config,
                                                              "cpu") is None
    monkeypatch.delenv("PAGEDLLM_CPU_GGUF_PACKED", raising=False)
    assert EngineArgs()._resolve_quantization(resolved, resolved.hf_config, "cpu") == "gguf"
    assert EngineArgs(quantization="gguf")._resolve_quantization(
        resolved, resolved.hf_config, "cpu") == "gguf"
    assert EngineArgs()._resolve_quantization(resolved, resolved.hf_config, "cuda") is None
    assert EngineArgs(tensor_parallel_size=2)._resolve_quantization(
        resolved, resolved.hf_config, "cpu") is None
    monkeypatch.setenv("PAGEDLLM_CPU_GGUF_PACKED", "1")
    assert EngineArgs()._resolve_quantization(resolved, resolved.hf_config, "cpu") == "gguf"
    with pytest.raises(ValueError, match="tensor-parallel-size"):
        EngineArgs(quantization="gguf", tensor_parallel_size=2)._resolve_quantization(
            resolved, resolved.hf_config, "cpu")
    monkeypatch.setenv("PAGEDLLM_CPU_GGUF_PACKED", "0")
    assert EngineArgs()._resolve_quantization(resolved, resolved.hf_config, "cpu") is None
    assert EngineArgs(quantization="gguf")._resolve_quantization(
        resolved, resolved.hf_config, "cpu") == "gguf"  # the flag still asks for it
    # on AVX512-VNNI or AVX2 the packed kernels are the default; without either the portable
    # kernels are slower than float32: not the default
    monkeypatch.delenv("PAGEDLLM_CPU_GGUF_PACKED")
    gguf_kernels.set_portable(True)
    try:
        assert EngineArgs()._resolve_quantization(resolved, resolved.hf_config, "cpu") is None
        assert EngineArgs(quantization="gguf")._resolve_quantization(
            resolved, resolved.hf_config, "cpu") == "gguf"
    finally:
        gguf_kernels.set_portable(False)


def test_failed_build_warns_once_and_dequantizes(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from pagedllm.engine.arg_utils import EngineArgs
    from pagedllm.model_executor.loader import resolve_model

    resolved = resolve_model(None)
    monkeypatch.delenv("PAGEDLLM_CPU_GGUF_PACKED", raising=False)  # the default
    monkeypatch.setenv("PAGEDLLM_GGUF_KERNEL_FAIL", "1")
    gguf_kernels.reset_for_tests()
    try:
        with caplog.at_level(logging.WARNING):
            for _ in range(2):
                assert EngineArgs()._resolve_quantization(
                    resolved, resolved.hf_config, "cpu") is None
        warnings = [r for r in caplog.records if "could not be built" in r.getMessage()]
        assert len(warnings) == 1
    finally:
        monkeypatch.delenv("PAGEDLLM_GGUF_KERNEL_FAIL")
        gguf_kernels.reset_for_tests()
    assert gguf_kernels.available()


def test_packed_layers_and_prefill_logits() -> None:
    """Every Q4_1 projection is held packed (uint8) and the tied Q8_0 head multiplied packed;
    a prefill (the dequantized-tile path above 16 rows, the float kernel below) gives the
    float32 model's logits to rounding."""
    from pagedllm.attention.backend import get_attn_backend
    from pagedllm.config import ModelConfig
    from pagedllm.model_executor.loader import load_model, resolve_model

    resolved = resolve_model(None)
    config = ModelConfig(
        model="default", model_path=resolved.model_path, model_format="gguf",
        hf_config=resolved.hf_config, architecture="LlamaForCausalLM", dtype=torch.float32,
        tokenizer=resolved.tokenizer_path, quantization="gguf",
    )  # fmt: skip
    packed = load_model(config, torch.device("cpu"), get_attn_backend("torch_ref"))
    layer = packed.model.layers[0]
    for proj in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                 layer.mlp.down_proj):
        assert proj.weight.dtype == torch.uint8
    assert packed.lm_head.gguf_packed[1] == 8  # Q8_0
    ids = torch.tensor([1, 504, 3458, 282, 4649, 314, 253, 1345, 30, 378, 3458, 282], dtype=torch.int64)
    reference = load_ours(default_model_path())
    for n in (12, 20):  # 12 rows: the float kernel; 20 rows: dequantized tiles + GEMM
        long_ids = torch.cat([ids, ids])[:n]
        got = prefill_logits(packed, long_ids)
        want = prefill_logits(reference, long_ids)
        assert got.shape == want.shape
        assert (got - want).abs().max() < 1e-3 * want.abs().max(), n
        assert torch.equal(got.argmax(-1), want.argmax(-1))
