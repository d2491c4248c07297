"""Block-wise fp8 checkpoints (`quant_method: fp8` with `weight_block_size`, as DeepSeek-V3,
Qwen3-FP8 and transformers' FineGrainedFP8 write them).

The checkpoint holds an e4m3 `weight` [out, in] and `weight_scale_inv` [ceil(out / bn),
ceil(in / bk)]: weight block (i, j) dequantizes as weight * weight_scale_inv[i, j].
Activations are quantized dynamically per token and per group of bk input features.

The product is emulated (both operands dequantized, multiplied in fp32) on every device:
pagedllm has no block-scaled GEMM kernel yet, so these layers are correct but slower than
16-bit ones on a GPU. Tensor parallelism is refused for them (the scale blocks would have to
split with the weight).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagedllm.model_executor.layers.linear import LinearMethod
from pagedllm.model_executor.layers.quantization.fp8_gemm import FP8_DTYPE, FP8_MAX, MIN_SCALE
from pagedllm.model_executor.layers.utils import set_weight_attrs

_SHARD_INDEX: dict[Any, int] = {"q": 0, "k": 1, "v": 2}


def quantize_per_token_group(
    x: torch.Tensor, group: int  # [num_tokens, in], in % group == 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 [num_tokens, in], fp32 scales [num_tokens, in / group])."""
    xg = x.float().view(x.shape[0], -1, group)
    scale = torch.clamp(xg.abs().amax(dim=-1) / FP8_MAX, min=MIN_SCALE)
    q = torch.clamp(xg / scale[..., None], -FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(x.shape), scale


class _BlockScaleLoader:
    """Copies a checkpoint's block-scale tensor, or one fused part's rows of blocks."""

    def __init__(self, layer: nn.Module, block_rows: int) -> None:
        self.layer = layer
        self.block_rows = block_rows

    def __call__(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                 shard_id: Any = None) -> None:
        sizes = self.layer.fp8_partition_sizes
        if shard_id is None:
            start, rows = 0, param.shape[0]
        else:
            index = _SHARD_INDEX.get(shard_id, shard_id)
            start = sum(sizes[:index]) // self.block_rows
            rows = -(-sizes[index] // self.block_rows)
        if tuple(loaded_weight.shape) != (rows, param.shape[1]):
            raise ValueError(f"shape mismatch: weight_scale_inv slice {(rows, param.shape[1])} "
                             f"vs checkpoint {tuple(loaded_weight.shape)}")
        param.data[start:start + rows].copy_(loaded_weight)


class Fp8BlockLinearMethod(LinearMethod):
    """e4m3 weights with one scale per (bn x bk) block; see the module docstring."""

    def __init__(self, block: tuple[int, int]) -> None:
        self.block = block

    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
    ) -> None:
        from pagedllm.model_executor.layers.quantization.fp8 import _Fp8WeightLoader

        bn, bk = self.block
        if getattr(layer, "tp_size", 1) > 1:
            raise ValueError("block-wise fp8 with tensor parallelism is not supported yet")
        if input_size_per_partition % bk or any(s % bn for s in output_partition_sizes[:-1]):
            raise ValueError(
                f"weight_block_size {list(self.block)} does not tile this layer (input "
                f"{input_size_per_partition}, output parts {output_partition_sizes})"
            )
        out = sum(output_partition_sizes)
        layer.fp8_partition_sizes = list(output_partition_sizes)
        weight = nn.Parameter(torch.empty(out, input_size_per_partition, dtype=FP8_DTYPE),
                              requires_grad=False)
        set_weight_attrs(weight, {"input_dim": 1, "output_dim": 0,
                                  "weight_loader": _Fp8WeightLoader(layer)})
        layer.register_parameter("weight", weight)
        rows = sum(-(-s // bn) for s in output_partition_sizes)
        scale = nn.Parameter(torch.empty(rows, input_size_per_partition // bk,
                                         dtype=torch.float32), requires_grad=False)
        set_weight_attrs(scale, {"weight_loader": _BlockScaleLoader(layer, bn)})
        layer.register_parameter("weight_scale_inv", scale)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        scale = layer.weight_scale_inv.data
        if not torch.isfinite(scale).all() or (scale <= 0).any():
            raise ValueError("fp8 weight_scale_inv is not positive and finite")
        # A fused layer's parts each start on a block boundary, so part p's rows of blocks
        # follow part p-1's; expand them to the weight's rows once.
        bn = self.block[0]
        parts = [s.repeat_interleave(bn, dim=0)[:size] for s, size in zip(
            scale.split([-(-size // bn) for size in layer.fp8_partition_sizes]),
            layer.fp8_partition_sizes)]
        # [out, in / bk]: an eighth of the e4m3 weight's bytes.
        layer.register_buffer("weight_row_scale", torch.cat(parts), persistent=False)

    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        xq, xs = quantize_per_token_group(x2, self.block[1])
        x_deq = (xq.float().view(x2.shape[0], -1, self.block[1]) * xs[..., None]).view(x2.shape)
        bk = self.block[1]
        w = layer.weight.float().view(layer.weight.shape[0], -1, bk)
        w_deq = (w * layer.weight_row_scale[..., None]).view(layer.weight.shape)
        out = (x_deq @ w_deq.t()).to(x.dtype)
        if bias is not None:
            out = out + bias
        return out.view(*x.shape[:-1], out.shape[-1])
