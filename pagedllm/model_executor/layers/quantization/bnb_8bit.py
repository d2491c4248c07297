"""bitsandbytes LLM.int8() checkpoints (`load_in_8bit`), multiplied by `bitsandbytes.matmul`.

transformers saves each 8-bit module `X` as `X.weight` (int8 [n, k], row-wise absmax scaled to
127), `X.SCB` (float32 [n], the row scales) and `X.weight_format` (0: row-major; dropped at
load). Both tensors are split across tensor-parallel ranks by the layer's own loaders, like a
dense weight. The library quantizes activations per row to int8 and, above
`llm_int8_threshold`, computes the outlier columns in 16 bits.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from pagedllm.model_executor.layers.linear import LinearMethod
from pagedllm.model_executor.layers.quantization.bnb_4bit import import_bnb
from pagedllm.model_executor.layers.utils import set_weight_attrs


class _DropCastNotice(logging.Filter):
    """bitsandbytes logs 'inputs will be cast ... to float16' on every 8-bit matmul whose
    input is not fp16 (a training hint); the cast is the method's arithmetic, not news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast" not in record.getMessage()


_CAST_NOTICE_FILTER = _DropCastNotice()


class BitsAndBytes8bitMethod(LinearMethod):
    """int8 weight [out, in] plus row scales SCB [out]; `bitsandbytes.matmul` with a
    `MatmulLtState` holding them (inference only, no fp16 copy of the weight)."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
    ) -> None:
        out = sum(output_partition_sizes)
        weight = nn.Parameter(torch.empty(out, input_size_per_partition, dtype=torch.int8),
                              requires_grad=False)
        set_weight_attrs(weight, {"input_dim": 1, "output_dim": 0})
        scb = nn.Parameter(torch.empty(out, dtype=torch.float32), requires_grad=False)
        set_weight_attrs(scb, {"output_dim": 0})
        layer.register_parameter("weight", weight)
        layer.register_parameter("SCB", scb)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        bnb = import_bnb()
        bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
        if _CAST_NOTICE_FILTER not in bnb_logger.filters:
            bnb_logger.addFilter(_CAST_NOTICE_FILTER)
        state = bnb.MatmulLtState()
        state.CB, state.SCB = layer.weight.data, layer.SCB.data
        state.threshold = self.threshold
        state.has_fp16_weights = False
        state.is_training = False
        layer.bnb_int8_state = state

    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.threshold > 0 and x.is_cuda and torch.cuda.is_current_stream_capturing():
            # The engine runs such configs eagerly (`cuda_graph_safe`); a backstop.
            raise RuntimeError(
                "8-bit bitsandbytes with llm_int8_threshold > 0 picks its outlier columns at "
                "run time and cannot be captured in a CUDA graph; run with --enforce-eager"
            )
        state: Any = layer.bnb_int8_state
        return import_bnb().matmul(x, layer.weight, state=state, bias=bias)
