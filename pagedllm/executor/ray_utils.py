"""Ray plumbing shared by the Ray executor and Ray data-parallel replicas.

Owns: importing ray with a refusal that names the flag and the install command; joining a
running cluster or starting a local instance (and remembering which, so shutdown stops only
what it started); placement groups (reusing one the caller holds); the environment every
actor gets; and the start-up check that the cluster has the GPUs (or CPUs) a layout needs.

Ray is an optional extra (`pip install 'pagedllm[ray]'`): nothing here imports it at module
import time, so the rest of pagedllm never needs it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pagedllm import envs
from pagedllm.distributed.parallel_state import NO_MULTICAST_ENV
from pagedllm.executor import ray_reaper

logger = logging.getLogger(__name__)

RAY_INSTALL_HINT = "pip install 'pagedllm[ray]'"
# Seconds to wait for a placement group: a cluster that lacks a resource never places it.
_PLACEMENT_TIMEOUT_S = 120.0


def ray_installed() -> bool:
    return importlib.util.find_spec("ray") is not None


def require_ray(flag: str) -> None:
    """A ValueError naming `flag` and how to install Ray, unless it is installed."""
    if not ray_installed():
        raise ValueError(
            f"{flag} ray needs Ray, which is not installed; install it with {RAY_INSTALL_HINT}"
        )


def import_ray(flag: str) -> Any:
    """The `ray` module (see `require_ray`)."""
    require_ray(flag)
    import ray

    return ray


def check_ray_installed(executor_backend: str | None, dp_backend: str, dp_size: int) -> None:
    """Start-up refusal of a Ray backend without Ray, naming the flag that asked for it."""
    if executor_backend == "ray":
        require_ray("--distributed-executor-backend")
    if dp_backend == "ray" and dp_size > 1:
        require_ray("--data-parallel-backend")


def actor_env_vars() -> dict[str, str]:
    """Environment every pagedllm actor gets (runtime_env env_vars): never NVLink multicast,
    OpenMP waits that sleep (see envs.apply_openmp_defaults), and our log level."""
    env = dict(NO_MULTICAST_ENV)
    env.setdefault("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    env["PAGEDLLM_LOGGING_LEVEL"] = envs.logging_level()
    return env


def _cluster_running(address: str | None) -> bool:
    """Whether ray.init(address) would join an existing cluster (RAY_ADDRESS, or the last
    one `ray start` recorded on this machine) instead of starting a local instance."""
    try:
        from ray._private import services

        return services.canonicalize_bootstrap_address(address) is not None
    except Exception:  # private API moved: fall back to the documented variable
        return bool(address or os.environ.get("RAY_ADDRESS"))


# How many live RayConnections in this process came through a ray.init we made: the last
# one released disconnects (stopping a local instance we started). Executors and replica
# clients of one process share the session.
_INIT_USERS = 0


@dataclass(slots=True)
class RayConnection:
    """One user's hold on this process' Ray session. `initialized_here`: the session came
    from our ray.init (released by the last such user), not from the caller or the actor
    we run in; `started_local`: that ray.init started a local instance."""

    started_local: bool
    initialized_here: bool

    def release(self) -> None:
        """Drops this hold (idempotent); the last hold on our own session disconnects."""
        global _INIT_USERS
        if not self.initialized_here:
            return
        self.initialized_here = False
        _INIT_USERS -= 1
        if _INIT_USERS > 0:
            return
        import ray

        if ray.is_initialized():
            ray.shutdown()
        ray_reaper.stop()


@contextmanager
def _keep_signal_handlers() -> Iterator[None]:
    """ray.init replaces SIGTERM's handler with one that exits at once; the server and the
    engine-core process keep theirs (a graceful drain, then our own shutdown stops Ray)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)


def connect(flag: str, min_cpus: int = 0) -> RayConnection:
    """Joins Ray: reuses an initialised session (inside an actor, or the caller's), else
    connects to the cluster RAY_ADDRESS or `ray start` names, else starts a local instance
    that declares PAGEDLLM_RAY_NUM_CPUS CPUs, by default the machine's but at least
    `min_cpus` (CPU workers take one each)."""
    global _INIT_USERS
    ray = import_ray(flag)
    if ray.is_initialized():
        if _INIT_USERS > 0:  # our own session: hold it too
            _INIT_USERS += 1
            return RayConnection(started_local=False, initialized_here=True)
        return RayConnection(started_local=False, initialized_here=False)
    address = os.environ.get("RAY_ADDRESS") or None
    started_local = not _cluster_running(address)
    kwargs: dict[str, Any] = {"address": address, "logging_level": logging.WARNING}
    if started_local:
        num_cpus = envs.ray_local_num_cpus() or max(os.cpu_count() or 1, min_cpus)
        kwargs.update(include_dashboard=False, num_cpus=num_cpus)
    with _keep_signal_handlers():
        ray.init(**kwargs)
    if started_local:
        ray_reaper.start()
    _INIT_USERS = 1
    logger.info(
        "%s Ray: %s", "started a local" if started_local else "connected to the",
        ray.cluster_resources(),
    )  # fmt: skip
    return RayConnection(started_local=started_local, initialized_here=True)


def worker_bundle(device: str) -> dict[str, float]:
    """One worker's resources: a GPU on CUDA, a CPU core otherwise."""
    return {"GPU": 1.0} if device == "cuda" else {"CPU": 1.0}


def check_cluster_capacity(num_workers: int, device: str, flags: str) -> None:
    """Refuses, naming `flags`, a layout whose workers the cluster can never hold (a
    placement group that does not fit would wait forever)."""
    import ray

    resource = "GPU" if device == "cuda" else "CPU"
    have = int(ray.cluster_resources().get(resource, 0))
    if num_workers > have:
        raise ValueError(
            f"{flags} needs {num_workers} {resource}s, but the Ray cluster has {have}; lower "
            f"the sizes or add nodes (ray start --address ...)"
        )


@dataclass(slots=True)
class Placement:
    """Where each rank's actor goes: `slots[rank] = (placement group, bundle index)`.
    `created` are the groups made here (removed at shutdown)."""

    slots: list[tuple[Any, int]]
    created: list[Any]

    def remove_created(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for pg in self.created:
            try:
                remove_placement_group(pg)
            except Exception:  # the cluster may already be gone
                pass
        self.created = []


def _bundle_fits(bundle: dict[str, float], need: dict[str, float]) -> bool:
    return all(bundle.get(k, 0.0) >= v for k, v in need.items())


def _reuse_placement_group(pg: Any, world_size: int, need: dict[str, float]) -> Placement:
    """Ranks on the first `world_size` bundles of the caller's group that hold a worker."""
    fitting = [i for i, b in enumerate(pg.bundle_specs) if _bundle_fits(b, need)]
    if len(fitting) < world_size:
        raise ValueError(
            f"the current placement group has {len(fitting)} bundles with {need}, but "
            f"{world_size} workers need one each (--tensor-parallel-size x "
            "--pipeline-parallel-size)"
        )
    return Placement(slots=[(pg, i) for i in fitting[:world_size]], created=[])


def place_workers(tp_size: int, pp_size: int, device: str) -> Placement:
    """Placement of tp x pp workers, ranks pipeline-major (rank = stage * tp + tp_rank).

    Reuses the placement group the caller runs in (`get_current_placement_group`, e.g. a
    data-parallel replica actor). Otherwise one STRICT_PACK group per pipeline stage, so a
    tensor-parallel group always shares a node (its all-reduces stay on NVLink) while stages
    may spread over nodes.
    """
    import ray
    from ray.util.placement_group import get_current_placement_group, placement_group

    need = worker_bundle(device)
    current = get_current_placement_group()
    if current is not None:
        return _reuse_placement_group(current, tp_size * pp_size, need)
    check_cluster_capacity(
        tp_size * pp_size, device, f"--tensor-parallel-size {tp_size} x "
        f"--pipeline-parallel-size {pp_size}"
    )  # fmt: skip
    created = [placement_group([dict(need) for _ in range(tp_size)], strategy="STRICT_PACK")
               for _ in range(pp_size)]  # fmt: skip
    placement = Placement(slots=[(pg, i) for pg in created for i in range(tp_size)],
                          created=created)  # fmt: skip
    ready, _ = ray.wait([pg.ready() for pg in created], num_returns=len(created),
                        timeout=_PLACEMENT_TIMEOUT_S)  # fmt: skip
    if len(ready) < len(created):
        placement.remove_created()
        raise ValueError(
            f"Ray could not place {pp_size} group(s) of {tp_size} workers with {need} each on "
            f"one node within {_PLACEMENT_TIMEOUT_S:.0f} s: no node has "
            f"--tensor-parallel-size {tp_size} free {'GPUs' if device == 'cuda' else 'CPUs'}"
        )
    return placement


def scheduling_strategy(pg: Any, bundle_index: int) -> Any:
    """Puts an actor in `pg`'s bundle; its own tasks and actors inherit the group."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(
        placement_group=pg,
        placement_group_bundle_index=bundle_index,
        placement_group_capture_child_tasks=True,
    )
