"""fp8 (e4m3) W8A8 linear layers: `--quantization fp8` and `quant_method: fp8` checkpoints.

Two sources, one layout after loading:
- on the fly: a 16-bit checkpoint's weights are quantized as they load, one scale per output
  channel (each layer staged in 16 bits only until all its parts arrived, so the load peak
  is the fp8 model plus one layer); activations get a dynamic scale per token.
- pre-quantized (`quant_method: fp8`, as AutoFP8 / llm-compressor / vLLM write it): an e4m3
  `weight`, a per-tensor `weight_scale` and, with `activation_scheme: static`, a per-tensor
  `input_scale`. A fused layer (qkv, gate_up) receives one scale per checkpoint tensor; each
  is kept for its own output rows (no requantization, so no second rounding), and the shards'
  input scales collapse to their maximum (they quantize the same input).

After loading every layer holds `weight` [out, in] e4m3, `weight_scale` [out] fp32 and, for
static activations, `input_scale` [1] fp32; `fp8_gemm.apply_fp8_linear` multiplies.
The compressed-tensors FP8 schemes reuse `Fp8LinearMethod` (see compressed_tensors.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.model_executor.layers.linear import LinearMethod
from pagedllm.model_executor.layers.quantization import register_quantization_config
from pagedllm.model_executor.layers.quantization.base_config import (
    QuantizationConfig,
)
from pagedllm.model_executor.layers.quantization.fp8_gemm import (
    FP8_DTYPE,
    apply_fp8_linear,
    device_has_fp8_gemm,
    dynamic_tensor_scale,
    gemv_linear,
    quantize_weight_per_channel,
)
from pagedllm.model_executor.layers.utils import set_weight_attrs

logger = logging.getLogger(__name__)

ACTIVATION_SCHEMES = ("static", "dynamic")
# Our shard ids of fused layers -> position among the layer's output partitions.
_SHARD_INDEX: dict[Any, int] = {"q": 0, "k": 1, "v": 2}


# How a layer's activations are scaled: "token" (dynamic, one scale per token), "tensor"
# (dynamic, one scale for the whole input), "static" (the checkpoint's per-tensor
# `input_scale`), "none" (weight-only: activations stay 16-bit, the weight is dequantized).
ACTIVATION_STRATEGIES = ("token", "tensor", "static", "none")


@dataclass(frozen=True, slots=True)
class Fp8Scheme:
    """How an fp8 layer's tensors arrive and how its activations are scaled.

    checkpoint: the checkpoint holds e4m3 weights and scales (else: quantized at load).
    weight_strategy: "tensor" (one scale per checkpoint tensor) or "channel" (one per output
    row, a [out, 1] tensor). activations: one of ACTIVATION_STRATEGIES.
    """

    checkpoint: bool
    weight_strategy: str = "channel"
    activations: str = "token"

    def __post_init__(self) -> None:
        if self.weight_strategy not in ("tensor", "channel"):
            raise ValueError(f"fp8 weight strategy {self.weight_strategy!r} is not supported")
        if self.activations not in ACTIVATION_STRATEGIES:
            raise ValueError(f"fp8 activation strategy {self.activations!r} is not supported")

    @property
    def static_input(self) -> bool:
        return self.activations == "static"


def _shard_scale_loader(
    param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None
) -> None:
    """Loads a per-tensor scale into its slot of a [num_shards] parameter: the slot of
    `shard_id` for one part of a fused layer, every slot for an unfused tensor."""
    if loaded_weight.numel() != 1:
        raise ValueError(
            f"shape mismatch: a per-tensor fp8 scale has one element, the checkpoint's has "
            f"shape {tuple(loaded_weight.shape)}"
        )
    value = loaded_weight.reshape(()).to(param.dtype)
    if shard_id is None:
        param.data.fill_(value)
        return
    index = _SHARD_INDEX.get(shard_id, shard_id)
    if not isinstance(index, int) or not 0 <= index < param.shape[0]:
        raise ValueError(f"unknown shard id {shard_id!r} for an fp8 scale")
    param.data[index] = value


class _Fp8WeightLoader:
    """weight_loader of a pre-quantized fp8 weight: the layer's own sharding, after checking
    the checkpoint tensor really is e4m3 (a cast would silently drop its scale)."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    def __call__(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                 shard_id: Any = None) -> None:
        if loaded_weight.dtype != FP8_DTYPE:
            raise ValueError(f"an fp8 weight in the checkpoint has dtype "
                             f"{str(loaded_weight.dtype).removeprefix('torch.')}, expected "
                             "float8_e4m3fn")
        if shard_id is None:
            self.layer.weight_loader(param, loaded_weight)
        else:
            self.layer.weight_loader(param, loaded_weight, shard_id)


class _QuantizeOnLoad:
    """weight_loader of an on-the-fly fp8 weight: the layer's own loader shards each
    checkpoint tensor into a 16-bit staging copy, and once every part of the layer is in its
    rows are quantized (per output row) into the e4m3 parameter and the staging is freed, so
    loading never holds more than one layer in 16 bits."""

    def __init__(self, layer: nn.Module, params_dtype: torch.dtype, num_parts: int) -> None:
        self.layer = layer
        self.params_dtype = params_dtype
        self.num_parts = num_parts
        self.staging: nn.Parameter | None = None
        self.parts: set[Any] = set()
        self.scale: torch.Tensor | None = None  # [out] fp32, once quantized

    def __call__(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                 shard_id: Any = None) -> None:
        if self.staging is None:
            data = torch.empty(param.shape, dtype=self.params_dtype, device=param.device)
            self.staging = nn.Parameter(data, requires_grad=False)
            set_weight_attrs(self.staging, {"input_dim": 1, "output_dim": 0})
        if shard_id is None:
            self.layer.weight_loader(self.staging, loaded_weight)
        else:
            self.layer.weight_loader(self.staging, loaded_weight, shard_id)
        self.parts.add(shard_id)
        if shard_id is None or len(self.parts) == self.num_parts:
            q, self.scale = quantize_weight_per_channel(self.staging.data)
            param.data.copy_(q)
            self.staging = None
            self.parts.clear()

    def fill_dummy(self, param: nn.Parameter, values: torch.Tensor) -> None:
        """`--load-format dummy`: quantizes the random 16-bit `values` of the whole
        parameter's shape as a loaded checkpoint's would be."""
        q, self.scale = quantize_weight_per_channel(values.to(self.params_dtype))
        param.data.copy_(q)


class Fp8LinearMethod(LinearMethod):
    """e4m3 weights with per-output-channel fp32 scales; see the module docstring."""

    def __init__(self, scheme: Fp8Scheme) -> None:
        self.scheme = scheme

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
        layer.fp8_partition_sizes = list(output_partition_sizes)
        weight = nn.Parameter(torch.empty(out, input_size_per_partition, dtype=FP8_DTYPE),
                              requires_grad=False)
        set_weight_attrs(weight, {"input_dim": 1, "output_dim": 0})
        layer.register_parameter("weight", weight)
        if not self.scheme.checkpoint:
            loader = _QuantizeOnLoad(layer, params_dtype, len(output_partition_sizes))
            set_weight_attrs(weight, {"weight_loader": loader})
            return
        set_weight_attrs(weight, {"weight_loader": _Fp8WeightLoader(layer)})
        shards = len(output_partition_sizes)
        if self.scheme.weight_strategy == "channel":
            scale = nn.Parameter(torch.empty(out, 1, dtype=torch.float32), requires_grad=False)
            set_weight_attrs(scale, {"output_dim": 0})
        else:
            scale = nn.Parameter(torch.empty(shards, dtype=torch.float32), requires_grad=False)
            set_weight_attrs(scale, {"weight_loader": _shard_scale_loader})
        layer.register_parameter("weight_scale", scale)
        if self.scheme.static_input:
            input_scale = nn.Parameter(torch.empty(shards, dtype=torch.float32),
                                       requires_grad=False)
            set_weight_attrs(input_scale, {"weight_loader": _shard_scale_loader})
            layer.register_parameter("input_scale", input_scale)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        weight = layer.weight.data
        if not self.scheme.checkpoint:
            loader = layer.weight.weight_loader
            if loader.scale is None:
                raise ValueError("fp8 weight was never loaded")
            q, scale = weight, loader.scale
            loader.layer = None  # the parameter outlives loading; the layer need not
        elif self.scheme.weight_strategy == "channel":
            q, scale = weight, layer.weight_scale.data.reshape(-1)
        else:
            # One scale per fused part, repeated over that part's output rows.
            sizes = torch.tensor(layer.fp8_partition_sizes, device=weight.device)
            q, scale = weight, layer.weight_scale.data.repeat_interleave(sizes)
        if not torch.isfinite(scale).all() or (scale <= 0).any():
            raise ValueError(f"fp8 weight_scale of {type(layer).__name__} is not positive "
                             "and finite")
        del layer.weight
        layer.register_parameter("weight", nn.Parameter(q, requires_grad=False))
        if hasattr(layer, "weight_scale"):
            del layer.weight_scale
        layer.register_parameter(
            "weight_scale", nn.Parameter(scale.float().contiguous(), requires_grad=False))
        if weight.device.type == "cuda":
            from pagedllm.model_executor.layers.ops.split_k import prepare

            prepare(weight.device)  # the GEMV's split-K counters, before any graph capture
        if self.scheme.static_input:
            input_scale = layer.input_scale.data.amax().reshape(1).float()
            del layer.input_scale
            layer.register_parameter("input_scale", nn.Parameter(input_scale,
                                                                 requires_grad=False))

    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        out = gemv_linear(x, layer.weight, layer.weight_scale, bias)
        if out is not None:  # decode-sized: the weight-only GEMV
            return out
        how = self.scheme.activations
        if how == "none":
            w = layer.weight.to(x.dtype) * layer.weight_scale.to(x.dtype)[:, None]
            return F.linear(x, w, bias)
        if how == "static":
            input_scale = layer.input_scale
        elif how == "tensor":
            input_scale = dynamic_tensor_scale(x)
        else:
            input_scale = None
        return apply_fp8_linear(x, layer.weight, layer.weight_scale, input_scale, bias)


@register_quantization_config
class Fp8Config(QuantizationConfig):
    """`--quantization fp8`: a `quant_method: fp8` checkpoint, or a 16-bit one quantized at
    load (per-channel weight scales, dynamic per-token activation scales)."""

    name = "fp8"
    supports_on_the_fly = True

    def __init__(
        self,
        is_checkpoint_fp8: bool,
        activation_scheme: str = "dynamic",
        ignored_layers: list[str] | None = None,
        weight_block_size: tuple[int, int] | None = None,
    ) -> None:
        if activation_scheme not in ACTIVATION_SCHEMES:
            raise ValueError(f"fp8 activation_scheme {activation_scheme!r} is not one of "
                             f"{', '.join(ACTIVATION_SCHEMES)}")
        if not is_checkpoint_fp8 and activation_scheme == "static":
            raise ValueError("static fp8 activation scales need a checkpoint that holds them")
        self.is_checkpoint_fp8 = is_checkpoint_fp8
        self.activation_scheme = activation_scheme
        self.weight_block_size = weight_block_size
        self.ignored_layers = list(ignored_layers or [])
        self.scheme = Fp8Scheme(
            checkpoint=is_checkpoint_fp8,
            weight_strategy="tensor" if is_checkpoint_fp8 else "channel",
            activations="static" if activation_scheme == "static" else "token",
        )

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Fp8Config:
        ignored = config.get("ignored_layers") or config.get("modules_to_not_convert") or []
        block = config.get("weight_block_size")
        activation_scheme = str(config.get("activation_scheme", "dynamic"))
        if block is not None:
            if (not isinstance(block, (list, tuple)) or len(block) != 2
                    or not all(isinstance(b, int) and b > 0 for b in block)):
                raise ValueError(f"fp8 weight_block_size must be two positive integers, got "
                                 f"{block!r}")
            if activation_scheme != "dynamic":
                raise ValueError("block-wise fp8 (weight_block_size) needs activation_scheme "
                                 f"dynamic, got {activation_scheme!r}")
        return cls(is_checkpoint_fp8=True, activation_scheme=activation_scheme,
                   ignored_layers=list(ignored),
                   weight_block_size=tuple(block) if block is not None else None)

    @classmethod
    def for_on_the_fly(cls) -> Fp8Config:
        return cls(is_checkpoint_fp8=False)

    def ignored_modules(self) -> list[str]:
        return self.ignored_layers

    def linear_method(self, layer: nn.Module, prefix: str) -> LinearMethod | None:
        if self.weight_block_size is not None:
            from pagedllm.model_executor.layers.quantization.fp8_block import (
                Fp8BlockLinearMethod,
            )

            return Fp8BlockLinearMethod(self.weight_block_size)
        return Fp8LinearMethod(self.scheme)

    def check_device(self, device: torch.device, dtype: torch.dtype) -> None:
        if device.type == "cuda" and not device_has_fp8_gemm(device):
            logger.warning(
                "this GPU (compute capability < 8.9) has no fp8 matmul: fp8 layers run "
                "emulated (e4m3 values multiplied in fp32), correct but slower than 16-bit"
            )

    def describe(self) -> str:
        if not self.is_checkpoint_fp8:
            return "fp8 (quantized at load: per-channel weights, dynamic per-token activations)"
        if self.weight_block_size is not None:
            return (f"fp8 (checkpoint: {list(self.weight_block_size)} weight blocks, dynamic "
                    "per-token-group activations; emulated in fp32, no block-scaled GEMM yet)")
        return (f"fp8 (checkpoint: per-tensor weight scales, {self.activation_scheme} "
                "activation scales)")
