"""GET /v1/models and /v1/models/{id}: the served model names (aliases of one model)."""

from __future__ import annotations

import time

from pagedllm.entrypoints.openai.errors import APIError


class OpenAIServingModels:
    """Model cards; besides OpenAI's fields (and vLLM's root / parent / max_model_len) each
    names the quantization (None when unquantized) and the KV-cache dtype."""

    def __init__(
        self,
        served_model_names: list[str],
        root: str,
        max_model_len: int,
        quantization: str | None = None,
        kv_cache_dtype: str = "auto",
    ) -> None:
        self.served_model_names = served_model_names
        self.root = root
        self.max_model_len = max_model_len
        self.quantization = quantization
        self.kv_cache_dtype = kv_cache_dtype
        self.created = int(time.time())

    def card(self, name: str) -> dict:
        return {
            "id": name,
            "object": "model",
            "created": self.created,
            "owned_by": "pagedllm",
            "root": self.root,
            "parent": None,
            "max_model_len": self.max_model_len,
            "quantization": self.quantization,
            "kv_cache_dtype": self.kv_cache_dtype,
        }

    def list_models(self) -> dict:
        return {"object": "list", "data": [self.card(n) for n in self.served_model_names]}

    def get_model(self, model_id: str) -> dict:
        if model_id not in self.served_model_names:
            raise APIError(f"The model `{model_id}` does not exist.", 404, param="model",
                           code="model_not_found")
        return self.card(model_id)
