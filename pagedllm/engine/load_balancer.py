"""Picks the data-parallel replica for each new request: the least loaded one.

Load is the replica's waiting + running requests from its latest scheduler stats, plus the
requests routed to it that those stats had not seen yet (each engine core reports how many
requests it had taken in when it sent its stats), so a burst spreads at once instead of
piling onto the replica whose stats look emptiest. Ties go to the lower KV-cache usage, then
the lower index. Pure bookkeeping: no sockets, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagedllm.engine.protocol import SchedulerStats


@dataclass(slots=True)
class ReplicaLoad:
    num_waiting: int = 0
    num_running: int = 0
    kv_cache_usage: float = 0.0
    num_routed: int = 0  # requests sent to this replica since start
    num_received: int = 0  # of those, how many its latest stats had taken in
    alive: bool = True

    @property
    def num_pending(self) -> int:
        """Routed here, but not yet counted in the replica's stats."""
        return max(0, self.num_routed - self.num_received)

    @property
    def load(self) -> int:
        return self.num_waiting + self.num_running + self.num_pending


class LoadBalancer:
    """Least-loaded choice over `num_replicas` replicas; dead replicas are never chosen."""

    def __init__(self, num_replicas: int) -> None:
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1; got {num_replicas}")
        self.replicas = [ReplicaLoad() for _ in range(num_replicas)]

    def pick(self) -> int:
        """The index of the replica the next request should go to; LookupError if none lives."""
        best: int | None = None
        best_key: tuple[int, float] | None = None
        for i, r in enumerate(self.replicas):
            if not r.alive:
                continue
            key = (r.load, r.kv_cache_usage)
            if best_key is None or key < best_key:
                best, best_key = i, key
        if best is None:
            raise LookupError("no data-parallel replica is alive")
        return best

    def on_routed(self, index: int, num_requests: int = 1) -> None:
        """`num_requests` engine-core requests (n > 1 fans out into n) were sent to `index`."""
        self.replicas[index].num_routed += num_requests

    def on_stats(self, index: int, stats: SchedulerStats, num_received: int) -> None:
        r = self.replicas[index]
        r.num_waiting = stats.num_waiting_reqs
        r.num_running = stats.num_running_reqs
        r.kv_cache_usage = stats.kv_cache_usage
        r.num_received = max(r.num_received, num_received)

    def mark_dead(self, index: int) -> None:
        self.replicas[index].alive = False
