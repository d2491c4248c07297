"""compressed-tensors checkpoints (`quant_method: compressed-tensors`, llm-compressor's format).

The checkpoint's `quantization_config` holds `config_groups` (each: `targets`, `weights`,
`input_activations`, optionally its own `format`), an `ignore` list, a top-level `format`
and an optional `kv_cache_scheme`. Every linear layer is matched to a group by its
checkpoint module names (a fused layer's parts must agree); the group's scheme is matched
against a registry of the schemes pagedllm runs (`register_scheme`), FP8 W8A8 / W8A16 here,
mapped onto the fp8 method. Anything else is refused naming the scheme and the layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from pagedllm.model_executor.layers.linear import LinearMethod
from pagedllm.model_executor.layers.quantization import register_quantization_config
from pagedllm.model_executor.layers.quantization.base_config import (
    QuantizationConfig,
    fused_parts_agree,
    module_matches,
)
from pagedllm.model_executor.layers.quantization.fp8 import Fp8LinearMethod, Fp8Scheme


@dataclass(frozen=True, slots=True)
class QuantArgs:
    """One `weights` / `input_activations` entry of a config group."""

    num_bits: int
    type: str  # "int" | "float"
    strategy: str  # "tensor" | "channel" | "group" | "block" | "token" | ...
    symmetric: bool = True
    dynamic: bool | str = False
    group_size: int | None = None
    block_structure: Any = None
    actorder: Any = None

    @classmethod
    def parse(cls, raw: dict[str, Any] | None, where: str) -> QuantArgs | None:
        if raw is None:
            return None
        try:
            return cls(
                num_bits=int(raw["num_bits"]), type=str(raw.get("type", "int")),
                strategy=str(raw.get("strategy", "tensor")),
                symmetric=bool(raw.get("symmetric", True)), dynamic=raw.get("dynamic", False),
                group_size=raw.get("group_size"), block_structure=raw.get("block_structure"),
                actorder=raw.get("actorder"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"compressed-tensors {where} is malformed ({e!r}): {raw}") from e

    def describe(self) -> str:
        parts = [f"{self.type}{self.num_bits}", self.strategy]
        if self.group_size:
            parts.append(f"group_size {self.group_size}")
        if self.block_structure:
            parts.append(f"block {self.block_structure}")
        if self.dynamic:
            parts.append("dynamic")
        if not self.symmetric:
            parts.append("asymmetric")
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class SchemeGroup:
    """A config group: which modules it covers and how they are quantized."""

    name: str
    targets: tuple[str, ...]
    weights: QuantArgs | None
    input_activations: QuantArgs | None
    format: str

    def describe(self) -> str:
        w = self.weights.describe() if self.weights else "16-bit"
        a = self.input_activations.describe() if self.input_activations else "16-bit"
        bits_w = self.weights.num_bits if self.weights else 16
        bits_a = self.input_activations.num_bits if self.input_activations else 16
        return (f"W{bits_w}A{bits_a} (weights {w}; activations {a}; format {self.format}; "
                f"group {self.name})")

    def covers(self, module_name: str) -> bool:
        # "Linear" targets every linear layer (all our LinearBase layers are Linear in HF).
        return "Linear" in self.targets or module_matches(module_name, self.targets)


# Schemes pagedllm runs: name -> factory returning the layer's method, or None when the
# group is not that scheme. Other methods' modules may register theirs (e.g. int4 W4A16).
SchemeFactory = Callable[[SchemeGroup], LinearMethod | None]
_SCHEMES: dict[str, SchemeFactory] = {}


def register_scheme(name: str) -> Callable[[SchemeFactory], SchemeFactory]:
    def deco(factory: SchemeFactory) -> SchemeFactory:
        _SCHEMES[name] = factory
        return factory

    return deco


def _is_fp8(args: QuantArgs | None) -> bool:
    return args is not None and args.type == "float" and args.num_bits == 8 and args.symmetric


@register_scheme("FP8 W8A8 (tensor/channel weights; static tensor or dynamic token/tensor "
                 "activations)")
def _fp8_w8a8(group: SchemeGroup) -> LinearMethod | None:
    w, a = group.weights, group.input_activations
    if group.format not in ("float-quantized", "naive-quantized") or not _is_fp8(w):
        return None
    if w.dynamic or w.strategy not in ("tensor", "channel") or not _is_fp8(a):
        return None
    if not a.dynamic and a.strategy == "tensor":
        activations = "static"
    elif a.dynamic is True and a.strategy in ("token", "tensor"):
        activations = a.strategy
    else:
        return None
    return Fp8LinearMethod(Fp8Scheme(checkpoint=True, weight_strategy=w.strategy,
                                     activations=activations))


@register_scheme("FP8 W8A16 (tensor/channel weights, 16-bit activations)")
def _fp8_w8a16(group: SchemeGroup) -> LinearMethod | None:
    w = group.weights
    if group.format not in ("float-quantized", "naive-quantized") or not _is_fp8(w):
        return None
    if w.dynamic or w.strategy not in ("tensor", "channel") or group.input_activations:
        return None
    return Fp8LinearMethod(Fp8Scheme(checkpoint=True, weight_strategy=w.strategy,
                                     activations="none"))


def _parse_groups(config: dict[str, Any]) -> list[SchemeGroup]:
    raw_groups = config.get("config_groups")
    if not isinstance(raw_groups, dict) or not raw_groups:
        raise ValueError("compressed-tensors quantization_config has no config_groups")
    top_format = str(config.get("format") or "dense")
    groups = []
    for name, raw in raw_groups.items():
        if not isinstance(raw, dict) or not raw.get("targets"):
            raise ValueError(f"compressed-tensors config group {name!r} has no targets")
        if raw.get("output_activations") is not None:
            raise ValueError(f"compressed-tensors config group {name!r} quantizes output "
                             "activations, which pagedllm does not support")
        groups.append(SchemeGroup(
            name=str(name), targets=tuple(raw["targets"]),
            weights=QuantArgs.parse(raw.get("weights"), f"group {name} weights"),
            input_activations=QuantArgs.parse(raw.get("input_activations"),
                                              f"group {name} input_activations"),
            format=str(raw.get("format") or top_format),
        ))
    return groups


@register_quantization_config
class CompressedTensorsConfig(QuantizationConfig):
    """`quant_method: compressed-tensors`; see the module docstring."""

    name = "compressed-tensors"
    checkpoint_aliases = ("compressed_tensors",)

    def __init__(self, groups: list[SchemeGroup], ignore: list[str],
                 kv_cache_scheme: dict[str, Any] | None = None) -> None:
        self.groups = groups
        self.ignore = ignore
        self.kv_cache_scheme = kv_cache_scheme

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> CompressedTensorsConfig:
        if config.get("sparsity_config"):
            raise ValueError("sparse compressed-tensors checkpoints (sparsity_config) are not "
                             "supported")
        return cls(_parse_groups(config), list(config.get("ignore") or []),
                   config.get("kv_cache_scheme"))

    def _group_of(self, prefix: str) -> SchemeGroup | None:
        return fused_parts_agree(
            prefix, lambda name: next((g for g in self.groups if g.covers(name)), None),
            "the compressed-tensors config")

    def ignored_modules(self) -> list[str]:
        return self.ignore

    def linear_method(self, layer: nn.Module, prefix: str) -> LinearMethod | None:
        group = self._group_of(prefix)
        if group is None or group.weights is None:
            return None
        for factory in _SCHEMES.values():
            method = factory(group)
            if method is not None:
                return method
        raise ValueError(
            f"compressed-tensors scheme {group.describe()} of layer {prefix} is not supported "
            f"by pagedllm; supported: {'; '.join(_SCHEMES)}"
        )

    def describe(self) -> str:
        return "compressed-tensors (" + ", ".join(g.describe() for g in self.groups) + ")"
