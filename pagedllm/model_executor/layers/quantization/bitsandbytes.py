"""bitsandbytes quantization (`--quantization bitsandbytes`, `quant_method: bitsandbytes`):
which layers get which method, from the checkpoint's `quantization_config` or the flag alone.

- 4-bit (nf4 / fp4, `bnb_4bit.py`): transformers' `load_in_4bit` checkpoints, and in-flight
  quantization of a 16-bit checkpoint (nf4, double quant, blocksize 64, as vLLM does).
- 8-bit (LLM.int8(), `bnb_8bit.py`): transformers' `load_in_8bit` checkpoints.

All arithmetic is the bitsandbytes library's own (`quantize_4bit`, `matmul_4bit`, `matmul`),
computed in the model dtype (`bnb_4bit_compute_dtype` is not used, as in vLLM).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from pagedllm.model_executor.layers.linear import LinearMethod
from pagedllm.model_executor.layers.quantization import register_quantization_config
from pagedllm.model_executor.layers.quantization.base_config import (
    QuantizationConfig,
    checkpoint_module_names,
)
from pagedllm.model_executor.layers.quantization.bnb_4bit import (
    DEFAULT_BLOCKSIZE,
    QUANT_TYPES,
    BitsAndBytesInflightMethod,
    BitsAndBytesPrequantizedMethod,
    CheckpointTensors,
    import_bnb,
)
from pagedllm.model_executor.layers.quantization.bnb_8bit import BitsAndBytes8bitMethod
from pagedllm.model_executor.loader.errors import ModelLoadError


@register_quantization_config
class BitsAndBytesConfig(QuantizationConfig):
    """bitsandbytes: a transformers checkpoint (`load_in_4bit` / `load_in_8bit`) or in-flight
    4-bit quantization of a 16-bit one.

    `checkpoint_tensors` holds a 4-bit checkpoint's tensors between the loader's stream and
    `process_weights_after_loading`.
    """

    name = "bitsandbytes"
    checkpoint_aliases = ("bitsandbytes-4bit", "bitsandbytes-8bit")
    supports_on_the_fly = True

    def __init__(
        self,
        prequantized: bool,
        bits: int = 4,
        quant_type: str = "nf4",
        double_quant: bool = True,
        blocksize: int = DEFAULT_BLOCKSIZE,
        skip_modules: list[str] | None = None,
        int8_threshold: float = 6.0,
    ) -> None:
        if quant_type not in QUANT_TYPES:
            raise ValueError(
                f"bnb_4bit_quant_type {quant_type!r} is not supported; choose nf4 or fp4"
            )
        self.prequantized = prequantized
        self.bits = bits
        self.quant_type = quant_type
        self.double_quant = double_quant
        self.blocksize = blocksize
        self.skip_modules = list(skip_modules or [])
        self.int8_threshold = int8_threshold
        self.checkpoint_tensors = CheckpointTensors()

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BitsAndBytesConfig:
        def flag(key: str) -> bool:
            # transformers 5 writes both `load_in_4bit` and its private `_load_in_4bit`.
            return bool(config.get(key, config.get("_" + key, False)))

        skip = config.get("llm_int8_skip_modules") or []
        if flag("load_in_8bit"):
            if config.get("llm_int8_has_fp16_weight"):
                raise ValueError("llm_int8_has_fp16_weight checkpoints keep 16-bit weights for "
                                 "training; pagedllm loads inference checkpoints only")
            threshold = config.get("llm_int8_threshold")
            return cls(prequantized=True, bits=8, skip_modules=skip,
                       int8_threshold=6.0 if threshold is None else float(threshold))
        if not flag("load_in_4bit"):
            raise ValueError("the bitsandbytes quantization_config has neither load_in_4bit "
                             "nor load_in_8bit set")
        return cls(
            prequantized=True,
            quant_type=str(config.get("bnb_4bit_quant_type") or "fp4"),
            double_quant=bool(config.get("bnb_4bit_use_double_quant", False)),
            skip_modules=skip,
        )

    @classmethod
    def for_on_the_fly(cls) -> BitsAndBytesConfig:
        return cls(prequantized=False)

    def ignored_modules(self) -> list[str]:
        return self.skip_modules

    def linear_method(self, layer: nn.Module, prefix: str) -> LinearMethod | None:
        if not self.prequantized:
            return BitsAndBytesInflightMethod(self)
        if self.bits == 8:
            return BitsAndBytes8bitMethod(self.int8_threshold)
        if getattr(layer, "tp_size", 1) > 1:
            self.checkpoint_tensors.hold_on_host = True
        for name in checkpoint_module_names(prefix):
            self.checkpoint_tensors.add_module(name)
        return BitsAndBytesPrequantizedMethod(self, prefix)

    def intercept_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        if not self.prequantized:
            return iter(weights)
        if self.bits == 8:
            return _drop_weight_format(weights)
        return self.checkpoint_tensors.intercept(weights)

    def check_device(self, device: torch.device, dtype: torch.dtype) -> None:
        import_bnb()
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"bitsandbytes quantization runs on cuda or cpu, not {device.type}")
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"bitsandbytes quantization computes in float16, bfloat16 or "
                             f"float32, not {dtype}")
        self.checkpoint_tensors.device = device

    @property
    def cuda_graph_safe(self) -> bool:
        # LLM.int8()'s outlier columns are found at run time (a host sync, dynamic shapes).
        return not (self.bits == 8 and self.int8_threshold > 0)

    def describe(self) -> str:
        if self.bits == 8:
            return f"bitsandbytes (pre-quantized 8-bit LLM.int8, threshold {self.int8_threshold})"
        how = "pre-quantized" if self.prequantized else "in-flight"
        dq = ", double quant" if self.double_quant else ""
        return f"bitsandbytes ({how} 4-bit {self.quant_type}{dq})"


def _drop_weight_format(
    weights: Iterable[tuple[str, torch.Tensor]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """8-bit checkpoints: `X.weight_format` says the int8 layout; only row-major (0) exists
    since bitsandbytes 0.45, and it is what the loaders copy."""
    for name, tensor in weights:
        if name.endswith(".weight_format"):
            if tensor.numel() != 1 or int(tensor.reshape(-1)[0]) != 0:
                raise ModelLoadError(
                    f"bitsandbytes checkpoint: {name} is {tensor.tolist()}, not 0 (row-major); "
                    "re-save it with bitsandbytes >= 0.45"
                )
            continue
        yield name, tensor
