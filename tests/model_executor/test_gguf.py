"""The bundled SmolLM2 GGUF: config from metadata, and our logits against HF's GGUF loader."""

from __future__ import annotations

import math
import os
import time

import numpy as np
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


def _llama_cpp_rope_freqs(head_dim: int, theta: float, factor: float, low: float, high: float,
                          original: int) -> list[float]:
    """llama.cpp's converter, scalar: the `rope_freqs` divisors it writes for Llama 3.1."""
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


@pytest.mark.parametrize("factor,original", [(8.0, 8192), (32.0, 8192)])
def test_rope_freqs_become_llama3_scaling(factor: float, original: int) -> None:
    from pagedllm.model_executor.layers.rotary_embedding import get_rope
    from pagedllm.model_executor.loader.gguf_loader import llama3_rope_from_freq_factors

    head_dim, theta = 128, 500000.0
    divisors = np.array(_llama_cpp_rope_freqs(head_dim, theta, factor, 1.0, 4.0, original),
                        dtype=np.float32)  # stored as F32 in the file
    params = llama3_rope_from_freq_factors(divisors, head_dim, theta)
    assert params["rope_type"] == "llama3" and params["factor"] == factor
    assert params["original_max_position_embeddings"] == original
    rope = get_rope(head_dim, head_dim, 4096, theta, params)
    plain = get_rope(head_dim, head_dim, 4096, theta, None)
    want = plain._compute_inv_freq().double() / torch.from_numpy(divisors).double()
    torch.testing.assert_close(rope._compute_inv_freq().double(), want, rtol=1e-5, atol=0)


def test_unknown_rope_freqs_refused() -> None:
    from pagedllm.model_executor.loader.errors import ModelLoadError
    from pagedllm.model_executor.loader.gguf_loader import llama3_rope_from_freq_factors

    with pytest.raises(ModelLoadError, match="does not match Llama-3 RoPE"):
        llama3_rope_from_freq_factors(np.linspace(1.0, 3.0, 64), 128, 500000.0)
    with pytest.raises(ModelLoadError, match="shape"):
        llama3_rope_from_freq_factors(np.ones(10), 128, 500000.0)


def _config_from_header_gguf(path: str, arch: str, hidden: int, heads: int, kv_heads: int,
                             context: int, theta: float, extra) -> object:
    """Writes a one-block GGUF with only the header a config needs (plus `extra(writer)`'s
    keys and tensors) and returns the HF config pagedllm builds from it."""
    import gguf

    from pagedllm.model_executor.loader.gguf_loader import build_hf_config_from_gguf

    w = gguf.GGUFWriter(path, arch)
    w.add_embedding_length(hidden)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_block_count(1)
    w.add_feed_forward_length(2 * hidden)
    w.add_vocab_size(100)
    w.add_context_length(context)
    w.add_rope_freq_base(theta)
    extra(w)
    w.add_tensor("token_embd.weight", np.zeros((100, hidden), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return build_hf_config_from_gguf(path)


def test_gguf_config_reads_rope_freqs(tmp_path) -> None:
    head_dim, theta = 64, 500000.0
    freqs = np.array(_llama_cpp_rope_freqs(head_dim, theta, 8.0, 1.0, 4.0, 8192), np.float32)
    cfg = _config_from_header_gguf(
        str(tmp_path / "llama31-shape.gguf"), "llama", 2 * head_dim, 2, 1, 131072, theta,
        lambda w: w.add_tensor("rope_freqs.weight", freqs),
    )  # fmt: skip
    rope = cfg.rope_parameters
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0
    assert rope["original_max_position_embeddings"] == 8192 and rope["rope_theta"] == theta


def test_gguf_config_reads_yarn(tmp_path) -> None:
    """llama.cpp's YaRN keys (a Qwen2.5 long-context GGUF) become HF yarn rope_parameters."""
    import gguf

    from pagedllm.engine.arg_utils import _derive_max_model_len

    def yarn(w) -> None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(4.0)
        w.add_rope_scaling_orig_ctx_len(32768)

    cfg = _config_from_header_gguf(
        str(tmp_path / "qwen2-yarn.gguf"), "qwen2", 64, 4, 2, 32768, 1000000.0, yarn
    )
    rope = cfg.rope_parameters
    assert rope["rope_type"] == "yarn" and rope["factor"] == 4.0
    assert rope["original_max_position_embeddings"] == 32768
    assert _derive_max_model_len(cfg) == 131072
