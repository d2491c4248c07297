"""Building a model on the meta device, materialising it once, and streaming its weights in."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from pagedllm.attention.backend import AttentionBackend
from pagedllm.config import ModelConfig
from pagedllm.model_executor.layers.quantization import (
    QuantizationConfig,
    build_quant_config,
    process_weights_after_loading,
    quantize_model,
)
from pagedllm.model_executor.layers.quantization.base_config import checkpoint_module_names
from pagedllm.model_executor.loader.dummy import initialize_dummy_weights
from pagedllm.model_executor.loader.errors import ModelLoadError
from pagedllm.model_executor.loader.gguf_loader import iterate_gguf_weights
from pagedllm.model_executor.loader.kv_scales import KVScaleCollector
from pagedllm.model_executor.loader.safetensors_loader import iterate_hf_weights
from pagedllm.model_executor.models.registry import ModelRegistry

logger = logging.getLogger(__name__)


def iterate_weights(
    model_config: ModelConfig,
    needed: Callable[[str], bool] | None = None,
    quant_config: QuantizationConfig | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named checkpoint tensors of the model, whatever its on-disk format; with `needed`,
    only the names it accepts are read. A GGUF method's `keep_packed` picks the tensors
    handed over as their packed bytes."""
    if model_config.model_format == "gguf":
        return iterate_gguf_weights(model_config.model_path, model_config.hf_config, needed,
                                    getattr(quant_config, "keep_packed", None))
    if model_config.model_format == "hf":
        return iterate_hf_weights(model_config.model_path, needed)
    raise ModelLoadError(f"unknown model format {model_config.model_format!r}")


def init_buffers(model: nn.Module) -> None:
    """Recomputes derived buffers (RoPE tables) that `to_empty` left uninitialised."""
    for module in model.modules():
        init_cache = getattr(module, "init_cache", None)
        if callable(init_cache):
            init_cache()


def materialize(model: nn.Module, device: torch.device) -> None:
    """Allocates every meta-device parameter and buffer on `device` (uninitialised).

    `to_empty` replaces meta parameters with new objects, dropping the loader metadata
    (`weight_loader`, `output_dim`, ...) set on them; it is copied back by name.
    """
    attrs = {
        name: dict(vars(param))
        for name, param in model.named_parameters(remove_duplicate=False)
    }
    model.to_empty(device=device)
    for name, param in model.named_parameters(remove_duplicate=False):
        for key, value in attrs[name].items():
            setattr(param, key, value)
    init_buffers(model)


def load_weights_checked(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    quant_config: QuantizationConfig | None = None,
) -> None:
    """Loads `weights` and raises ModelLoadError naming every parameter left unloaded (and
    the quantization, whose tensors are the usual suspects)."""
    what = f"{quant_config.get_name()} checkpoint" if quant_config is not None else "checkpoint"
    try:
        loaded = model.load_weights(weights)
    except ValueError as e:
        if isinstance(e, ModelLoadError):
            raise
        raise ModelLoadError(f"{what} does not fit the model: {e}") from e
    missing = sorted(name for name, _ in model.named_parameters() if name not in loaded)
    if missing:
        shown = ", ".join(_with_checkpoint_names(n) for n in missing[:20])
        if len(missing) > 20:
            shown += f" ... ({len(missing)} in all)"
        hint = (f" (quantization {quant_config.describe()} expects them)"
                if quant_config is not None else "")
        raise ModelLoadError(f"{what} lacks tensors for these parameters{hint}: {shown}")


def _with_checkpoint_names(param_name: str) -> str:
    """`...qkv_proj.weight_scale` -> that name plus the checkpoint tensors it stands for."""
    module, _, leaf = param_name.rpartition(".")
    parts = checkpoint_module_names(module)
    if parts == [module]:
        return param_name
    return f"{param_name} ({', '.join(f'{p}.{leaf}' for p in parts)})"


def _apply_quantization(
    model: nn.Module, model_config: ModelConfig, device: torch.device
) -> QuantizationConfig | None:
    """Swaps the quantized linear methods into the built (meta) model; None if unquantized."""
    try:
        quant_config = build_quant_config(model_config.quantization, model_config.hf_config)
        if quant_config is None:
            return None
        quant_config.check_device(device, model_config.dtype)
        quantize_model(model, quant_config)
    except ValueError as e:
        if isinstance(e, ModelLoadError):
            raise
        raise ModelLoadError(f"{model_config.quantization} checkpoint: {e}") from e
    return quant_config


def _load_checkpoint(
    model: nn.Module,
    model_config: ModelConfig,
    quant_config: QuantizationConfig | None,
    needed: Callable[[str], bool] | None = None,
) -> None:
    """Streams the checkpoint in (fp8 KV scales picked out on the way) and lets quantized
    methods repack; errors of a quantized load name the method."""
    kv_scales = KVScaleCollector(model)
    weights = kv_scales.filter(iterate_weights(model_config, needed, quant_config))
    if quant_config is None:
        load_weights_checked(model, weights)
    else:
        name = quant_config.get_name()
        try:
            load_weights_checked(model, quant_config.intercept_weights(weights), quant_config)
            process_weights_after_loading(model)
            if hasattr(quant_config, "attach_lm_head"):
                quant_config.attach_lm_head(model)
        except ValueError as e:
            if isinstance(e, ModelLoadError) and str(e).startswith(f"{name} checkpoint"):
                raise  # already names the method
            raise ModelLoadError(f"{name} checkpoint: {e}") from e
    kv_scales.log(getattr(model, "num_layers", 0))


def load_model(
    model_config: ModelConfig, device: torch.device, attn_backend: AttentionBackend
) -> nn.Module:
    """The model of `model_config` on `device` in `model_config.dtype`, in eval mode."""
    hf_config = model_config.hf_config
    try:
        model_cls = ModelRegistry.resolve(getattr(hf_config, "architectures", None))
    except ValueError as e:
        raise ModelLoadError(str(e)) from e
    if model_config.task == "generate" and not getattr(model_cls, "is_causal", True):
        raise ModelLoadError(
            f"{model_cls.__name__} is an encoder-only embedding model and cannot generate text; "
            "load it with task='embed' (--task embed)"
        )
    with torch.device("meta"):
        model = model_cls(hf_config, attn_backend, model_config.dtype)
        quant_config = _apply_quantization(model, model_config, device)
    # One allocation on the target device; values come from the checkpoint next.
    materialize(model, device)
    # A pipeline stage reads only its own layers' tensors.
    needed = getattr(model, "weight_needed", None)
    if model_config.load_format == "dummy":
        initialize_dummy_weights(model, hf_config, model_config.seed)
        if quant_config is not None:
            process_weights_after_loading(model)
    else:
        _load_checkpoint(model, model_config, quant_config, needed)
    logger.info(
        "loaded %s (%s) on %s%s%s", model_config.model_path, model_cls.__name__, device,
        " (dummy weights)" if model_config.load_format == "dummy" else "",
        f", quantization {quant_config.describe()}" if quant_config is not None else "",
    )
    return model.eval()
