"""Shared fixtures: tiny HF configs, single-prefill attention metadata, run helpers."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from pagedllm.attention.backend import AttentionMetadata, get_attn_backend, kv_cache_shape
from pagedllm.config import ModelConfig
from pagedllm.model_executor.layers.quantization import resolve_quantization
from pagedllm.model_executor.loader import load_model, resolve_model

BLOCK_SIZE = 16


def tiny_config(arch: str, **overrides: Any) -> Any:
    """A 2-layer, hidden-64 transformers config of `arch` with GQA."""
    import transformers

    cls_name = {
        "LlamaForCausalLM": "LlamaConfig",
        "MistralForCausalLM": "MistralConfig",
        "Qwen2ForCausalLM": "Qwen2Config",
        "Qwen3ForCausalLM": "Qwen3Config",
    }[arch]
    kwargs: dict[str, Any] = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    config = getattr(transformers, cls_name)(**kwargs)
    config.architectures = [arch]
    return config


def prefill_metadata(
    num_tokens: int, start: int = 0, block_size: int = BLOCK_SIZE
) -> AttentionMetadata:
    """Metadata for one request computing positions start..start+num_tokens-1 in blocks
    0, 1, ... (positions before `start` are already in the cache)."""
    seq_len = start + num_tokens
    num_blocks = math.ceil(seq_len / block_size)
    return AttentionMetadata(
        num_reqs=1,
        num_actual_tokens=num_tokens,
        slot_mapping=torch.arange(start, seq_len, dtype=torch.int64),
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32),
        seq_lens=torch.tensor([seq_len], dtype=torch.int32),
        block_table=torch.arange(num_blocks, dtype=torch.int32).unsqueeze(0),
        max_query_len=num_tokens,
        max_seq_len=seq_len,
        query_start_loc_cpu=torch.tensor([0, num_tokens], dtype=torch.int32),
        seq_lens_cpu=torch.tensor([seq_len], dtype=torch.int32),
    )


def new_kv_caches(model: torch.nn.Module, num_tokens: int) -> list[torch.Tensor]:
    num_blocks = math.ceil(num_tokens / BLOCK_SIZE) + 1
    shape = kv_cache_shape(num_blocks, BLOCK_SIZE, model.num_kv_heads, model.head_dim)
    return [torch.zeros(shape, dtype=model.dtype) for _ in range(model.num_layers)]


@torch.no_grad()
def run_step(
    model: torch.nn.Module, input_ids: torch.Tensor, start: int, kv_caches: list[torch.Tensor]
) -> torch.Tensor:
    """Logits of positions start.. of one request whose earlier tokens are cached."""
    n = input_ids.shape[0]
    positions = torch.arange(start, start + n, dtype=torch.int64)
    hidden = model(input_ids, positions, kv_caches, prefill_metadata(n, start))
    return model.compute_logits(hidden)


def load_ours(
    model: str, dtype: torch.dtype = torch.float32, quantization: str | None = None
) -> torch.nn.Module:
    """Loads through the normal loader; the quantization is resolved as the engine does
    (the flag against the checkpoint's quantization_config)."""
    resolved = resolve_model(model)
    model_config = ModelConfig(
        model=model,
        model_path=resolved.model_path,
        model_format=resolved.model_format,
        hf_config=resolved.hf_config,
        architecture=resolved.hf_config.architectures[0],
        dtype=dtype,
        tokenizer=resolved.tokenizer_path,
        quantization=resolve_quantization(quantization, resolved.hf_config),
    )
    return load_model(model_config, torch.device("cpu"), get_attn_backend("torch_ref"))


@torch.no_grad()
def prefill_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """[num_tokens] ids -> [num_tokens, vocab_size] logits of one prefill through the paged path."""
    return run_step(model, input_ids, 0, new_kv_caches(model, input_ids.shape[0]))


@pytest.fixture
def tiny_config_factory():
    return tiny_config
