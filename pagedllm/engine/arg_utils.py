"""EngineArgs: user-facing engine options (vLLM names) turned into a frozen EngineConfig."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch

from pagedllm import envs
from pagedllm.attention.fp8_kv import KV_CACHE_DTYPES
from pagedllm.config import (
    DATA_PARALLEL_BACKENDS,
    DISTRIBUTED_EXECUTOR_BACKENDS,
    LOAD_FORMATS,
    SCHEDULING_POLICIES,
    CacheConfig,
    DeviceConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    StructuredOutputsConfig,
)
from pagedllm.engine.data_parallel import check_gpu_count
from pagedllm.engine.parallel_checks import check_load_format, check_parallel_layout
from pagedllm.executor.base import available_executor_backends
from pagedllm.executor.ray_utils import check_ray_installed
from pagedllm.model_executor.layers.quantization import build_quant_config, resolve_quantization
from pagedllm.model_executor.layers.rotary_embedding import rope_params_from_config

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


@dataclass
class EngineArgs:
    model: str | None = None
    tokenizer: str | None = None
    served_model_name: str | list[str] | None = None
    task: str = "auto"
    dtype: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    enable_prefix_caching: bool = True
    # vLLM's --disable-hybrid-kv-cache-manager: one block table for all layers, no freeing.
    disable_hybrid_kv_cache_manager: bool = False
    enable_chunked_prefill: bool = True
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    seed: int = 0
    gpu_memory_utilization: float = 0.9
    kv_cache_space: float | None = None  # CPU KV cache budget in GiB
    num_gpu_blocks_override: int | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    distributed_executor_backend: str | None = None  # "uni" | "mp" | "ray"; None: pick
    data_parallel_backend: str = "mp"  # "mp" | "ray"
    quantization: str | None = None
    load_format: str = "auto"  # "auto" | "safetensors" | "gguf" | "dummy"
    kv_cache_dtype: str = "auto"  # "auto" | "fp8" | "fp8_e4m3"
    enforce_eager: bool = False
    # None: on for generation on CUDA (host work overlaps the GPU), off on CPU (no overlap
    # to gain: the same cores run the host work and the model).
    async_scheduling: bool | None = None
    scheduling_policy: str = "fcfs"  # or "priority" (vLLM's --scheduling-policy)
    structured_outputs_backend: str = "auto"  # "auto" | "xgrammar" | "guidance"
    device: str = "auto"
    max_logprobs: int = 20
    trust_remote_code: bool = False
    skip_tokenizer_init: bool = False
    revision: str | None = None
    disable_log_stats: bool = False
    # "llm" (offline, the LLM class) or "server": picks the batch-size defaults, as vLLM does.
    usage_context: str = "llm"
    extra: dict = field(default_factory=dict)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def _resolve_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be one of auto, cpu, cuda; got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' was requested but no CUDA GPU is available")
        return self.device

    def _resolve_dtype(self, hf_config, device: str) -> torch.dtype:
        if self.dtype == "auto":
            if device == "cpu":
                # fp32 on CPU: fastest on CPUs without bf16 matrix units, and exact.
                return torch.float32
            cfg = getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", None)
            if isinstance(cfg, str):
                cfg = _DTYPES.get(cfg)
            return cfg if cfg in (torch.float16, torch.bfloat16) else torch.bfloat16
        if isinstance(self.dtype, torch.dtype):
            return self.dtype
        if self.dtype not in _DTYPES:
            raise ValueError(
                f"dtype must be one of auto, float32, bfloat16, float16; got {self.dtype!r}"
            )
        return _DTYPES[self.dtype]

    def create_engine_config(self) -> EngineConfig:
        from pagedllm.model_executor.loader import resolve_model

        self._check_supported()
        resolved = resolve_model(self.model)
        check_load_format(self.load_format, resolved.model_format, resolved.model_path)
        device = self._resolve_device()
        model_config = self._model_config(resolved, device)
        check_parallel_layout(
            self.tensor_parallel_size, self.pipeline_parallel_size, model_config, device,
            local_gpus=not self._ray_places_workers(),
        )
        parallel_config = ParallelConfig(
            tensor_parallel_size=self.tensor_parallel_size,
            pipeline_parallel_size=self.pipeline_parallel_size,
            data_parallel_size=self.data_parallel_size,
            distributed_executor_backend=self.distributed_executor_backend,
            data_parallel_backend=self.data_parallel_backend,
            pp_batch_queue=envs.pp_batch_queue(),
        )
        if device == "cuda" and not self._ray_places_workers():
            check_gpu_count(parallel_config, torch.cuda.device_count())
        return EngineConfig(
            model_config=model_config,
            cache_config=CacheConfig(
                block_size=self.block_size,
                enable_prefix_caching=self.enable_prefix_caching,
                disable_hybrid_kv_cache_manager=self.disable_hybrid_kv_cache_manager,
                kv_cache_space_gib=(
                    envs.cpu_kvcache_space_gib() if self.kv_cache_space is None
                    else self.kv_cache_space
                ),
                gpu_memory_utilization=self.gpu_memory_utilization,
                num_gpu_blocks_override=self.num_gpu_blocks_override,
                kv_cache_dtype=self.kv_cache_dtype,
                cache_dtype=KV_CACHE_DTYPES[self.kv_cache_dtype],
            ),
            scheduler_config=self._scheduler_config(model_config, device),
            parallel_config=parallel_config,
            device_config=DeviceConfig(device),
            enforce_eager=self.enforce_eager or _quantization_needs_eager(model_config),
            structured_outputs_config=StructuredOutputsConfig(self.structured_outputs_backend),
        )  # fmt: skip

    def _check_supported(self) -> None:
        for flag, size in (("--tensor-parallel-size", self.tensor_parallel_size),
                           ("--pipeline-parallel-size", self.pipeline_parallel_size)):  # fmt: skip
            if not isinstance(size, int) or size < 1:
                raise ValueError(f"{flag} must be a positive integer; got {size!r}")
        self._check_data_parallel()
        backend = self.distributed_executor_backend
        if backend is not None and backend not in DISTRIBUTED_EXECUTOR_BACKENDS:
            raise ValueError(
                f"--distributed-executor-backend must be one of "
                f"{', '.join(DISTRIBUTED_EXECUTOR_BACKENDS)}; got {backend!r}"
            )
        if backend is not None and backend not in available_executor_backends():
            raise ValueError(
                f"--distributed-executor-backend {backend} is not available in this build; "
                f"available: {', '.join(available_executor_backends())}"
            )
        check_ray_installed(backend, self.data_parallel_backend, self.data_parallel_size)
        world = self.tensor_parallel_size * self.pipeline_parallel_size
        if backend == "uni" and world > 1:
            raise ValueError(
                f"--distributed-executor-backend uni runs one worker, but tensor x pipeline "
                f"parallel size is {world}; use mp"
            )
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(
                f"--load-format must be one of {', '.join(LOAD_FORMATS)}; got {self.load_format!r}"
            )
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; "
                f"got {self.kv_cache_dtype!r}"
            )
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be one of 8, 16, 32, 64, 128; got {self.block_size}")
        from pagedllm.structured_output.backend import check_backend

        check_backend(self.structured_outputs_backend)  # unknown or not installed: refused
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(
                f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}; "
                f"got {self.scheduling_policy!r}"
            )

    def _ray_places_workers(self) -> bool:
        """Ray puts the workers (or the replicas) on its cluster's GPUs, not this machine's."""
        return self.distributed_executor_backend == "ray" or (
            self.data_parallel_backend == "ray" and self.data_parallel_size > 1
        )

    def _check_data_parallel(self) -> None:
        dp = self.data_parallel_size
        if not isinstance(dp, int) or isinstance(dp, bool) or dp < 1:
            raise ValueError(f"--data-parallel-size must be an integer >= 1; got {dp!r}")
        backend = self.data_parallel_backend
        if backend not in DATA_PARALLEL_BACKENDS:
            raise ValueError(
                f"--data-parallel-backend must be one of {', '.join(DATA_PARALLEL_BACKENDS)}; "
                f"got {backend!r}"
            )
        if backend == "ray" and self.distributed_executor_backend == "mp":
            raise ValueError(
                "--data-parallel-backend ray runs each replica's workers as Ray actors; use "
                "--distributed-executor-backend ray (or leave it unset) instead of mp"
            )

    def _resolve_task(self, archs: list[str]) -> str:
        task = self.task
        if task == "auto":
            from pagedllm.model_executor.models.registry import ModelRegistry

            is_embed = getattr(ModelRegistry, "is_embedding_model", lambda _: False)
            task = "embed" if is_embed(archs) else "generate"
        if task not in ("generate", "embed"):
            raise ValueError(f"task must be one of auto, generate, embed; got {task!r}")
        return task

    def _resolve_max_model_len(self, resolved) -> int:
        derived = _derive_max_model_len(resolved.hf_config)
        cap = getattr(resolved, "max_model_len", None)
        if cap is not None:
            derived = min(derived, cap)
        max_model_len = self.max_model_len or derived
        if max_model_len > derived:
            raise ValueError(
                f"max_model_len={max_model_len} is larger than the model's maximum context length "
                f"({derived}, from its config)"
            )
        return max_model_len

    def _served_names(self, resolved) -> tuple[str, ...]:
        names = self.served_model_name
        if isinstance(names, str):
            names = [names]
        if names:
            return tuple(names)
        return ("SmolLM2-135M-Instruct",) if self.model is None else (self.model,)

    def _model_config(self, resolved, device: str) -> ModelConfig:
        hf_config = resolved.hf_config
        archs = list(getattr(hf_config, "architectures", None) or [])
        return ModelConfig(
            model=self.model or resolved.model_path,
            model_path=resolved.model_path,
            model_format=resolved.model_format,
            hf_config=hf_config,
            architecture=archs[0] if archs else "",
            dtype=self._resolve_dtype(hf_config, device),
            max_model_len=self._resolve_max_model_len(resolved),
            tokenizer=self.tokenizer or resolved.tokenizer_path,
            served_model_name=self._served_names(resolved),
            task=self._resolve_task(archs),
            seed=self.seed,
            max_logprobs=self.max_logprobs,
            trust_remote_code=self.trust_remote_code,
            skip_tokenizer_init=self.skip_tokenizer_init,
            quantization=self._resolve_quantization(resolved, hf_config, device),
            load_format=self.load_format,
        )

    def _resolve_quantization(self, resolved, hf_config, device: str) -> str | None:
        """The flag or checkpoint's method; for a GGUF file on CPU "gguf" (the weights stay
        packed) with `--quantization gguf`, or by default with dtype auto, one rank and the
        AVX512 or AVX2 kernels (PAGEDLLM_CPU_GGUF_PACKED=0 turns the default off); otherwise
        None (dequantized in the model dtype: an explicit --dtype, a GPU, tensor parallelism, a
        CPU with neither AVX512-VNNI nor AVX2, a failed kernel build)."""
        flag = self.quantization
        if resolved.model_format != "gguf":
            return resolve_quantization(flag, hf_config)
        explicit = flag is not None and flag.strip().lower() == "gguf"
        if flag is not None and not explicit:
            return resolve_quantization(flag, hf_config)
        if explicit and device != "cpu":
            raise ValueError("--quantization gguf (packed GGUF kernels) runs on CPU only; on a "
                             "GPU drop the flag and the GGUF weights are dequantized")
        if explicit and self.tensor_parallel_size > 1:
            raise ValueError("--quantization gguf keeps the weights packed on one CPU rank; "
                             "with --tensor-parallel-size > 1 drop the flag (the GGUF weights "
                             "are then dequantized)")
        wanted = explicit or (
            device == "cpu" and self.dtype == "auto" and envs.cpu_gguf_packed()
            and self.tensor_parallel_size == 1 and self.load_format != "dummy"
        )
        if not wanted:
            return None
        from pagedllm.model_executor.layers.quantization import gguf_kernels

        if not gguf_kernels.available():
            return None
        if not explicit and gguf_kernels.isa() == "portable":
            # the portable C++ kernels are ~6x slower than float32 GEMMs (docs/benchmarks.md)
            logger.info("GGUF weights dequantized to float32: this CPU has neither AVX512-VNNI "
                        "nor AVX2 for the packed kernels (--quantization gguf keeps them packed "
                        "anyway)")
            return None
        return "gguf"

    def _default_batch_limits(self, device: str) -> tuple[int, int]:
        """(max_num_seqs, max_num_batched_tokens) when not given, following vLLM's defaults:
        GPUs with at least 70 GiB run 1024 sequences and 16384 tokens a step offline (8192
        behind the server, for latency); smaller GPUs 256 and 8192 (2048 behind the server);
        the CPU 256 and 2048."""
        server = self.usage_context == "server"
        if device != "cuda":
            return 256, 2048
        total = torch.cuda.get_device_properties(0).total_memory
        if total >= 70 * (1 << 30):
            return 1024, 8192 if server else 16384
        return 256, 2048 if server else 8192

    def _scheduler_config(self, model_config: ModelConfig, device: str) -> SchedulerConfig:
        max_model_len = model_config.max_model_len
        default_seqs, default_batched = self._default_batch_limits(device)
        max_num_seqs = self.max_num_seqs or default_seqs
        max_batched = self.max_num_batched_tokens or default_batched
        if not self.enable_chunked_prefill:
            max_batched = max(max_batched, max_model_len)
        if max_batched < max_num_seqs:
            max_num_seqs = max_batched
        async_scheduling = self.async_scheduling
        if async_scheduling is None:
            async_scheduling = device == "cuda"
        return SchedulerConfig(
            max_num_batched_tokens=max_batched,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            enable_chunked_prefill=self.enable_chunked_prefill,
            async_scheduling=async_scheduling and model_config.task == "generate",
            policy=self.scheduling_policy,
        )


def _derive_max_model_len(hf_config) -> int:
    """The config's context length; like vLLM, times the RoPE factor for linear and YaRN
    scaling (YaRN from its original_max_position_embeddings), whose configs keep the
    pretraining length in max_position_embeddings."""
    derived = 2048
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(hf_config, key, None)
        if isinstance(value, int) and value > 0:
            derived = value
            break
    _, scaling = rope_params_from_config(hf_config)
    if isinstance(scaling, dict) and scaling.get("factor"):
        rope_type = scaling.get("rope_type", scaling.get("type"))
        if rope_type == "yarn":
            derived = int(scaling.get("original_max_position_embeddings") or derived)
        if rope_type in ("linear", "yarn"):
            derived = int(derived * float(scaling["factor"]))
    return derived


def _quantization_needs_eager(model_config: ModelConfig) -> bool:
    """Methods whose kernels cannot be captured in CUDA graphs run eagerly, with a warning
    (vLLM does the same for bitsandbytes 8-bit). A malformed config is left to the loader,
    which reports it as a ModelLoadError."""
    if model_config.quantization is None:
        return False
    try:
        quant_config = build_quant_config(model_config.quantization, model_config.hf_config)
    except (ValueError, NotImplementedError):
        return False
    if quant_config is None or quant_config.cuda_graph_safe:
        return False
    logger.warning("%s cannot run in CUDA graphs; running eagerly (as --enforce-eager)",
                   quant_config.describe())
    return True
