"""Quantization methods: a registry keyed by vLLM's `--quantization` name, and resolution of
the method a model runs with (the flag, the checkpoint's `quantization_config`, or both).

One module per method registers its `QuantizationConfig` subclass. `quantize_model` gives
each linear layer of a built (meta-device) model its method; `process_weights_after_loading`
lets the methods repack or quantize once the checkpoint is in.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from torch import nn

from pagedllm.model_executor.layers.quantization.base_config import QuantizationConfig

logger = logging.getLogger(__name__)

# vLLM's names for the methods pagedllm knows about (registered or not yet).
QUANTIZATION_METHODS: tuple[str, ...] = (
    "fp8", "awq", "gptq", "bitsandbytes", "compressed-tensors", "gguf",
)
# Module (under this package) that registers each method; imported on first use.
_METHOD_MODULES: dict[str, str] = {
    "fp8": "fp8",
    "awq": "awq",
    "gptq": "gptq",
    "bitsandbytes": "bitsandbytes",
    "compressed-tensors": "compressed_tensors",
    "gguf": "gguf",
}
_REGISTRY: dict[str, type[QuantizationConfig]] = {}


def register_quantization_config(cls: type[QuantizationConfig]) -> type[QuantizationConfig]:
    """Class decorator: registers `cls` under `cls.name`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def get_quantization_config_cls(method: str) -> type[QuantizationConfig]:
    """The config class of a `--quantization` name; ValueError naming the choices."""
    method = normalize_method_name(method)
    if method not in _REGISTRY and method in _METHOD_MODULES:
        try:
            importlib.import_module(f"{__name__}.{_METHOD_MODULES[method]}")
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith(__name__):
                raise NotImplementedError(
                    f"quantization method {method!r} is not implemented yet in pagedllm"
                ) from e
            raise
    if method not in _REGISTRY:
        raise ValueError(
            f"unknown quantization method {method!r}; choose one of "
            f"{', '.join(QUANTIZATION_METHODS)}"
        )
    return _REGISTRY[method]


def normalize_method_name(method: str) -> str:
    """Checkpoints spell some names differently (`compressed_tensors`, `bitsandbytes_4bit`);
    vLLM's kernel-specific names (`gptq_marlin`, `awq_marlin`) run pagedllm's one method."""
    m = method.strip().lower().replace("_", "-")
    return {"bitsandbytes-4bit": "bitsandbytes", "bnb": "bitsandbytes",
            "gptq-marlin": "gptq", "awq-marlin": "awq"}.get(m, m)


def checkpoint_quant_config(hf_config: Any) -> dict[str, Any] | None:
    """The `quantization_config` dict of a checkpoint's config, if any."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    if not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(vars(qc))
    return qc


# Files older AutoGPTQ / AutoAWQ checkpoints keep beside config.json instead of its
# `quantization_config`, and the method each implies when the file names none.
STANDALONE_CONFIG_FILES: tuple[tuple[str, str], ...] = (
    ("quantize_config.json", "gptq"),
    ("quant_config.json", "awq"),
)


def standalone_quant_config(model_dir: str) -> dict[str, Any] | None:
    """The quantization config of a checkpoint directory whose config.json has none."""
    import json
    import os

    for filename, method in STANDALONE_CONFIG_FILES:
        path = os.path.join(model_dir, filename)
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    qc = json.load(f)
            except (OSError, ValueError) as e:
                raise ValueError(f"unreadable quantization config {path}: {e}") from e
            if not isinstance(qc, dict):
                raise ValueError(f"quantization config {path} is not a JSON object")
            qc.setdefault("quant_method", method)
            return qc
    return None


def resolve_quantization(flag: str | None, hf_config: Any) -> str | None:
    """The method the model runs with: the checkpoint's, checked against the flag; or the
    flag alone for a 16-bit checkpoint (on-the-fly methods only). ValueError on a conflict."""
    qc = checkpoint_quant_config(hf_config)
    if qc is None:
        if flag is None:
            return None
        cls = get_quantization_config_cls(flag)
        if not cls.supports_on_the_fly:
            cls.for_on_the_fly()  # raises with the method's own message
        return cls.get_name()
    raw = qc.get("quant_method")
    if not raw:
        raise ValueError("the checkpoint's quantization_config has no quant_method")
    ckpt_cls = _cls_for_checkpoint_method(str(raw))
    if flag is not None:
        flag_cls = get_quantization_config_cls(flag)
        if flag_cls is not ckpt_cls:
            raise ValueError(
                f"--quantization {flag} contradicts the checkpoint, which is quantized with "
                f"{raw!r} (its config.json quantization_config); drop the flag or pass "
                f"--quantization {ckpt_cls.get_name()}"
            )
    return ckpt_cls.get_name()


def _cls_for_checkpoint_method(raw: str) -> type[QuantizationConfig]:
    name = normalize_method_name(raw)
    for method in QUANTIZATION_METHODS:
        try:
            cls = get_quantization_config_cls(method)
        except NotImplementedError:
            continue
        if name == cls.get_name() or name in cls.checkpoint_aliases:
            return cls
    return get_quantization_config_cls(name)


def build_quant_config(method: str | None, hf_config: Any) -> QuantizationConfig | None:
    """The config object for a resolved method (see `resolve_quantization`)."""
    if method is None:
        return None
    return get_quantization_config_cls(method).from_model_config(hf_config)


def quantize_model(model: nn.Module, quant_config: QuantizationConfig) -> int:
    """Gives every linear layer of a built, unloaded model its quantized method; returns
    how many layers got one."""
    from pagedllm.model_executor.layers.linear import LinearBase

    count = 0
    for prefix, module in model.named_modules():
        if isinstance(module, LinearBase):
            method = quant_config.get_linear_method(module, prefix)
            if method is not None:
                try:
                    module.replace_linear_method(method)
                except ValueError as e:
                    raise ValueError(f"layer {prefix}: {e}") from e
                count += 1
    return count


def process_weights_after_loading(model: nn.Module) -> None:
    """Lets each linear layer's method repack / quantize its loaded weights; a ValueError
    names the layer."""
    from pagedllm.model_executor.layers.linear import LinearBase

    for prefix, module in model.named_modules():
        if isinstance(module, LinearBase):
            try:
                module.linear_method.process_weights_after_loading(module)
            except ValueError as e:
                raise ValueError(f"layer {prefix}: {e}") from e


__all__ = [
    "QUANTIZATION_METHODS",
    "QuantizationConfig",
    "build_quant_config",
    "get_quantization_config_cls",
    "process_weights_after_loading",
    "quantize_model",
    "register_quantization_config",
    "resolve_quantization",
]
