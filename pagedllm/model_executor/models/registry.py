"""Maps HF `architectures` names to model classes, importing each family lazily."""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

# architecture name -> (module under pagedllm.model_executor.models, class name)
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
    "GemmaForCausalLM": ("gemma", "GemmaForCausalLM"),
    "Gemma2ForCausalLM": ("gemma2", "Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": ("gemma3", "Gemma3ForCausalLM"),
    "Gemma3ForConditionalGeneration": ("gemma3", "Gemma3ForConditionalGeneration"),
    "Phi3ForCausalLM": ("phi3", "Phi3ForCausalLM"),
    "MixtralForCausalLM": ("mixtral", "MixtralForCausalLM"),
    "Qwen2MoeForCausalLM": ("qwen2_moe", "Qwen2MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("qwen3_moe", "Qwen3MoeForCausalLM"),
    "BertModel": ("bert", "BertModel"),
    "RobertaModel": ("bert", "RobertaModel"),
    "XLMRobertaModel": ("bert", "XLMRobertaModel"),
}
# Multimodal wrappers served as their language model: the engine sees their `text_config`.
_TEXT_ONLY_WRAPPERS: set[str] = {"Gemma3ForConditionalGeneration"}
# Encoder-only architectures: they only embed, so task="auto" means "embed" for them.
_EMBEDDING_ARCHS: set[str] = {"BertModel", "RobertaModel", "XLMRobertaModel"}


class ModelRegistry:
    """Class-level registry; new families add one entry (or call `register`)."""

    @staticmethod
    def get_supported_archs() -> list[str]:
        return sorted(_MODELS)

    @staticmethod
    def register(
        architecture: str, module: str, class_name: str, is_embedding: bool = False
    ) -> None:
        _MODELS[architecture] = (module, class_name)
        if is_embedding:
            _EMBEDDING_ARCHS.add(architecture)

    @staticmethod
    def is_embedding_model(architectures: list[str] | None) -> bool:
        """True when the first supported name in `architectures` is an embedding-only model."""
        for name in architectures or []:
            if name in _MODELS:
                return name in _EMBEDDING_ARCHS
        return False

    @staticmethod
    def served_config(hf_config: Any) -> Any:
        """The config the engine and the model work from: a multimodal wrapper's text_config
        (keeping the wrapper's `architectures`, which picks the class that maps its checkpoint
        names), else `hf_config` itself."""
        archs = list(getattr(hf_config, "architectures", None) or [])
        for name in archs:
            if name in _MODELS:
                text = getattr(hf_config, "text_config", None)
                if name in _TEXT_ONLY_WRAPPERS and text is not None:
                    text.architectures = archs
                    return text
                break
        return hf_config

    @staticmethod
    def is_supported(architecture: str) -> bool:
        return architecture in _MODELS

    @staticmethod
    def resolve(architectures: list[str] | None) -> type[nn.Module]:
        """The class for the first supported name in `architectures`; ValueError otherwise."""
        names = list(architectures or [])
        for name in names:
            if name in _MODELS:
                module_name, class_name = _MODELS[name]
                module = importlib.import_module(f"pagedllm.model_executor.models.{module_name}")
                return getattr(module, class_name)
        shown = ", ".join(names) if names else "(none)"
        raise ValueError(
            f"model architecture {shown} is not supported; supported architectures: "
            f"{', '.join(ModelRegistry.get_supported_archs())}"
        )
