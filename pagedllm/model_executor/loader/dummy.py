"""`--load-format dummy`: random weights made in place on the device, nothing read from disk.

For benchmarks of shapes whose checkpoints are not at hand (70B on a machine whose disk cannot
hold it). Values follow HF's initialisation: normal(0, initializer_range) for matrices and
embeddings, norms at 1, biases at 0, so activations stay in a realistic range. Seeded per
parameter name and tensor-parallel rank: the same layout gives the same weights every run
(different layouts shard different random tensors, so TP=1 and TP=2 dummies differ).
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
from torch import nn

from pagedllm.distributed.parallel_state import get_tensor_model_parallel_rank


def _is_norm(name: str, param: torch.Tensor) -> bool:
    return param.dim() == 1 and ("norm" in name.lower()) and not name.endswith("bias")


def initialize_dummy_weights(model: nn.Module, hf_config: Any, seed: int = 0) -> set[str]:
    """Fills every parameter of the materialised `model`; returns their names (all loaded)."""
    std = float(getattr(hf_config, "initializer_range", 0.02) or 0.02)
    rank = get_tensor_model_parallel_rank()
    names: set[str] = set()
    with torch.no_grad():
        for name, param in model.named_parameters():
            names.add(name)
            data = param.data
            if not data.is_floating_point():
                # Packed integer weights of a quantized method: zeros are valid, unless the
                # method says what a plain checkpoint holds (GPTQ's g_idx: row // group).
                init = getattr(param, "dummy_init", None)
                if init is not None:
                    init(data)
                else:
                    data.zero_()
            elif _is_norm(name, data):
                data.fill_(1.0)
            elif name.endswith("bias"):
                data.zero_()
            else:
                gen = torch.Generator(device=data.device)
                gen.manual_seed(seed * 1_000_003 + zlib.crc32(f"{name}:{rank}".encode()))
                # A method that quantizes at load (fp8 on the fly) takes 16-bit values.
                fill = getattr(getattr(param, "weight_loader", None), "fill_dummy", None)
                if data.element_size() >= 2 and fill is None:
                    data.normal_(0.0, std, generator=gen)
                else:  # fp8 and friends have no normal_ kernel
                    tmp = torch.empty(data.shape, dtype=torch.float16, device=data.device)
                    tmp.normal_(0.0, std, generator=gen)
                    if fill is not None:
                        fill(param, tmp)
                    else:
                        data.copy_(tmp)
    return names
