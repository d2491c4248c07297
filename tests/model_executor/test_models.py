"""Our models' prefill logits against HF transformers on tiny random checkpoints."""

from __future__ import annotations

import pytest
import torch

from pagedllm.model_executor.loader.testing import build_random_hf_model_dir
from tests.model_executor.conftest import (
    load_ours,
    new_kv_caches,
    prefill_logits,
    run_step,
    tiny_config,
)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

CASES = {
    "llama3": ("LlamaForCausalLM", {"rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0}),
    "llama_tied": ("LlamaForCausalLM", {"tie_word_embeddings": True}),
    "llama_linear_rope": ("LlamaForCausalLM", {"rope_scaling": {"rope_type": "linear",
                                                                "factor": 2.0}}),
    "mistral_sliding": ("MistralForCausalLM", {"sliding_window": 7}),
    "qwen2": ("Qwen2ForCausalLM", {}),
    # YaRN past a 16-token pretraining length (the 37-token prompt reaches 2.3x it).
    "qwen2_yarn": ("Qwen2ForCausalLM", {"rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}}),
    "llama_yarn_mscale": ("LlamaForCausalLM", {"rope_scaling": {
        "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16,
        "mscale": 1.0, "mscale_all_dim": 0.5}}),
    "qwen3": ("Qwen3ForCausalLM", {}),
}


def _hf_logits(model_dir: str, input_ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        return hf(input_ids.unsqueeze(0)).logits[0].float()


@pytest.mark.parametrize("case", sorted(CASES))
def test_prefill_logits_match_transformers(case: str, tmp_path) -> None:
    arch, overrides = CASES[case]
    config = tiny_config(arch, **overrides)
    model_dir = build_random_hf_model_dir(str(tmp_path / case), config, seed=1, std=0.1)
    input_ids = torch.randint(0, config.vocab_size, (37,),
                              generator=torch.Generator().manual_seed(2))
    ours = load_ours(model_dir)
    assert ours.num_layers == 2 and ours.num_kv_heads == 2 and ours.head_dim == 16
    window = overrides.get("sliding_window")
    assert all(layer.self_attn.attn.sliding_window == window for layer in ours.model.layers)
    assert (ours.lm_head is ours.model.embed_tokens) == config.tie_word_embeddings
    expected = _hf_logits(model_dir, input_ids)
    actual = prefill_logits(ours, input_ids)
    assert actual.dtype == torch.float32
    assert actual.shape == expected.shape == (37, config.vocab_size)
    # Random logits must carry signal, or the comparison proves nothing.
    assert expected.std() > 0.05
    assert (actual - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("case", ["llama3", "mistral_sliding", "qwen3"])
def test_chunked_prefill_then_decode_matches_full_prefill(case: str, tmp_path) -> None:
    """The KV cache carries context across steps: chunks + decodes == one prefill."""
    arch, overrides = CASES[case]
    config = tiny_config(arch, **overrides)
    model_dir = build_random_hf_model_dir(str(tmp_path / case), config, seed=4, std=0.1)
    ours = load_ours(model_dir)
    input_ids = torch.randint(0, config.vocab_size, (40,),
                              generator=torch.Generator().manual_seed(5))
    full = prefill_logits(ours, input_ids)
    kv_caches = new_kv_caches(ours, 40)
    steps = [(0, 13), (13, 30), (30, 38), (38, 39), (39, 40)]  # chunks, then decodes
    pieces = [run_step(ours, input_ids[a:b], a, kv_caches) for a, b in steps]
    assert (torch.cat(pieces) - full).abs().max().item() < 1e-4


def test_context_length_follows_rope_scaling() -> None:
    """vLLM's derivation: linear and YaRN configs keep the pretraining length in
    max_position_embeddings; the served context is that length times the factor (YaRN's from
    original_max_position_embeddings); llama3 configs already state the extended length."""
    from pagedllm.engine.arg_utils import _derive_max_model_len

    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert _derive_max_model_len(tiny_config("Qwen2ForCausalLM", rope_scaling=yarn,
                                             max_position_embeddings=32768)) == 131072
    linear = {"rope_type": "linear", "factor": 2.0}
    assert _derive_max_model_len(tiny_config("LlamaForCausalLM", rope_scaling=linear,
                                             max_position_embeddings=4096)) == 8192
    assert _derive_max_model_len(tiny_config("LlamaForCausalLM", rope_scaling=LLAMA3_ROPE,
                                             max_position_embeddings=4096)) == 4096
    assert _derive_max_model_len(tiny_config("Qwen3ForCausalLM")) == 256
