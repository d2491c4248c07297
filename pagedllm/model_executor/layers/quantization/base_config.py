"""QuantizationConfig: what a quantization method needs to know, and which layers it covers.

A config is built either from a checkpoint's `quantization_config` (config.json) or, for
methods that quantize a 16-bit checkpoint at load (fp8, bitsandbytes), from the flag alone.
It hands each linear layer its `LinearMethod`; models never see it (the loader swaps the
methods in on the built model, see `quantize_model`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from pagedllm.model_executor.layers.linear import LinearMethod

T = TypeVar("T")

# Our fused linear layers and the checkpoint modules each one stands for.
PACKED_MODULES: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


class QuantizationConfig:
    """Base class; one subclass per method, registered with `register_quantization_config`.

    Invariants: `get_name()` is vLLM's `--quantization` name; `get_linear_method` returns None
    for layers the method leaves unquantized (the layer keeps its 16-bit weight).
    """

    name: ClassVar[str] = ""
    # Method names a checkpoint's `quant_method` may carry for this config (besides `name`).
    checkpoint_aliases: ClassVar[tuple[str, ...]] = ()
    # True when a 16-bit checkpoint can be quantized at load by the flag alone.
    supports_on_the_fly: ClassVar[bool] = False

    @classmethod
    def get_name(cls) -> str:
        return cls.name

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> QuantizationConfig:
        """From a checkpoint's `quantization_config`; ValueError when it is malformed."""
        raise NotImplementedError

    @classmethod
    def from_model_config(cls, hf_config: Any) -> QuantizationConfig:
        """For a model: from its checkpoint's `quantization_config`, or on the fly when it
        has none. A method reading its format from elsewhere (GGUF's file) overrides this."""
        from pagedllm.model_executor.layers.quantization import checkpoint_quant_config

        qc = checkpoint_quant_config(hf_config)
        return cls.from_config(qc) if qc is not None else cls.for_on_the_fly()

    @classmethod
    def for_on_the_fly(cls) -> QuantizationConfig:
        """For a 16-bit checkpoint quantized at load (only if `supports_on_the_fly`)."""
        raise ValueError(
            f"--quantization {cls.name} needs a checkpoint saved in that format "
            "(its config.json has no quantization_config)"
        )

    def ignored_modules(self) -> list[str] | tuple[str, ...]:
        """The checkpoint's list of modules left unquantized (`is_layer_skipped` entries)."""
        return ()

    def get_linear_method(self, layer: nn.Module, prefix: str) -> LinearMethod | None:
        """The method for the linear layer named `prefix` (our module name, e.g.
        `model.layers.0.self_attn.qkv_proj`), or None to leave it unquantized: None for
        the layers `ignored_modules` names (a fused layer only when all its parts are, a
        mix refused), else `linear_method`."""
        if is_layer_skipped(prefix, self.ignored_modules()):
            return None
        return self.linear_method(layer, prefix)

    def linear_method(self, layer: nn.Module, prefix: str) -> LinearMethod | None:
        """`get_linear_method` for a layer the ignore list does not cover."""
        raise NotImplementedError

    def intercept_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint stream as the model's `load_weights` should see it. A method whose
        checkpoint holds tensors no parameter can take (bitsandbytes' variable-size quant
        states) keeps them here for `process_weights_after_loading`; default: unchanged."""
        return iter(weights)

    def check_device(self, device: torch.device, dtype: torch.dtype) -> None:
        """Raises ValueError when this method cannot run on `device` in `dtype`."""

    @property
    def cuda_graph_safe(self) -> bool:
        """False when the method's kernels sync with the host or change shapes at run time;
        the engine then runs eagerly."""
        return True

    def describe(self) -> str:
        """One line for the start-up log."""
        return self.get_name()


def checkpoint_module_names(prefix: str) -> list[str]:
    """The checkpoint module names a layer of ours stands for: a fused `qkv_proj` is
    `q_proj`, `k_proj` and `v_proj` in the checkpoint."""
    head, _, last = prefix.rpartition(".")
    parts = PACKED_MODULES.get(last)
    if parts is None:
        return [prefix]
    return [f"{head}.{p}" if head else p for p in parts]


def is_layer_skipped(prefix: str, ignored: list[str] | tuple[str, ...]) -> bool:
    """Whether a layer is in an ignore list. Entries match a module name exactly, as a name
    suffix or component (`lm_head`, `down_proj`, `model.layers.0.mlp`), or as a regular
    expression when written `re:PATTERN` (compressed-tensors). A fused layer is skipped only
    if all its parts are; a mix is refused (its shards would need different methods)."""
    if not ignored:
        return False
    names = checkpoint_module_names(prefix)
    hits = [_matches_any(name, ignored) for name in names]
    if any(hits) and not all(hits):
        raise ValueError(
            f"layer {prefix} fuses {', '.join(names)}, but the quantization config ignores only "
            "some of them; pagedllm cannot load a fused layer with mixed quantization"
        )
    return all(hits)


def fused_parts_agree(prefix: str, pick: Callable[[str], T], what: str) -> T:
    """pick(name) for each checkpoint module a layer stands for (`checkpoint_module_names`);
    ValueError when the parts of a fused layer get different answers (one layer cannot hold
    shards of two quantizations). `what` names the deciding config in the message."""
    names = checkpoint_module_names(prefix)
    values = [pick(name) for name in names]
    if any(v is not values[0] and v != values[0] for v in values[1:]):
        raise ValueError(f"layer {prefix} fuses {', '.join(names)}, which {what} quantizes "
                         "differently; pagedllm cannot fuse them")
    return values[0]


def module_matches(name: str, entries: list[str] | tuple[str, ...]) -> bool:
    """Whether the checkpoint module `name` matches an entry of an ignore or target list
    (exact name, suffix, component, or `re:PATTERN`)."""
    return _matches_any(name, entries)


def _matches_any(name: str, ignored: list[str] | tuple[str, ...]) -> bool:
    for entry in ignored:
        if entry.startswith("re:"):
            if re.fullmatch(entry[3:], name) or re.search(entry[3:], name):
                return True
            continue
        if name == entry or name.endswith("." + entry) or f".{entry}." in f".{name}.":
            return True
    return False
