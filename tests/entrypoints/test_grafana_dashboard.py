"""examples/grafana/pagedllm.json queries only metrics a live server exports."""

from __future__ import annotations

import json
import os
import re

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DASHBOARD = os.path.join(ROOT, "examples", "grafana", "pagedllm.json")
METRIC = re.compile(r"pagedllm:[a-zA-Z0-9_:]+")


def dashboard_queries() -> list[str]:
    with open(DASHBOARD, encoding="utf-8") as f:
        dash = json.load(f)
    queries = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    queries += [v["query"] for v in dash["templating"]["list"]]
    return queries


def test_dashboard_names_only_exported_series(server):
    # One request so every histogram has observations (and its buckets).
    r = httpx.post(server.url + "/v1/completions", timeout=120,
                   json={"prompt": "Hello", "max_tokens": 3})
    assert r.status_code == 200
    text = httpx.get(server.url + "/metrics").text
    exported = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}
    queries = dashboard_queries()
    used = {m for q in queries for m in METRIC.findall(q)}
    assert len(used) >= 12
    missing = used - exported
    assert not missing, f"the dashboard queries series the server does not export: {missing}"
    for q in queries:
        if "pagedllm:" in q and "label_values" not in q:
            # With -dp > 1 the totals (no engine label) would double every sum.
            assert 'engine!=""' in q, q
        if "histogram_quantile" in q:
            assert "_bucket" in q and "by (le)" in q


def test_dashboard_covers_the_issue_list():
    text = " ".join(dashboard_queries())
    for needed in ("request_success_total", "num_requests_running", "num_requests_waiting",
                   "kv_cache_usage_perc", "prefix_cache_hits_total", "prefix_cache_queries_total",
                   "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
                   "e2e_request_latency_seconds_bucket", "generation_tokens_total",
                   "num_preemptions_total"):
        assert f"pagedllm:{needed}" in text, needed
