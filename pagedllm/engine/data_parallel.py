"""Where data-parallel replicas run: the layout check and each replica's environment.

Replica i of D, each with W = tensor_parallel_size x pipeline_parallel_size workers, owns the
GPUs [i*W, (i+1)*W) of the visible ones (the user's CUDA_VISIBLE_DEVICES if set, else all).
The replica's engine-core process is started with CUDA_VISIBLE_DEVICES narrowed to its slice,
so everything below it (executor, workers, `cuda:0..W-1`) is unaware of data parallelism. On
CPU the replicas split the cores' threads instead.
"""

from __future__ import annotations

from pagedllm import envs
from pagedllm.config import EngineConfig, ParallelConfig


def check_gpu_count(parallel: ParallelConfig, num_gpus: int) -> None:
    """Refuses a layout that needs more GPUs than are visible, naming the flags at fault."""
    dp, world = parallel.data_parallel_size, parallel.world_size
    needed = dp * world
    if needed <= num_gpus:
        return
    layout = (
        f"--tensor-parallel-size {parallel.tensor_parallel_size} x "
        f"--pipeline-parallel-size {parallel.pipeline_parallel_size}"
    )
    if dp > 1:
        layout = f"--data-parallel-size {dp} x {layout}"
    raise ValueError(
        f"{layout} needs {needed} GPUs, but only {num_gpus} are visible "
        "(CUDA_VISIBLE_DEVICES selects which); lower "
        + ("--data-parallel-size" if dp > 1 else "--tensor-parallel-size")
    )


def visible_gpus(num_gpus: int) -> list[str]:
    """The CUDA_VISIBLE_DEVICES entries of the `num_gpus` GPUs this process sees."""
    user = envs.cuda_visible_devices()
    if user is None:
        return [str(i) for i in range(num_gpus)]
    return user[:num_gpus]


def replica_gpus(index: int, world_size: int, visible: list[str]) -> list[str]:
    """The CUDA_VISIBLE_DEVICES entries of replica `index` (W = world_size GPUs each)."""
    devices = visible[index * world_size : (index + 1) * world_size]
    if len(devices) != world_size:
        raise ValueError(
            f"data-parallel replica {index} needs GPUs {index * world_size}.."
            f"{(index + 1) * world_size - 1}, but only {len(visible)} are visible"
        )
    return devices


def replica_env(config: EngineConfig, index: int, num_gpus: int, num_threads: int) -> dict[str, str]:
    """Environment overrides for replica `index`'s engine-core process (empty without DP).

    `num_gpus` is what this process sees (torch.cuda.device_count()); `num_threads` its torch
    thread count, split evenly across replicas on CPU unless OMP_NUM_THREADS was set.
    """
    parallel = config.parallel_config
    dp = parallel.data_parallel_size
    if dp == 1:
        return {}
    if config.device_config.device == "cuda":
        gpus = replica_gpus(index, parallel.world_size, visible_gpus(num_gpus))
        return {"CUDA_VISIBLE_DEVICES": ",".join(gpus)}
    if envs.omp_num_threads_set():
        return {}
    return {"OMP_NUM_THREADS": str(max(1, num_threads // dp))}
