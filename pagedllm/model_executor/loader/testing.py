"""Seeded random HF checkpoints for tests and benchmarks (any transformers config)."""

from __future__ import annotations

import os
from typing import Any

import torch


def build_random_hf_model_dir(
    path: str, config: Any, seed: int = 0, dtype: torch.dtype = torch.float32,
    std: float = 0.02,
) -> str:
    """Saves `config` (architectures must be set) and random weights as safetensors at `path`.

    Builds the transformers model itself, so names and shapes are exactly HF's; norms get
    weights near 1 so activations stay in a realistic range.
    """
    from transformers import AutoModelForCausalLM

    if not getattr(config, "architectures", None):
        raise ValueError("config.architectures must be set")
    os.makedirs(path, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and param.dim() == 1:
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(std * torch.randn(param.shape, generator=generator))
    model.to(dtype).save_pretrained(path, safe_serialization=True)
    return path
