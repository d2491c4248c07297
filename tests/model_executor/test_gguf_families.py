"""GGUF files of the Gemma, Phi-3 and MoE families: tiny random HF models written as llama.cpp's
converter does (its tensor names from the gguf package, experts stacked, Gemma norms as 1 + w,
Llama-architecture Q/K rows permuted, LongRoPE factors as tensors), loaded by pagedllm and
compared with HF on the original checkpoint: greedy tokens and logprobs."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.model_executor.layers.rotary_embedding import rope_params_from_config
from pagedllm.model_executor.loader.testing import build_random_hf_model_dir

NUM_TOKENS = 8
VOCAB = 256
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
    eos_token_id=None, bos_token_id=None, pad_token_id=0,
)
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
_EXPERT_GGUF = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down",
                "w1": "gate", "w3": "up", "w2": "down"}  # fmt: skip


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order for its interleaved RoPE (LlamaModel.permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def _write_gguf(hf_dir: str, path: str, arch: str, config, extra_kv, extra_tensors=None) -> None:
    import gguf
    from safetensors.torch import load_file

    state = load_file(f"{hf_dir}/model.safetensors")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    w = gguf.GGUFWriter(path, arch)
    w.add_embedding_length(config.hidden_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_vocab_size(VOCAB)
    w.add_context_length(config.max_position_embeddings)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    if arch != "gemma3":  # its global base comes with its scaling in extra_kv
        w.add_rope_freq_base(rope_params_from_config(config)[0])
    extra_kv(w)
    experts: dict[tuple[int, str], dict[int, np.ndarray]] = {}
    for name, tensor in state.items():
        array = tensor.float().numpy()
        m = _EXPERT.match(name)
        if m:
            experts.setdefault((int(m.group(1)), _EXPERT_GGUF[m.group(3)]), {})[
                int(m.group(2))] = array
            continue
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            array = array + 1.0
        if arch == "llama" and name.endswith("q_proj.weight"):
            array = _permute(array, config.num_attention_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            array = _permute(array, config.num_key_value_heads)
        if name.endswith("shared_expert_gate.weight"):
            array = array.reshape(-1)
        if name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, name
        w.add_tensor(gguf_name, np.ascontiguousarray(array))
    for (layer, kind), per_expert in sorted(experts.items()):
        stacked = np.stack([per_expert[e] for e in sorted(per_expert)])
        w.add_tensor(f"blk.{layer}.ffn_{kind}_exps.weight", stacked)
    for name, array in (extra_tensors or {}).items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _cases() -> dict:
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        GemmaConfig,
        MixtralConfig,
        Phi3Config,
        Qwen2MoeConfig,
        Qwen3MoeConfig,
    )

    def gemma2_kv(w):
        w.add_sliding_window(8)
        w.add_attn_logit_softcapping(5.0)
        w.add_final_logit_softcapping(3.0)

    def gemma3_kv(w):
        w.add_sliding_window(8)
        w.add_rope_freq_base(1e6)
        w.add_rope_scaling_type(__import__("gguf").RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(2.0)

    def moe_kv(shared):
        def kv(w):
            w.add_expert_count(4)
            w.add_expert_used_count(2)
            w.add_expert_feed_forward_length(32)
            if shared:
                w.add_expert_shared_feed_forward_length(48)
        return kv

    def mixtral_kv(w):
        w.add_expert_count(4)
        w.add_expert_used_count(2)

    half = 8  # rotary_dim / 2
    short, long = [1.0 + 0.25 * i for i in range(half)], [3.0 + 0.5 * i for i in range(half)]

    def phi3_kv(w):
        w.add_rope_scaling_orig_ctx_len(64)
        w.add_rope_dimension_count(16)

    phi = {k: v for k, v in COMMON.items() if k != "head_dim"}
    g3_layers = ["sliding_attention", "full_attention"]  # llama.cpp's pattern 2 (set below)
    moe = dict(COMMON, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    return {
        "gemma": ("gemma", GemmaConfig(**COMMON, architectures=["GemmaForCausalLM"]),
                  lambda w: None, None),
        "gemma2": ("gemma2", Gemma2Config(
            **COMMON, architectures=["Gemma2ForCausalLM"], sliding_window=8,
            query_pre_attn_scalar=16, attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
            gemma2_kv, None),
        "gemma3": ("gemma3", Gemma3TextConfig(
            **COMMON, architectures=["Gemma3ForCausalLM"], sliding_window=8,
            query_pre_attn_scalar=16, layer_types=g3_layers,
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
            lambda w: (gemma3_kv(w), w.add_sliding_window_pattern(2)), None),
        "phi3": ("phi3", Phi3Config(
            **phi, architectures=["Phi3ForCausalLM"], original_max_position_embeddings=64,
            rope_scaling={"type": "longrope", "short_factor": short, "long_factor": long}),
            phi3_kv, {"rope_factors_long.weight": np.array(long, np.float32),
                      "rope_factors_short.weight": np.array(short, np.float32)}),
        "qwen2moe": ("qwen2moe", Qwen2MoeConfig(
            **moe, architectures=["Qwen2MoeForCausalLM"], shared_expert_intermediate_size=48,
            norm_topk_prob=False), moe_kv(True), None),
        "qwen3moe": ("qwen3moe", Qwen3MoeConfig(
            **moe, architectures=["Qwen3MoeForCausalLM"], norm_topk_prob=True), moe_kv(False),
            None),
        "mixtral": ("llama", MixtralConfig(
            **{**COMMON, "intermediate_size": 32}, architectures=["MixtralForCausalLM"],
            num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False),
            mixtral_kv, None),
    }  # fmt: skip


@pytest.mark.parametrize(
    "case", ["gemma", "gemma2", "gemma3", "phi3", "qwen2moe", "qwen3moe", "mixtral"]
)
def test_gguf_family_matches_hf(case, tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.engine.test_hf_parity import _check_logprobs, _hf_greedy

    arch, config, extra_kv, extra_tensors = _cases()[case]
    hf_dir = build_random_hf_model_dir(str(tmp_path / "hf"), config, seed=2, std=0.2)
    path = str(tmp_path / f"{case}.gguf")
    _write_gguf(hf_dir, path, arch, config, extra_kv, extra_tensors)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    llm = LLM(model=path, skip_tokenizer_init=True, dtype="float32", kv_cache_space=0.02)
    assert llm.llm_engine.model_config.hf_config.architectures == config.architectures
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, VOCAB, size=n).tolist() for n in (6, 30)]
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=3)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for p, o in zip(prompts, outs, strict=True):
        tokens, lps = _hf_greedy(hf, p, NUM_TOKENS)
        assert o.outputs[0].token_ids == tokens
        _check_logprobs(o.outputs[0].logprobs, lps, NUM_TOKENS)
