"""Server metrics: Prometheus series (vLLM V1 names under `pagedllm:`) and the periodic log line.

Both loggers implement AsyncLLM's StatLogger protocol: `record(scheduler_stats, iteration,
engine_index)` is called by the engine's output loop of each data-parallel replica for every
batch of its outputs. Each server owns its own CollectorRegistry so several apps in one
process never clash.
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
from prometheus_client.registry import Collector

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


class _TotalsCollector(Collector):
    """Exposes the per-replica registry plus, for each summable series, its sum over replicas:
    the same name and labels without `engine` (data parallelism only)."""

    def __init__(self, per_engine: CollectorRegistry, skip: frozenset[str]) -> None:
        self.per_engine = per_engine
        self.skip = skip

    def collect(self):
        for family in self.per_engine.collect():
            if family.name not in self.skip:
                sums: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
                for sample in family.samples:
                    key = (sample.name,
                           tuple((k, v) for k, v in sample.labels.items() if k != "engine"))
                    sums[key] = sums.get(key, 0.0) + sample.value
                for (name, labels), value in sums.items():
                    family.add_sample(name, dict(labels), value)
            yield family


# Not summable over replicas: a fraction of each replica's own cache.
_NO_TOTAL = frozenset({"pagedllm:kv_cache_usage_perc"})


class PrometheusStatLogger:
    """Every series carries `model_name` and `engine` (the data-parallel replica, "0".."D-1",
    as in vLLM). With more than one replica each summable series also appears without
    `engine`: the total over replicas."""

    def __init__(self, model_name: str, max_model_len: int, num_engines: int = 1,
                 registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        # With one replica the series are vLLM's exactly; totals would only duplicate them.
        r = self.registry if num_engines == 1 else CollectorRegistry()
        if num_engines > 1:
            self.registry.register(_TotalsCollector(r, _NO_TOTAL))
        labels = ["model_name", "engine"]
        engines = [str(i) for i in range(num_engines)]
        self.model_name = model_name

        def per_engine(metric) -> list:
            return [metric.labels(model_name, e) for e in engines]

        def gauge(name: str, doc: str) -> list[Gauge]:
            return per_engine(Gauge(f"pagedllm:{name}", doc, labels, registry=r))

        def counter(name: str, doc: str) -> list[Counter]:
            # prometheus_client appends `_total`.
            return per_engine(Counter(f"pagedllm:{name}", doc, labels, registry=r))

        def hist(name: str, doc: str, buckets: list[float]) -> list[Histogram]:
            return per_engine(Histogram(f"pagedllm:{name}", doc, labels, buckets=buckets,
                                        registry=r))

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
            ["model_name", "engine", "finished_reason"], registry=r,
        )
        for e in engines:
            for reason in ("stop", "length", "abort"):
                self.success.labels(model_name, e, reason)
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

    def record(self, stats: SchedulerStats | None, it: IterationStats, engine_index: int = 0) -> None:
        i = engine_index
        if stats is not None:
            self.running[i].set(stats.num_running_reqs)
            self.waiting[i].set(stats.num_waiting_reqs)
            self.kv_usage[i].set(stats.kv_cache_usage)
            self.prompt_tokens[i].inc(stats.num_prompt_tokens)
            self.generation_tokens[i].inc(stats.num_generation_tokens)
            self.prefix_queries[i].inc(stats.prefix_cache_queries)
            self.prefix_hits[i].inc(stats.prefix_cache_hits)
            self.preemptions[i].inc(stats.num_preemptions)
            if stats.num_scheduled_tokens:
                self.iter_tokens[i].observe(stats.num_scheduled_tokens)
        for v in it.time_to_first_tokens:
            self.ttft[i].observe(v)
        for v in it.inter_token_latencies:
            self.itl[i].observe(v)
        for f in it.finished_requests:
            self.success.labels(self.model_name, str(i), f.finish_reason).inc()
            self.e2e[i].observe(f.e2e_latency)
            self.queue_time[i].observe(f.queue_time)
            self.req_prompt[i].observe(f.num_prompt_tokens)
            self.req_gen[i].observe(f.num_generation_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class LoggingStatLogger:
    """Accumulates throughput per replica; `maybe_log()` writes one line per replica that saw
    activity (prefixed `Engine 000:` etc. under data parallelism, as vLLM does)."""

    def __init__(self, num_engines: int = 1) -> None:
        self.engines = [_EngineTally() for _ in range(num_engines)]

    def record(self, stats: SchedulerStats | None, it: IterationStats, engine_index: int = 0) -> None:
        if stats is None:
            return
        t = self.engines[engine_index]
        t.last_stats = stats
        t.prompt_tokens += stats.num_prompt_tokens
        t.generation_tokens += stats.num_generation_tokens
        t.prefix_queries += stats.prefix_cache_queries
        t.prefix_hits += stats.prefix_cache_hits

    def maybe_log(self) -> str | None:
        lines = []
        for i, t in enumerate(self.engines):
            line = t.take_line()
            if line is not None:
                lines.append(line if len(self.engines) == 1 else f"Engine {i:03d}: {line}")
        for line in lines:
            logger.info(line)
        return "\n".join(lines) if lines else None


class _EngineTally:
    """One replica's counts since its last log line."""

    def __init__(self) -> None:
        self.last_log = time.monotonic()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.last_stats = SchedulerStats()

    def take_line(self) -> str | None:
        now = time.monotonic()
        elapsed = max(now - self.last_log, 1e-6)
        s = self.last_stats
        busy = self.prompt_tokens or self.generation_tokens or s.num_running_reqs or s.num_waiting_reqs
        self.last_log = now
        if not busy:
            return None
        hit_rate = 100.0 * self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0
        line = (
            f"Avg prompt throughput: {self.prompt_tokens / elapsed:.1f} tokens/s, "
            f"Avg generation throughput: {self.generation_tokens / elapsed:.1f} tokens/s, "
            f"Running: {s.num_running_reqs} reqs, Waiting: {s.num_waiting_reqs} reqs, "
            f"KV cache usage: {100.0 * s.kv_cache_usage:.1f}%, "
            f"Prefix cache hit rate: {hit_rate:.1f}%"
        )
        self.prompt_tokens = self.generation_tokens = 0
        self.prefix_queries = self.prefix_hits = 0
        return line
