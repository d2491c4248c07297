"""Greedy parity with HF transformers: tiny random models of every architecture and the real
SmolLM2 GGUF, tokens and top logprobs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pagedllm import LLM, SamplingParams

NUM_TOKENS = 32


def _tiny_configs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=False, eos_token_id=None, bos_token_id=None,
    )
    return {
        "llama3": LlamaConfig(
            **common, architectures=["LlamaForCausalLM"], rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        ),
        "mistral": MistralConfig(**common, architectures=["MistralForCausalLM"], sliding_window=None),
        "qwen2": Qwen2Config(**common, architectures=["Qwen2ForCausalLM"]),
        "qwen3": Qwen3Config(**common, architectures=["Qwen3ForCausalLM"], head_dim=16),
        # YaRN as Qwen2.5 configures it: max_position_embeddings is the pretraining length
        # (64 here), the served context factor x that (256); prompts + outputs run past 64.
        "qwen2_yarn": Qwen2Config(
            **{**common, "max_position_embeddings": 64}, architectures=["Qwen2ForCausalLM"],
            rope_scaling={"rope_type": "yarn", "factor": 4.0,
                          "original_max_position_embeddings": 64},
        ),
    }


def _hf_greedy(model, prompt: list[int], n: int):
    """HF's greedy tokens, and HF's log_softmax at each generated position.

    The logprobs come from one full forward over prompt + generated tokens: HF's incremental
    `generate` path drifts from its own full forward by up to 4e-3 on SmolLM2, while ours
    matches the full forward to 1e-6.
    """
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
            do_sample=False, pad_token_id=0,
        )
        seq = out[0]
        full = torch.log_softmax(model(seq[None]).logits[0].float(), -1)
    tokens = seq[len(prompt):].tolist()
    logprobs = [full[len(prompt) - 1 + i] for i in range(n)]
    return tokens, logprobs


def _check_logprobs(ours, hf_logprobs, num_steps):
    for step in range(num_steps):
        for tok, lp in ours[step].items():
            assert abs(lp.logprob - hf_logprobs[step][tok].item()) < 1e-3, (step, tok)


@pytest.mark.parametrize("arch", ["llama3", "mistral", "qwen2", "qwen3", "qwen2_yarn"])
def test_tiny_random_models_match_hf(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    from pagedllm.model_executor.loader.testing import build_random_hf_model_dir

    path = build_random_hf_model_dir(str(tmp_path / arch), _tiny_configs()[arch], seed=1, std=0.2)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(model=path, skip_tokenizer_init=True, dtype="float32", kv_cache_space=0.05)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 512, size=n).tolist() for n in (5, 17, 40, 100)]
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=5)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for p, o in zip(prompts, outs):
        hf_tokens, hf_lps = _hf_greedy(hf, p, NUM_TOKENS)
        assert o.outputs[0].token_ids == hf_tokens
        _check_logprobs(o.outputs[0].logprobs, hf_lps, NUM_TOKENS)


def _smol_prompts(tokenizer) -> list[list[int]]:
    text = (
        "The history of the city begins in the Roman era, when a small settlement grew on the "
        "banks of the river. Over the centuries it became a center of trade and learning. "
    )
    base = tokenizer.encode(text * 30)
    return [base[:n] for n in (5, 12, 33, 64, 128, 200, 317, 500)]


def test_smollm2_gguf_matches_hf(smol_llm, hf_smol):
    prompts = _smol_prompts(smol_llm.get_tokenizer())
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=5)
    outs = smol_llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for p, o in zip(prompts, outs):
        hf_tokens, hf_lps = _hf_greedy(hf_smol, p, NUM_TOKENS)
        assert o.outputs[0].token_ids == hf_tokens, len(p)
        _check_logprobs(o.outputs[0].logprobs, hf_lps, NUM_TOKENS)


def test_text_generation_api(smol_llm):
    outs = smol_llm.generate(
        ["The capital of France is"], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False
    )
    o = outs[0]
    assert o.finished and o.prompt == "The capital of France is"
    assert len(o.outputs[0].token_ids) <= 8 and o.outputs[0].text
    assert o.outputs[0].finish_reason in ("stop", "length")
    assert o.outputs[0].text == smol_llm.get_tokenizer().decode(
        o.outputs[0].token_ids, skip_special_tokens=True
    )
