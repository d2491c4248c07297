"""Greedy parity with HF transformers for the Gemma, Phi-3 and MoE families: tiny random
models of each configuration (fp32, safetensors), prompts longer than their sliding windows,
batched with preemption forced by a small KV cache, one alone, and one from the prefix cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_hf_parity import _check_logprobs, _hf_greedy

from pagedllm import LLM, SamplingParams
from pagedllm.core.kv_cache_groups import build_kv_cache_spec, layer_windows
from pagedllm.model_executor.loader.testing import build_random_hf_model_dir

NUM_TOKENS = 12
VOCAB = 512
WINDOW = 16  # every sliding layer's window: the longer prompts run well past it
# Prompt lengths: a short one, then ones past the window; in 9 blocks of 16 slots the batch
# is admitted but cannot all stay resident while decoding, so requests get preempted.
PROMPT_LENS = (5, 23, 70)
NUM_BLOCKS = 9
# Models with sliding and full layers (three KV cache groups of one layer each, blocks out of
# the window freed): prefills in chunks of 32 tokens, and 16 blocks (+ the null block), a
# third of the layer-blocks above, still preempt; 14 is the least one request needs.
NUM_BLOCKS_HYBRID = 17
CHUNK_HYBRID = 32
# Sliding windows on every layer (one group that frees blocks), chunks of 32: 5 blocks + null.
NUM_BLOCKS_SLIDING = 6


def _kv_settings(config) -> dict:
    """The KV cache size (and prefill chunk) that makes the batch preempt for this model."""
    text = getattr(config, "text_config", None) or config
    spec = build_kv_cache_spec(layer_windows(text), max_model_len=512)
    if spec.num_groups > 1:
        return dict(num_gpu_blocks_override=NUM_BLOCKS_HYBRID, max_num_batched_tokens=CHUNK_HYBRID)
    if spec.has_sliding:
        return dict(num_gpu_blocks_override=NUM_BLOCKS_SLIDING,
                    max_num_batched_tokens=CHUNK_HYBRID)
    return dict(num_gpu_blocks_override=NUM_BLOCKS)

COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
    eos_token_id=None, bos_token_id=None, pad_token_id=0,
)


def _gemma_configs() -> dict:
    from transformers import Gemma2Config, GemmaConfig

    return {
        "gemma": GemmaConfig(**COMMON, architectures=["GemmaForCausalLM"]),
        "gemma2": Gemma2Config(
            **COMMON, architectures=["Gemma2ForCausalLM"], sliding_window=WINDOW,
            query_pre_attn_scalar=24, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        ),
    }


def _phi3_configs() -> dict:
    from transformers import Phi3Config

    phi = {k: v for k, v in COMMON.items() if k != "head_dim"}  # Phi-3 derives head_dim
    half = 16 * 3 // 8  # rotary_dim / 2 with partial_rotary_factor 0.75 (as Phi-4-mini)
    return {
        "phi3": Phi3Config(**phi, architectures=["Phi3ForCausalLM"], sliding_window=WINDOW),
        # Phi-3.5 / Phi-4-mini style LongRoPE: max_position_embeddings / original = 4, so the
        # cos/sin attention factor is sqrt(1 + ln 4 / ln 128); sequences stay within the
        # pretraining length (short factors; see LongRoPEScalingRotaryEmbedding for past it).
        "phi3_longrope": Phi3Config(
            **phi, architectures=["Phi3ForCausalLM"], partial_rotary_factor=0.75,
            original_max_position_embeddings=128,
            rope_scaling={"type": "longrope",
                          "short_factor": [1.0 + 0.25 * i for i in range(half)],
                          "long_factor": [3.0 + 0.5 * i for i in range(half)]},
        ),
    }


def _moe_configs() -> dict:
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    moe = dict(COMMON, intermediate_size=96, num_experts_per_tok=2)
    return {
        "mixtral": MixtralConfig(**moe, architectures=["MixtralForCausalLM"],
                                 num_local_experts=4, sliding_window=WINDOW),  # fmt: skip
        # Layer 1 dense (mlp_only_layers), shared expert with its sigmoid gate, top-k weights
        # not renormalised (as Qwen1.5-MoE ships).
        "qwen2_moe": Qwen2MoeConfig(
            **moe, architectures=["Qwen2MoeForCausalLM"], num_experts=6,
            moe_intermediate_size=32, shared_expert_intermediate_size=80, norm_topk_prob=False,
            mlp_only_layers=[1],
        ),
        # Top-1 routing, renormalised (a single weight of 1).
        "qwen3_moe": Qwen3MoeConfig(
            **{**moe, "num_experts_per_tok": 1}, architectures=["Qwen3MoeForCausalLM"],
            num_experts=4, moe_intermediate_size=48, norm_topk_prob=True,
        ),
    }


def _gemma3_configs() -> dict:
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    text = dict(
        **COMMON, sliding_window=WINDOW, query_pre_attn_scalar=24,
        # 2:1 local/global here (5:1 in the releases); a RoPE base and scaling per layer type.
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    )
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, image_size=32, patch_size=8)  # fmt: skip
    return {
        "gemma3": Gemma3TextConfig(**text, architectures=["Gemma3ForCausalLM"]),
        # A multimodal checkpoint: we serve its language model, skipping the vision tower.
        "gemma3_multimodal": Gemma3Config(
            text_config=Gemma3TextConfig(**text), vision_config=vision, mm_tokens_per_image=4,
            architectures=["Gemma3ForConditionalGeneration"],
        ),
    }


def run_parity(config, tmp_path, std: float = 0.2) -> None:
    """Our greedy tokens and top-5 logprobs against HF's, batched (with preemption), alone and
    from the prefix cache."""
    from transformers import AutoModelForCausalLM

    path = build_random_hf_model_dir(str(tmp_path / "model"), config, seed=1, std=std)
    # Eager attention: the reference must apply Gemma 2's score soft-capping, which some
    # transformers versions (5.17) silently drop under their default SDPA attention.
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                              attn_implementation="eager").eval()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, VOCAB, size=n).tolist() for n in PROMPT_LENS]
    expected = [_hf_greedy(hf, p, NUM_TOKENS) for p in prompts]
    llm = LLM(model=path, skip_tokenizer_init=True, dtype="float32", max_num_seqs=4,
              **_kv_settings(config))
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=5)
    engine = llm.llm_engine

    def gen(batch):
        outs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
        return [o.outputs[0] for o in outs]

    for out, (tokens, lps) in zip(gen(prompts), expected, strict=True):
        assert out.token_ids == tokens
        _check_logprobs(out.logprobs, lps, NUM_TOKENS)
    assert engine.total_num_preemptions > 0
    llm.reset_prefix_cache()
    alone = gen([prompts[2]])[0]
    assert alone.token_ids == expected[2][0]
    _check_logprobs(alone.logprobs, expected[2][1], NUM_TOKENS)
    hits_before = engine.total_prefix_cache_hits
    again = gen([prompts[2]])[0]
    assert engine.total_prefix_cache_hits - hits_before >= 64  # 4 full blocks of the 70
    assert again.token_ids == expected[2][0]


@pytest.mark.parametrize("family", ["gemma", "gemma2"])
def test_gemma_families_match_hf(family, tmp_path):
    run_parity(_gemma_configs()[family], tmp_path)


@pytest.mark.parametrize("family", ["phi3", "phi3_longrope"])
def test_phi3_families_match_hf(family, tmp_path):
    run_parity(_phi3_configs()[family], tmp_path)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_moe_families_match_hf(family, tmp_path):
    run_parity(_moe_configs()[family], tmp_path)


@pytest.mark.parametrize("family", ["gemma3", "gemma3_multimodal"])
def test_gemma3_text_matches_hf(family, tmp_path):
    run_parity(_gemma3_configs()[family], tmp_path)
