"""Model families and the architecture registry."""

from pagedllm.model_executor.models.registry import ModelRegistry

__all__ = ["ModelRegistry"]
