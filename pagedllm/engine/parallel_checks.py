"""Start-up refusals of impossible layouts and load formats, each naming the flag to change."""

from __future__ import annotations

import torch

from pagedllm.config import ModelConfig
from pagedllm.model_executor.loader.errors import ModelLoadError

# What each explicit --load-format reads, by resolved model format.
_FORMAT_OF_LOAD = {"safetensors": "hf", "gguf": "gguf"}


def check_load_format(load_format: str, model_format: str, model_path: str) -> None:
    """`safetensors` and `gguf` must match the model found; `auto` and `dummy` fit any."""
    expected = _FORMAT_OF_LOAD.get(load_format)
    if expected is not None and expected != model_format:
        found = "a GGUF file" if model_format == "gguf" else "an HF checkpoint directory"
        raise ModelLoadError(
            f"--load-format {load_format} does not fit {model_path}, which is {found}; use "
            "--load-format auto"
        )
    if load_format == "safetensors":
        from pagedllm.model_executor.loader.safetensors_loader import find_weight_files

        if find_weight_files(model_path)[1] != "safetensors":
            raise ModelLoadError(
                f"--load-format safetensors: {model_path} holds PyTorch .bin weights, no "
                "safetensors; use --load-format auto"
            )


def check_parallel_layout(
    tp: int, pp: int, model_config: ModelConfig, device: str, local_gpus: bool = True
) -> None:
    """Heads, KV heads, MLP width and layers must split over the ranks; the ranks must fit
    the GPUs (this machine's; with `local_gpus` False the Ray executor checks its cluster's
    at start-up). Raises ValueError naming --tensor-parallel-size / --pipeline-parallel-size."""
    cfg = model_config.hf_config
    if tp > 1:
        heads = int(cfg.num_attention_heads)
        if heads % tp:
            raise ValueError(
                f"--tensor-parallel-size {tp} does not divide the model's {heads} attention "
                "heads; choose a divisor of the head count"
            )
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        if kv_heads % tp and tp % kv_heads:
            raise ValueError(
                f"--tensor-parallel-size {tp} and the model's {kv_heads} KV heads: one must "
                "divide the other"
            )
        inter = getattr(cfg, "intermediate_size", None)
        if inter and int(inter) % tp:
            raise ValueError(
                f"--tensor-parallel-size {tp} does not divide the model's intermediate size "
                f"{inter}"
            )
    if pp > 1:
        layers = int(cfg.num_hidden_layers)
        if pp > layers:
            raise ValueError(
                f"--pipeline-parallel-size {pp} exceeds the model's {layers} layers"
            )
        if model_config.task != "generate":
            raise ValueError(
                "--pipeline-parallel-size > 1 supports generative (decoder) models only; "
                "use --tensor-parallel-size for embedding models"
            )
    if device == "cuda" and local_gpus:
        gpus = torch.cuda.device_count()
        if tp * pp > gpus:
            raise ValueError(
                f"--tensor-parallel-size {tp} x --pipeline-parallel-size {pp} = {tp * pp} "
                f"GPUs, but this machine has {gpus}"
            )
