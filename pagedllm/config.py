"""Frozen engine configuration: model, cache, scheduler, parallelism, device."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class ModelConfig:
    """What model runs and how. `hf_config` is a transformers PretrainedConfig."""

    model: str  # what the user passed (path, .gguf file or hub id)
    model_path: str  # resolved local directory or .gguf file
    model_format: str  # "hf" | "gguf"
    hf_config: Any = field(compare=False, repr=False)
    architecture: str = ""
    dtype: torch.dtype = torch.float32
    max_model_len: int = 2048
    tokenizer: str | None = None  # directory or .gguf file the tokenizer is read from
    served_model_name: tuple[str, ...] = ()
    task: str = "generate"  # "generate" | "embed"
    seed: int = 0
    max_logprobs: int = 20
    trust_remote_code: bool = False
    skip_tokenizer_init: bool = False  # prompts must then be token ids; no text output
    # Quantization method (vLLM's names: fp8, awq, gptq, bitsandbytes, compressed-tensors),
    # from --quantization or the checkpoint's quantization_config; None: unquantized.
    quantization: str | None = None
    # "auto" | "safetensors" | "gguf" | "dummy" (random weights made in place, nothing read).
    load_format: str = "auto"

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config.vocab_size)

    @property
    def name(self) -> str:
        return self.served_model_name[0] if self.served_model_name else self.model


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    enable_prefix_caching: bool = True
    kv_cache_space_gib: float = 4.0  # CPU budget
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    cache_dtype: torch.dtype | None = None  # None: the model dtype
    # vLLM's --kv-cache-dtype: "auto" (the model dtype) or "fp8" / "fp8_e4m3" (e4m3 + scales).
    kv_cache_dtype: str = "auto"
    # One KV cache group of every layer (sliding windows only masked, nothing freed).
    disable_hybrid_kv_cache_manager: bool = False


# --scheduling-policy values: arrival order, or lowest `priority` first then arrival.
SCHEDULING_POLICIES = ("fcfs", "priority")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True
    # Schedule step N+1 while the device runs step N (see EngineCore._step_async).
    async_scheduling: bool = False
    policy: str = "fcfs"  # one of SCHEDULING_POLICIES


# --load-format values ("dummy": random weights made in place, nothing read from disk).
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")

# --distributed-executor-backend values ("uni": the one worker in the engine-core process).
DISTRIBUTED_EXECUTOR_BACKENDS = ("uni", "mp", "ray")
# --data-parallel-backend values.
DATA_PARALLEL_BACKENDS = ("mp", "ray")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # Engine-core replicas behind one front-end (each with tp x pp workers).
    data_parallel_size: int = 1
    # None: "uni" for one worker, "mp" for more on one node.
    distributed_executor_backend: str | None = None
    data_parallel_backend: str = "mp"
    # Pipeline parallelism: keep up to pipeline_parallel_size steps (disjoint micro-batches of
    # requests) in flight across the stages (env PAGEDLLM_PP_BATCH_QUEUE=0 turns it off).
    pp_batch_queue: bool = True

    @property
    def world_size(self) -> int:
        """Workers of one engine core (one data-parallel replica)."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def max_concurrent_batches(self) -> int:
        """Steps the engine core keeps in flight at once (1: one step, or async scheduling's
        one step ahead)."""
        p = self.pipeline_parallel_size
        return p if p > 1 and self.pp_batch_queue else 1


@dataclass(frozen=True)
class DeviceConfig:
    device: str = "cpu"  # "cpu" | "cuda"

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)


@dataclass(frozen=True)
class StructuredOutputsConfig:
    # --structured-outputs-backend: "auto" (xgrammar), "xgrammar" or "guidance" (llguidance).
    backend: str = "auto"


@dataclass(frozen=True)
class EngineConfig:
    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    parallel_config: ParallelConfig = ParallelConfig()
    device_config: DeviceConfig = DeviceConfig()
    enforce_eager: bool = False
    structured_outputs_config: StructuredOutputsConfig = StructuredOutputsConfig()
