"""Finding a model (directory, .gguf file or hub id) and loading its weights."""

from pagedllm.model_executor.loader.model_loader import load_model
from pagedllm.model_executor.loader.resolve import ModelLoadError, ResolvedModel, resolve_model

__all__ = ["ModelLoadError", "ResolvedModel", "load_model", "resolve_model"]
