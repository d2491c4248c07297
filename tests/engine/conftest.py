"""Fixtures for engine tests: the real SmolLM2 GGUF engine (shared) and tiny random models."""

from __future__ import annotations

import os

import pytest


def smollm2_path() -> str:
    from pagedllm.model_executor.loader.resolve import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def smol_llm():
    from pagedllm import LLM

    return LLM(model=smollm2_path(), dtype="float32", kv_cache_space=1)


@pytest.fixture(scope="session")
def hf_smol():
    """HF transformers loading the same GGUF (dequantized, fp32): the reference."""
    import torch
    from transformers import AutoModelForCausalLM

    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    )
    return model.eval()
