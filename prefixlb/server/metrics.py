"""The balancer's Prometheus metrics (``prefixlb_*``; units in the names).

One registry per balancer (tests run several in one process). Gauges that mirror state the
router and fleet already hold (in-flight, health, breaker, index size) are read at scrape time
by a collector, so the request path only touches counters and histograms.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

__all__ = ["BalancerMetrics"]

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
DECISION_BUCKETS = (5e-6, 1e-5, 2e-5, 3e-5, 5e-5, 7.5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 5e-3)


class BalancerMetrics:
    def __init__(self, state: Callable[[], list[dict]] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("prefixlb_requests", "Requests answered, by tier, replica and HTTP status",
                                ["tier", "replica", "status"], registry=r)
        self.decision_seconds = Histogram("prefixlb_route_decision_seconds",
                                          "Time to choose a replica (hash + match + score)", ["tier"],
                                          buckets=DECISION_BUCKETS, registry=r)
        self.ttft_seconds = Histogram("prefixlb_ttft_seconds", "Time to first response byte of streamed requests",
                                      ["tier", "replica"], buckets=TTFT_BUCKETS, registry=r)
        self.e2e_seconds = Histogram("prefixlb_request_duration_seconds", "Request duration at the balancer",
                                     ["tier"], buckets=TTFT_BUCKETS, registry=r)
        self.predicted_cached = Counter("prefixlb_predicted_cached_tokens",
                                        "Prompt tokens the router predicted the chosen replica held",
                                        ["tier", "replica"], registry=r)
        self.actual_cached = Counter("prefixlb_actual_cached_tokens",
                                     "Prompt tokens the replica reported cached (usage.prompt_tokens_details)",
                                     ["tier", "replica"], registry=r)
        self.prompt_tokens = Counter("prefixlb_prompt_tokens", "Prompt tokens reported in usage", ["tier"], registry=r)
        self.completion_tokens = Counter("prefixlb_completion_tokens", "Completion tokens reported in usage",
                                         ["tier"], registry=r)
        self.retries = Counter("prefixlb_retries", "Attempts retried on another replica before the first byte",
                               ["tier", "reason"], registry=r)
        self.stream_errors = Counter("prefixlb_stream_errors",
                                     "Streams ended with an error event after the first byte", ["tier"], registry=r)
        self.client_disconnects = Counter("prefixlb_client_disconnects", "Clients that went away mid-request",
                                          ["tier"], registry=r)
        self.cost = Counter("prefixlb_cost_dollars", "Spend by tier at the configured prices", ["tier"], registry=r)
        if state is not None:
            r.register(_StateCollector(state))


class _StateCollector:
    """Gauges read from live state at scrape time: one dict per replica from ``state()``."""

    def __init__(self, state: Callable[[], list[dict]]) -> None:
        self.state = state

    def describe(self):
        return []

    def collect(self):
        rows = self.state()
        inflight = GaugeMetricFamily("prefixlb_inflight_requests", "Requests in flight", labels=["tier", "replica"])
        backlog = GaugeMetricFamily("prefixlb_prefill_backlog_tokens", "Modelled prefill backlog",
                                    labels=["tier", "replica"])
        healthy = GaugeMetricFamily("prefixlb_replica_healthy", "1 if the replica passes health checks",
                                    labels=["tier", "replica"])
        available = GaugeMetricFamily("prefixlb_replica_available", "1 if new work may be routed to the replica",
                                      labels=["tier", "replica"])
        breaker = GaugeMetricFamily("prefixlb_breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open",
                                    labels=["tier", "replica"])
        rate = GaugeMetricFamily("prefixlb_prefill_rate_tokens_per_second", "Learned prefill rate",
                                 labels=["tier", "replica"])
        blocks = GaugeMetricFamily("prefixlb_index_blocks", "Index blocks believed held", labels=["tier", "replica"])
        evictions = GaugeMetricFamily("prefixlb_index_evictions", "Index evictions so far (monotonic)",
                                      labels=["tier", "replica"])
        code = {"closed": 0, "half_open": 1, "open": 2}
        for row in rows:
            lab = [row["tier"], row["url"]]
            inflight.add_metric(lab, row["inflight"])
            backlog.add_metric(lab, row["backlog_tokens"])
            healthy.add_metric(lab, 1 if row["healthy"] else 0)
            available.add_metric(lab, 1 if row["available"] else 0)
            breaker.add_metric(lab, code.get(row["breaker"], 2))
            rate.add_metric(lab, row["prefill_tokens_per_s"])
            blocks.add_metric(lab, row["index_blocks"])
            evictions.add_metric(lab, row["index_evictions"])
        return [inflight, backlog, healthy, available, breaker, rate, blocks, evictions]

