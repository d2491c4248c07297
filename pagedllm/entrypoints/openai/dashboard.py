"""The built-in live dashboard: `GET /dashboard` (a static page) and `GET /dashboard/stats`
(the JSON it polls every second).

`DashboardStats` is one more stat logger of AsyncLLM: it keeps each replica's latest scheduler
stats (the numbers `/metrics` exports as gauges and counters, so the two agree), the token
totals over the last seconds for tokens/s, and the TTFT / inter-token latencies of the last
`WINDOW_S` seconds for percentiles. The in-flight table is read from the output processor.
The page needs no build step and loads nothing from outside; it is public (it holds no data)
and sends the API key, which it asks for, with each stats request, like every other route.
"""

from __future__ import annotations

import math
import time
from collections import deque
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse

from pagedllm.engine.protocol import SchedulerStats

WINDOW_S = 60.0  # latency percentiles cover this many seconds
RATE_WINDOW_S = 5.0  # tokens/s is averaged over this many seconds
MAX_SAMPLES = 50_000
MAX_TABLE_ROWS = 100
QUANTILES = (0.5, 0.9, 0.99)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class DashboardStats:
    def __init__(self, num_engines: int = 1, clock=time.monotonic) -> None:
        self.clock = clock
        self.engines = [SchedulerStats() for _ in range(num_engines)]
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.num_preemptions_total = 0
        self.finished_total = 0
        self._ttft: deque[tuple[float, float]] = deque(maxlen=MAX_SAMPLES)
        self._itl: deque[tuple[float, float]] = deque(maxlen=MAX_SAMPLES)
        # (time, prompt total, generation total) after each record
        self._totals: deque[tuple[float, int, int]] = deque(maxlen=MAX_SAMPLES)

    def record(self, stats: SchedulerStats | None, iteration, engine_index: int = 0) -> None:
        now = self.clock()
        if stats is not None:
            self.engines[engine_index] = stats
            self.prompt_tokens_total += stats.num_prompt_tokens
            self.generation_tokens_total += stats.num_generation_tokens
            self.num_preemptions_total += stats.num_preemptions
        self._ttft.extend((now, v) for v in iteration.time_to_first_tokens)
        self._itl.extend((now, v) for v in iteration.inter_token_latencies)
        self.finished_total += len(iteration.finished_requests)
        self._totals.append((now, self.prompt_tokens_total, self.generation_tokens_total))

    def _rates(self, now: float) -> tuple[float, float]:
        """(prompt, generation) tokens/s over the last RATE_WINDOW_S seconds."""
        start = now - RATE_WINDOW_S
        totals = self._totals
        while len(totals) > 1 and totals[1][0] <= start:
            totals.popleft()  # keep the last sample at or before the window's start
        base_prompt = base_gen = 0  # no sample that old: every token counted is in the window
        if totals and totals[0][0] <= start:
            _, base_prompt, base_gen = totals[0]
        return ((self.prompt_tokens_total - base_prompt) / RATE_WINDOW_S,
                (self.generation_tokens_total - base_gen) / RATE_WINDOW_S)

    def _latencies(self, samples: deque, now: float) -> dict[str, float | None]:
        while samples and samples[0][0] < now - WINDOW_S:
            samples.popleft()
        values = [v for _, v in samples]
        return {f"p{round(q * 100)}": percentile(values, q) for q in QUANTILES}

    def snapshot(self, engine=None) -> dict:
        now = self.clock()
        prompt_rate, gen_rate = self._rates(now)
        per_engine = [{"engine": i, "running": s.num_running_reqs, "waiting": s.num_waiting_reqs,
                       "kv_cache_usage": s.kv_cache_usage} for i, s in enumerate(self.engines)]
        return {
            "time": time.time(),
            "engines": per_engine,
            "running": sum(e["running"] for e in per_engine),
            "waiting": sum(e["waiting"] for e in per_engine),
            "kv_cache_usage": max(e["kv_cache_usage"] for e in per_engine),
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
            "num_preemptions_total": self.num_preemptions_total,
            "finished_requests_total": self.finished_total,
            "prompt_tokens_per_s": prompt_rate,
            "generation_tokens_per_s": gen_rate,
            "ttft_s": self._latencies(self._ttft, now),
            "tpot_s": self._latencies(self._itl, now),
            "window_s": WINDOW_S,
            "requests": in_flight(engine) if engine is not None else [],
        }


def in_flight(engine) -> list[dict]:
    """One row per engine-core request the server holds, oldest first."""
    now = time.time()
    rows = []
    for state in list(engine.output_processor.requests.values()):
        m = state.metrics
        generated = len(state.detokenizer.token_ids) if state.detokenizer is not None else 0
        rows.append({
            "id": state.request_id,
            "state": "running" if m is not None and m.first_scheduled_time is not None
            else "waiting",
            "prompt_tokens": len(state.prompt_token_ids),
            "generated_tokens": generated,
            "max_tokens": state.params.max_tokens if state.params is not None else None,
            "age_s": now - m.arrival_time if m is not None else None,
            "ttft_s": (m.first_token_time - m.arrival_time)
            if m is not None and m.first_token_time is not None else None,
        })
    rows.sort(key=lambda r: -(r["age_s"] or 0.0))
    return rows[:MAX_TABLE_ROWS]


def dashboard_html() -> str:
    return resources.files(__package__).joinpath("static/dashboard.html").read_text("utf-8")


def install_dashboard_routes(app: FastAPI, stats: DashboardStats) -> None:
    page = dashboard_html()

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/dashboard/stats")
    async def dashboard_stats(request: Request) -> dict:
        return stats.snapshot(getattr(request.app.state, "engine", None))
