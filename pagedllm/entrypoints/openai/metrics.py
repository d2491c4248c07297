"""Server metrics: Prometheus series (vLLM V1 names under `pagedllm:`) and the periodic log line.

Both loggers implement AsyncLLM's StatLogger protocol: `record(scheduler_stats, iteration)` is
called by the engine's output loop for every batch of outputs. Each server owns its own
CollectorRegistry so several apps in one process never clash.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import CONTENT_TYPE_LATEST as PROMETHEUS_CONTENT_TYPE
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from pagedllm.engine.async_llm import IterationStats
from pagedllm.engine.protocol import SchedulerStats

logger = logging.getLogger("pagedllm.metrics")

# vLLM's exposition has no `*_created` series; keep the output to the documented names.
disable_created_metrics()

__all__ = ["LoggingStatLogger", "PrometheusStatLogger", "PROMETHEUS_CONTENT_TYPE"]

_LATENCY_BUCKETS = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
]


def _token_buckets(max_model_len: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to max_model_len (vLLM's build_1_2_5_buckets)."""
    out: list[float] = []
    exp = 0
    while True:
        for m in (1, 2, 5):
            v = m * 10**exp
            if v > max_model_len:
                return out
            out.append(float(v))
        exp += 1


class PrometheusStatLogger:
    def __init__(self, model_name: str, max_model_len: int, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r, labels = self.registry, ["model_name"]
        self.model_name = model_name

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"pagedllm:{name}", doc, labels, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            # prometheus_client appends `_total`.
            return Counter(f"pagedllm:{name}", doc, labels, registry=r).labels(model_name)

        def hist(name: str, doc: str, buckets: list[float]) -> Histogram:
            return Histogram(f"pagedllm:{name}", doc, labels, buckets=buckets, registry=r).labels(
                model_name
            )

        tokens = _token_buckets(max_model_len)
        self.running = gauge("num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("kv_cache_usage_perc", "KV-cache usage (1 means 100 percent).")
        self.prompt_tokens = counter("prompt_tokens", "Prefill tokens computed.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.prefix_queries = counter("prefix_cache_queries", "Prefix-cache queries, in tokens.")
        self.prefix_hits = counter("prefix_cache_hits", "Prefix-cache hits, in tokens.")
        self.preemptions = counter("num_preemptions", "Preemptions of running requests.")
        self.success = Counter(
            "pagedllm:request_success", "Finished requests by finish reason.",
            ["model_name", "finished_reason"], registry=r,
        )
        for reason in ("stop", "length", "abort"):
            self.success.labels(model_name, reason)
        self.ttft = hist("time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Time between tokens.", _LATENCY_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "Request latency.", _LATENCY_BUCKETS)
        self.queue_time = hist("request_queue_time_seconds", "Time waiting before first schedule.",
                               _LATENCY_BUCKETS)
        self.req_prompt = hist("request_prompt_tokens", "Prompt tokens per request.", tokens)
        self.req_gen = hist("request_generation_tokens", "Generated tokens per request.", tokens)
        self.iter_tokens = hist("iteration_tokens_total", "Tokens scheduled per engine step.",
                                [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384])

    def set_config_info(self, config, num_blocks: int) -> None:
        """Info gauges (value 1, facts in labels): `cache_config_info` as vLLM's, and
        `model_config_info` naming the dtype, quantization and KV-cache dtype."""
        cc, mc = config.cache_config, config.model_config
        cache_labels = {
            "block_size": str(cc.block_size),
            "cache_dtype": cc.kv_cache_dtype,
            "enable_prefix_caching": str(cc.enable_prefix_caching),
            "gpu_memory_utilization": str(cc.gpu_memory_utilization),
            "num_gpu_blocks": str(num_blocks),
        }
        Gauge("pagedllm:cache_config_info", "Information of the KV cache configuration.",
              list(cache_labels), registry=self.registry).labels(**cache_labels).set(1)
        model_labels = {
            "model_name": self.model_name,
            "dtype": str(mc.dtype).removeprefix("torch."),
            "quantization": mc.quantization or "none",
            "kv_cache_dtype": cc.kv_cache_dtype,
        }
        Gauge("pagedllm:model_config_info", "Information of the model configuration.",
              list(model_labels), registry=self.registry).labels(**model_labels).set(1)

    def record(self, stats: SchedulerStats | None, it: IterationStats) -> None:
        if stats is not None:
            self.running.set(stats.num_running_reqs)
            self.waiting.set(stats.num_waiting_reqs)
            self.kv_usage.set(stats.kv_cache_usage)
            self.prompt_tokens.inc(stats.num_prompt_tokens)
            self.generation_tokens.inc(stats.num_generation_tokens)
            self.prefix_queries.inc(stats.prefix_cache_queries)
            self.prefix_hits.inc(stats.prefix_cache_hits)
            self.preemptions.inc(stats.num_preemptions)
            if stats.num_scheduled_tokens:
                self.iter_tokens.observe(stats.num_scheduled_tokens)
        for v in it.time_to_first_tokens:
            self.ttft.observe(v)
        for v in it.inter_token_latencies:
            self.itl.observe(v)
        for f in it.finished_requests:
            self.success.labels(self.model_name, f.finish_reason).inc()
            self.e2e.observe(f.e2e_latency)
            self.queue_time.observe(f.queue_time)
            self.req_prompt.observe(f.num_prompt_tokens)
            self.req_gen.observe(f.num_generation_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class LoggingStatLogger:
    """Accumulates throughput; `maybe_log()` writes one line when there was activity."""

    def __init__(self) -> None:
        self.last_log = time.monotonic()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.last_stats = SchedulerStats()

    def record(self, stats: SchedulerStats | None, it: IterationStats) -> None:
        if stats is None:
            return
        self.last_stats = stats
        self.prompt_tokens += stats.num_prompt_tokens
        self.generation_tokens += stats.num_generation_tokens
        self.prefix_queries += stats.prefix_cache_queries
        self.prefix_hits += stats.prefix_cache_hits

    def maybe_log(self) -> str | None:
        now = time.monotonic()
        elapsed = max(now - self.last_log, 1e-6)
        s = self.last_stats
        busy = self.prompt_tokens or self.generation_tokens or s.num_running_reqs or s.num_waiting_reqs
        if not busy:
            self.last_log = now
            return None
        hit_rate = 100.0 * self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0
        line = (
            f"Avg prompt throughput: {self.prompt_tokens / elapsed:.1f} tokens/s, "
            f"Avg generation throughput: {self.generation_tokens / elapsed:.1f} tokens/s, "
            f"Running: {s.num_running_reqs} reqs, Waiting: {s.num_waiting_reqs} reqs, "
            f"KV cache usage: {100.0 * s.kv_cache_usage:.1f}%, "
            f"Prefix cache hit rate: {hit_rate:.1f}%"
        )
        logger.info(line)
        self.last_log = now
        self.prompt_tokens = self.generation_tokens = 0
        self.prefix_queries = self.prefix_hits = 0
        return line
