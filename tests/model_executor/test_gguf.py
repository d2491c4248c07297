"""The bundled SmolLM2 GGUF: config from metadata, and our logits against HF's GGUF loader."""

from __future__ import annotations

import os
import time

import pytest
import torch

from pagedllm.model_executor.loader import resolve_model
from pagedllm.model_executor.loader.resolve import default_model_path
from tests.model_executor.conftest import load_ours, prefill_logits

PROMPT = "The quick brown fox jumps over the lazy dog because it wanted to see the river."


@pytest.fixture(scope="module")
def gguf_path() -> str:
    return default_model_path()


def test_resolve_default_is_smollm2_gguf(gguf_path: str) -> None:
    resolved = resolve_model(None)
    assert resolved.model_format == "gguf"
    assert resolved.model_path == gguf_path == resolved.tokenizer_path
    config = resolved.hf_config
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.hidden_size, config.num_hidden_layers) == (576, 30)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.vocab_size == 49152
    assert config.tie_word_embeddings is True
    assert config.rope_parameters["rope_theta"] == 100000.0
    assert resolve_model(gguf_path).model_path == gguf_path
    assert resolve_model(os.path.dirname(gguf_path)).model_path == gguf_path


def test_gguf_logits_match_transformers(gguf_path: str) -> None:
    from transformers import AutoModelForCausalLM

    from pagedllm.tokenizer import get_tokenizer

    directory, name = os.path.split(gguf_path)
    tokenizer = get_tokenizer(gguf_path)
    input_ids = torch.tensor(tokenizer(PROMPT).input_ids, dtype=torch.int64)
    assert 15 <= input_ids.shape[0] <= 25

    start = time.perf_counter()
    ours = load_ours(gguf_path)
    load_s = time.perf_counter() - start
    actual = prefill_logits(ours, input_ids)
    assert ours.lm_head is ours.model.embed_tokens  # tied
    del ours

    hf = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        expected = hf(input_ids.unsqueeze(0)).logits[0].float()
    del hf
    assert actual.shape == expected.shape == (input_ids.shape[0], 49152)
    assert (actual - expected).abs().max().item() < 1e-3
    # A real model: the next-token argmax agrees everywhere.
    assert torch.equal(actual.argmax(-1), expected.argmax(-1))
    assert load_s < 30, f"loading the GGUF took {load_s:.1f}s"
