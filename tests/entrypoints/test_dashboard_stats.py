"""DashboardStats: tokens/s over its window, latency percentiles over theirs (fake clock)."""

from __future__ import annotations

from pagedllm.engine.async_llm import IterationStats
from pagedllm.engine.protocol import SchedulerStats
from pagedllm.entrypoints.openai.dashboard import (
    RATE_WINDOW_S,
    WINDOW_S,
    DashboardStats,
    percentile,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_percentile_nearest_rank():
    assert percentile([], 0.5) is None
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([3.0], 0.9) == 3.0


def test_rates_and_windows_per_engine():
    clock = Clock()
    stats = DashboardStats(num_engines=2, clock=clock)
    stats.record(SchedulerStats(num_generation_tokens=100, num_prompt_tokens=50,
                                num_running_reqs=2, kv_cache_usage=0.25),
                 IterationStats(time_to_first_tokens=[0.5]), engine_index=0)
    clock.now += RATE_WINDOW_S + 1  # the first step leaves the rate window
    stats.record(SchedulerStats(num_generation_tokens=20, num_waiting_reqs=3,
                                kv_cache_usage=0.5),
                 IterationStats(inter_token_latencies=[0.01, 0.03]), engine_index=1)
    snap = stats.snapshot()
    assert snap["generation_tokens_total"] == 120 and snap["prompt_tokens_total"] == 50
    assert snap["generation_tokens_per_s"] == 20 / RATE_WINDOW_S
    assert snap["prompt_tokens_per_s"] == 0
    assert (snap["running"], snap["waiting"], snap["kv_cache_usage"]) == (2, 3, 0.5)
    assert [e["engine"] for e in snap["engines"]] == [0, 1]
    assert snap["ttft_s"]["p50"] == 0.5 and snap["tpot_s"]["p99"] == 0.03
    clock.now += WINDOW_S + 1  # every latency sample ages out
    snap = stats.snapshot()
    assert snap["ttft_s"] == {"p50": None, "p90": None, "p99": None}
    assert snap["generation_tokens_per_s"] == 0
