"""Pooler unit tests: every pooling type against a per-request loop, plus config parsing."""

from __future__ import annotations

import json
import os

import pytest
import torch

from pagedllm.model_executor.layers.pooler import (
    Pooler,
    PoolerConfig,
    PoolingType,
    pooling_types_from_sentence_transformers,
)
from pagedllm.model_executor.loader.resolve import read_sentence_transformers_config
from pagedllm.model_executor.models.registry import ModelRegistry

LENS = [3, 1, 5]


def _reference(kind: PoolingType, x: torch.Tensor) -> torch.Tensor:
    """One request's rows [len, dim] pooled the obvious way."""
    if kind is PoolingType.CLS:
        return x[0]
    if kind is PoolingType.LAST:
        return x[-1]
    if kind is PoolingType.MAX:
        return x.max(dim=0).values
    if kind is PoolingType.MEAN:
        return x.mean(dim=0)
    return x.sum(dim=0) / len(x) ** 0.5


@pytest.mark.parametrize("kind", list(PoolingType))
@pytest.mark.parametrize("normalize", [False, True])
def test_each_pooling_type_matches_loop(kind: PoolingType, normalize: bool) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(sum(LENS) + 2, 8)  # [num_tokens + 2 padding rows, dim]
    hidden[sum(LENS):] = 1e6  # padding must not leak into any pool
    out = Pooler(PoolerConfig((kind,), normalize))(hidden, torch.tensor(LENS))
    assert out.shape == (len(LENS), 8) and out.dtype == torch.float32
    start = 0
    for i, n in enumerate(LENS):
        ref = _reference(kind, hidden[start : start + n])
        if normalize:
            ref = ref / ref.norm()
        torch.testing.assert_close(out[i], ref, rtol=1e-5, atol=1e-6)
        start += n
    if normalize:
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(len(LENS)))


def test_combined_types_concatenate_in_sentence_transformers_order() -> None:
    hidden = torch.randn(sum(LENS), 4)
    lens = torch.tensor(LENS)
    both = Pooler(PoolerConfig((PoolingType.MEAN, PoolingType.CLS), False))(hidden, lens)
    cls = Pooler(PoolerConfig((PoolingType.CLS,), False))(hidden, lens)
    mean = Pooler(PoolerConfig((PoolingType.MEAN,), False))(hidden, lens)
    torch.testing.assert_close(both, torch.cat([cls, mean], dim=-1))


def test_bf16_hidden_pools_in_float32() -> None:
    hidden = torch.randn(4, 16).bfloat16()
    out = Pooler(PoolerConfig((PoolingType.MEAN,), True))(hidden, torch.tensor([4]))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[0], torch.nn.functional.normalize(hidden.float().mean(0), dim=0))


def test_sentence_transformers_modes() -> None:
    assert pooling_types_from_sentence_transformers(
        {"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}
    ) == (PoolingType.MEAN,)
    assert pooling_types_from_sentence_transformers({"pooling_mode_lasttoken": True}) == (
        PoolingType.LAST,
    )
    assert pooling_types_from_sentence_transformers({"pooling_mode": "cls"}) == (PoolingType.CLS,)
    with pytest.raises(ValueError, match="weightedmean"):
        pooling_types_from_sentence_transformers({"pooling_mode_weightedmean_tokens": True})
    with pytest.raises(ValueError, match="no pooling mode"):
        pooling_types_from_sentence_transformers({"pooling_mode_mean_tokens": False})


def test_read_sentence_transformers_config_of_minilm(minilm_path: str) -> None:
    st = read_sentence_transformers_config(minilm_path)
    assert st is not None
    assert st.max_seq_length == 256
    assert st.normalize is True  # modules.json lists Normalize (its folder is absent)
    assert st.pooling is not None and st.pooling["pooling_mode_mean_tokens"] is True


def test_read_sentence_transformers_config_absent_or_partial(tmp_path) -> None:
    assert read_sentence_transformers_config(str(tmp_path)) is None
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling"}]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    os.makedirs(tmp_path / "1_Pooling")
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    st = read_sentence_transformers_config(str(tmp_path))
    assert st is not None and not st.normalize and st.max_seq_length is None
    assert pooling_types_from_sentence_transformers(st.pooling) == (PoolingType.CLS,)


def test_registry_embedding_archs() -> None:
    assert ModelRegistry.is_embedding_model(["BertModel"])
    assert ModelRegistry.is_embedding_model(["XLMRobertaModel"])
    assert not ModelRegistry.is_embedding_model(["LlamaForCausalLM"])
    assert not ModelRegistry.is_embedding_model(["Unknown"])
    assert not ModelRegistry.is_embedding_model(None)
    assert "BertModel" in ModelRegistry.get_supported_archs()
