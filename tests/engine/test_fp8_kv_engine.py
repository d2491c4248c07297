"""`kv_cache_dtype="fp8"` end to end: per-layer k/v scales read from the checkpoint, greedy
tokens and logprobs equal to a transformers reference whose attention rounds each key and
value to e4m3 with the same scales, and twice the KV blocks of a bf16 cache."""

from __future__ import annotations

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.model_executor.loader.testing import build_random_hf_model_dir
from tests.model_executor.conftest import tiny_config
from tests.model_executor.quant_reference import FP8, rewrite_checkpoint

# Per layer (k_scale, v_scale); layer 1's are small enough that some keys saturate at 448.
SCALES = [(0.012, 0.006), (0.004, 0.003)]
NUM_TOKENS = 8


def _fake_quant(x: torch.Tensor, scale: float) -> torch.Tensor:
    return (x / scale).clamp(-448.0, 448.0).to(FP8).float() * scale


def _hf_reference(path: str):
    """transformers model whose attention sees e4m3-rounded keys and values."""
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def fp8_kv_attention(module, query, key, value, attention_mask, **kwargs):
        k_scale, v_scale = SCALES[module.layer_idx]
        return sdpa_attention_forward(module, query, _fake_quant(key, k_scale),
                                      _fake_quant(value, v_scale), attention_mask, **kwargs)

    AttentionInterface.register("pagedllm_fp8_kv_ref", fp8_kv_attention)
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="pagedllm_fp8_kv_ref").eval()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8kv")
    base = build_random_hf_model_dir(str(root / "base"), tiny_config("LlamaForCausalLM"),
                                     seed=9, std=0.2)

    def add_scales(tensors):
        for i, (k, v) in enumerate(SCALES):
            tensors[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(k)
            tensors[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor([v])
        return tensors

    return base, rewrite_checkpoint(base, str(root / "scaled"), add_scales, None)


def test_fp8_kv_cache_matches_rounded_reference(model_dirs):
    base, scaled = model_dirs
    llm = LLM(model=scaled, skip_tokenizer_init=True, dtype="float32", kv_cache_space=0.02,
              kv_cache_dtype="fp8")
    runner = llm.llm_engine.engine_core.executor.worker.model_runner
    assert runner.kv_caches[0].dtype == torch.float8_e4m3fn
    attn = runner.model.model.layers[1].self_attn.attn
    assert (attn.k_scale, attn.v_scale) == pytest.approx(SCALES[1])
    hf = _hf_reference(base)
    prompts = [[7, 100, 3, 45, 9], list(range(20, 60))]
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=3)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for p, o in zip(prompts, outs):
        seq = torch.tensor(p + list(o.outputs[0].token_ids))
        with torch.no_grad():
            logprobs = torch.log_softmax(hf(seq[None]).logits[0], -1)
        for step, token in enumerate(o.outputs[0].token_ids):
            row = logprobs[len(p) - 1 + step]
            assert token == int(row.argmax()), (step, token)
            for tok, lp in o.outputs[0].logprobs[step].items():
                assert abs(lp.logprob - row[tok].item()) < 1e-3, (step, tok)


def test_fp8_kv_cache_has_twice_the_blocks_of_bf16(model_dirs):
    base, _ = model_dirs
    counts = {
        kind: LLM(model=base, skip_tokenizer_init=True, dtype="bfloat16", kv_cache_space=0.01,
                  kv_cache_dtype=kind).llm_engine.engine_core.num_blocks
        for kind in ("auto", "fp8_e4m3")
    }
    assert counts["fp8_e4m3"] == 2 * counts["auto"]


def test_unknown_kv_cache_dtype_is_refused(model_dirs):
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, fp8, fp8_e4m3"):
        LLM(model=model_dirs[0], skip_tokenizer_init=True, kv_cache_dtype="fp8_e5m2")
