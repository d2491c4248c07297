"""Every environment variable pagedllm reads, in one place."""

from __future__ import annotations

import os


def _float(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except ValueError as e:
        raise ValueError(f"environment variable {name}={value!r} is not a number") from e


def cpu_kvcache_space_gib() -> float:
    """KV cache budget on CPU in GiB (vLLM: VLLM_CPU_KVCACHE_SPACE)."""
    return _float("PAGEDLLM_CPU_KVCACHE_SPACE", 4.0)


def distributed_timeout_s() -> float:
    """How long a rank waits in one collective before failing (a dead peer never answers)."""
    return _float("PAGEDLLM_DISTRIBUTED_TIMEOUT", 600.0)


def worker_start_timeout_s() -> float:
    """How long the executor waits for every worker to load its shard."""
    return _float("PAGEDLLM_WORKER_START_TIMEOUT", 1800.0)


def pp_batch_queue() -> bool:
    """Whether pipeline parallelism keeps several micro-batches in flight across its stages
    (PAGEDLLM_PP_BATCH_QUEUE, default 1; 0: one step at a time, for comparison)."""
    return os.environ.get("PAGEDLLM_PP_BATCH_QUEUE", "1") not in ("0", "", "false", "False")


def ray_local_num_cpus() -> int | None:
    """Logical CPUs a local Ray instance started by pagedllm declares (None: the machine's,
    at least one per CPU worker). CPU workers take one each; the count only gates placement."""
    value = _float("PAGEDLLM_RAY_NUM_CPUS", 0.0)
    return int(value) if value > 0 else None


def api_key() -> str | None:
    return os.environ.get("PAGEDLLM_API_KEY") or None


def logging_level() -> str:
    return os.environ.get("PAGEDLLM_LOGGING_LEVEL", "INFO")


def hf_hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def cache_root() -> str:
    """Where pagedllm caches converted artefacts (e.g. GGUF tokenizers)."""
    explicit = os.environ.get("PAGEDLLM_CACHE_ROOT")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pagedllm")


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def int_gemm_unpack() -> str:
    """How the int GEMM expands packed words in registers: "reshape" (default: each word
    loaded once, shifted out along a new axis), "planes" (each word loaded once, one dot per
    bit position) or "gather" (each row loads its word, L1-served). For kernel tuning on the
    GPU; see model_executor/layers/ops/int_gemm.py. On the H200 (docs/benchmarks.md) reshape
    was fastest at most Llama-3.1-8B shapes up to M 64 and planes 5-20x slower from M 64."""
    value = os.environ.get("PAGEDLLM_INT_GEMM_UNPACK", "reshape")
    if value not in ("gather", "reshape", "planes"):
        raise ValueError(f"PAGEDLLM_INT_GEMM_UNPACK={value!r}: choose gather, reshape or "
                         "planes")
    return value


def int_gemm_dense_min_m() -> int:
    """Tokens in a step from which GPTQ/AWQ layers dequantize to a transient 16-bit weight
    and use cuBLAS instead of the fused int GEMM (0: never). 64 by default: on the H200 the
    fused kernel trails dequantize + cuBLAS from there (docs/benchmarks.md)."""
    return int(_float("PAGEDLLM_INT_GEMM_DENSE_MIN_M", 64))


def gemv_max_m(kind: str, default: int) -> int:
    """Tokens in a step up to which `kind` ("int", "fp8" or "dense") layers use the GEMV
    kernels (PAGEDLLM_INT_GEMV_MAX_M / ..._FP8_... / ..._DENSE_...; 0 turns them off, for A/B runs);
    unset: the module constant (model_executor/layers/ops/gemv_config.py)."""
    name = f"PAGEDLLM_{kind.upper()}_GEMV_MAX_M"
    value = _float(name, float(default))
    if value < 0 or value != int(value) or value > 32:
        raise ValueError(f"{name}={os.environ.get(name)!r} must be an integer from 0 to 32")
    return int(value)


def gemv_config_file() -> str | None:
    """A JSON table of GEMV launch configs (benchmarks/gpu_gemv.py --json) read over the
    module's tuned table; unset: that table and the defaults."""
    return os.environ.get("PAGEDLLM_GEMV_CONFIG") or None


def int_gemm_config_file() -> str | None:
    """PAGEDLLM_INT_GEMM_CONFIG: a JSON of int GEMM tiles per M bucket (from
    benchmarks/gpu_int_gemm_sweep.py --json) that replaces the built-in choice; unset: none."""
    return os.environ.get("PAGEDLLM_INT_GEMM_CONFIG") or None


def int_gemm_split_k() -> int | None:
    """A fixed K split for the int GEMM (1: none); unset: chosen per shape."""
    value = os.environ.get("PAGEDLLM_INT_GEMM_SPLIT_K")
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"PAGEDLLM_INT_GEMM_SPLIT_K={value!r} must be a positive integer")
    return int(value)


def apply_openmp_defaults() -> None:
    """Sleep, don't spin, in OpenMP waits unless the user chose otherwise.

    With spinning waits, torch's CPU threads burn both cores of a small machine between
    parallel regions, and any other busy process (the API server, a client) slows each
    engine step by an order of magnitude. Must run before torch is imported to take effect.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def cuda_visible_devices() -> list[str] | None:
    """The user's CUDA_VISIBLE_DEVICES as a list of entries (ids or UUIDs); None when unset.

    Data-parallel replicas each get a slice of it (engine/data_parallel.py).
    """
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return [d.strip() for d in value.split(",") if d.strip()]


def omp_num_threads_set() -> bool:
    """Whether the user chose OpenMP's thread count (then replicas on CPU keep it)."""
    return bool(os.environ.get("OMP_NUM_THREADS"))


def cpu_gguf_packed() -> bool:
    """Whether a GGUF model on CPU (dtype auto) keeps its quantized weights packed (the
    default; PAGEDLLM_CPU_GGUF_PACKED=0 dequantizes them to float32 at load, as before)."""
    return os.environ.get("PAGEDLLM_CPU_GGUF_PACKED", "1") not in ("0", "false", "False", "")


def cpu_gguf_x16() -> bool:
    """Whether packed GGUF decode on an AVX2 CPU rounds x to int16 per 32-group (`mm_x16`,
    the default: 1.4-1.9x the float kernel there); PAGEDLLM_CPU_GGUF_X16=0 keeps x float32
    (`mm_f32`). CPUs with AVX512-VNNI run the float kernel either way."""
    return os.environ.get("PAGEDLLM_CPU_GGUF_X16", "1") not in ("0", "false", "False", "")


def gguf_kernel_build_dir() -> str:
    """Where the GGUF CPU kernels' C++ extension is JIT-built and cached."""
    explicit = os.environ.get("PAGEDLLM_GGUF_KERNEL_DIR")
    return explicit or os.path.join(cache_root(), "gguf_kernels")


def cpu_ops_build_dir() -> str:
    """Where the CPU decode-step ops' C++ extension (pagedllm/cpu_ops) is JIT-built and cached."""
    explicit = os.environ.get("PAGEDLLM_CPU_OPS_DIR")
    return explicit or os.path.join(cache_root(), "cpu_ops")


def cpu_ops_enabled() -> bool:
    """PAGEDLLM_CPU_OPS=0 keeps the plain torch ops on CPU (benchmarks, bisecting)."""
    return os.environ.get("PAGEDLLM_CPU_OPS", "1") not in ("0", "false", "False", "")


def split_kv_min_keys() -> int | None:
    """PAGEDLLM_SPLIT_KV_MIN_KEYS: the fewest keys a split-KV decode partition covers (A/B runs
    of `split_kv_decode.MIN_PARTITION_KEYS`); unset: the module's choice."""
    value = _float("PAGEDLLM_SPLIT_KV_MIN_KEYS", 0.0)
    if value < 0 or value != int(value):
        raise ValueError("PAGEDLLM_SPLIT_KV_MIN_KEYS must be a positive integer")
    return int(value) or None


def engine_core_start_method() -> str:
    """PAGEDLLM_ENGINE_CORE_START_METHOD: how the server starts its engine-core process:
    "fork" (the child starts with the front-end's imports and config already loaded),
    "spawn" (a fresh interpreter), or "auto" (default: fork where the platform has it and the
    front-end has not initialised CUDA, else spawn; vLLM's rule for its workers)."""
    value = os.environ.get("PAGEDLLM_ENGINE_CORE_START_METHOD", "auto").strip().lower() or "auto"
    if value not in ("auto", "fork", "spawn"):
        raise ValueError(f"PAGEDLLM_ENGINE_CORE_START_METHOD={value!r}: use auto, fork or spawn")
    return value
