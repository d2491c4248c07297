"""BERT-family encoders against transformers: per-token hidden states of batched requests."""

from __future__ import annotations

import math

import pytest
import torch

from pagedllm.attention.backend import AttentionMetadata, get_attn_backend, kv_cache_shape
from pagedllm.config import ModelConfig
from pagedllm.model_executor.loader import load_model, resolve_model
from pagedllm.model_executor.loader.errors import ModelLoadError

from .conftest import build_random_encoder_dir, tiny_encoder_config

BLOCK = 16


def _batch_metadata(lens: list[int]) -> tuple[AttentionMetadata, int]:
    """Requests back to back, each in its own blocks, whole prompt in one step, bidirectional."""
    qsl = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    blocks_per = [math.ceil(n / BLOCK) for n in lens]
    table = torch.zeros(len(lens), max(blocks_per), dtype=torch.int32)
    slots: list[int] = []
    first = 0
    for i, (n, nb) in enumerate(zip(lens, blocks_per)):
        table[i, :nb] = torch.arange(first, first + nb)
        slots.extend(first * BLOCK + p for p in range(n))
        first += nb
    sl = torch.tensor(lens, dtype=torch.int32)
    md = AttentionMetadata(
        num_reqs=len(lens), num_actual_tokens=sum(lens),
        slot_mapping=torch.tensor(slots, dtype=torch.int64), query_start_loc=qsl, seq_lens=sl,
        block_table=table, max_query_len=max(lens), max_seq_len=max(lens),
        query_start_loc_cpu=qsl, seq_lens_cpu=sl, causal=False,
    )
    return md, first


def _load(path: str, task: str = "embed") -> torch.nn.Module:
    resolved = resolve_model(path)
    mc = ModelConfig(
        model=path, model_path=resolved.model_path, model_format="hf",
        hf_config=resolved.hf_config, architecture=resolved.hf_config.architectures[0],
        task=task,
    )
    return load_model(mc, torch.device("cpu"), get_attn_backend("torch_ref"))


@pytest.mark.parametrize("arch", ["BertModel", "RobertaModel"])
def test_tiny_encoder_matches_hf(tmp_path, arch: str) -> None:
    from transformers import AutoModel

    config = tiny_encoder_config(arch)
    path = build_random_encoder_dir(str(tmp_path / arch), config, seed=1)
    model = _load(path)
    assert model.is_causal is False
    hf = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    lens = [5, 1, 37, 18]  # one past two blocks, a single token, ...
    max_len = config.max_position_embeddings - (2 * (arch != "BertModel"))
    assert max(lens) <= max_len
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, config.vocab_size, (n,), generator=gen) for n in lens]
    md, num_blocks = _batch_metadata(lens)
    shape = kv_cache_shape(num_blocks, BLOCK, model.num_kv_heads, model.head_dim)
    caches = [torch.zeros(shape) for _ in range(model.num_layers)]
    positions = torch.cat([torch.arange(n) for n in lens])
    with torch.no_grad():
        hidden = model(torch.cat(prompts), positions, caches, md)  # [num_tokens, hidden]
        start = 0
        for ids, n in zip(prompts, lens):
            ref = hf(input_ids=ids[None]).last_hidden_state[0]
            torch.testing.assert_close(hidden[start : start + n], ref, rtol=1e-4, atol=1e-4)
            start += n


def test_causal_metadata_gives_different_result(tmp_path) -> None:
    """Guards the test above: bidirectional attention really is in effect."""
    path = build_random_encoder_dir(str(tmp_path / "b"), tiny_encoder_config(), seed=2)
    model = _load(path)
    md, num_blocks = _batch_metadata([9])
    shape = kv_cache_shape(num_blocks, BLOCK, model.num_kv_heads, model.head_dim)
    ids = torch.arange(3, 12)
    with torch.no_grad():
        bi = model(ids, torch.arange(9), [torch.zeros(shape) for _ in range(2)], md)
        md.causal = True
        causal = model(ids, torch.arange(9), [torch.zeros(shape) for _ in range(2)], md)
    assert not torch.allclose(bi[0], causal[0], atol=1e-3)


def test_minilm_checkpoint_loads_every_parameter(minilm_path: str) -> None:
    model = _load(minilm_path)
    assert model.num_layers == 6 and model.head_dim == 32 and model.hidden_size == 384
    assert model.default_pooling_type == "CLS"


def test_encoder_refuses_generate_task(minilm_path: str) -> None:
    with pytest.raises(ModelLoadError, match="task='embed'"):
        _load(minilm_path, task="generate")


def test_unsupported_position_embedding_type(tmp_path) -> None:
    config = tiny_encoder_config(position_embedding_type="relative_key")
    path = build_random_encoder_dir(str(tmp_path / "rel"), config)
    with pytest.raises((ModelLoadError, ValueError), match="position_embedding_type"):
        _load(path)


def test_max_model_len_cap_from_position_table(tmp_path) -> None:
    bert = build_random_encoder_dir(str(tmp_path / "b"), tiny_encoder_config())
    roberta = build_random_encoder_dir(str(tmp_path / "r"), tiny_encoder_config("RobertaModel"))
    assert resolve_model(bert).max_model_len == 80
    assert resolve_model(roberta).max_model_len == 78  # positions start at pad_token_id + 1
