"""The balancer's Prometheus metrics (``prefixlb_*``; units in the names).

The request path only adds to plain Python numbers (a dict lookup and an addition per
sample, or only the addition through a series kept at hand: ``_Family.cell``/``child``); the
metric families are built when ``/metrics`` is scraped, by a collector registered
in a private registry (tests run several balancers in one process). prometheus-client's own
Counter/Histogram objects take a lock per update, which cost more than the routing decision
at a few thousand requests a second. Gauges that mirror live state (in-flight, health,
breaker, index size) are read at scrape time from ``state()``.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

__all__ = ["BalancerMetrics", "Cell", "Histogram"]

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
SCORE_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
DECISION_BUCKETS = (5e-6, 1e-5, 2e-5, 3e-5, 5e-5, 7.5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 5e-3)


class Cell:
    """One counter series' value (``_Family.cell``): ``cell.v += amount`` is ``inc``."""

    __slots__ = ("v",)

    def __init__(self) -> None:
        self.v = 0.0


class Histogram:
    """Bucket counts and a sum (cumulated into Prometheus' ``le`` form at scrape time)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, v: float) -> None:
        self.counts[bisect_left(self.bounds, v)] += 1
        self.sum += v

    def buckets(self) -> list[tuple[str, int]]:
        out, acc = [], 0
        for b, c in zip(self.bounds, self.counts):
            acc += c
            out.append((repr(float(b)), acc))
        out.append(("+Inf", acc + self.counts[-1]))
        return out


class _Family:
    """One labelled series family: ``{label values: Cell or Histogram}``, a series added when
    first counted or observed."""

    __slots__ = ("name", "doc", "labels", "kind", "bounds", "series")

    def __init__(self, name: str, doc: str, labels: tuple[str, ...], kind: str, bounds: tuple = ()) -> None:
        self.name, self.doc, self.labels, self.kind, self.bounds = name, doc, labels, kind, bounds
        self.series: dict[tuple[str, ...], object] = {}

    def inc(self, values: tuple[str, ...], amount: float = 1.0) -> None:
        self.cell(values).v += amount

    def cell(self, values: tuple[str, ...] = ()) -> Cell:
        """The counter series of one label set, to add to directly on a hot path (created here,
        as ``inc`` would: call it when about to count)."""
        c = self.series.get(values)
        if c is None:
            c = self.series[values] = Cell()
        return c  # type: ignore[return-value]

    def observe(self, values: tuple[str, ...], v: float) -> None:
        h = self.series.get(values)
        if h is None:
            h = self.series[values] = Histogram(self.bounds)
        h.observe(v)  # type: ignore[union-attr]

    def child(self, values: tuple[str, ...] = ()) -> Histogram:
        """The histogram of one label set, to observe into directly on a hot path (created here,
        as ``observe`` would)."""
        h = self.series.get(values)
        if h is None:
            h = self.series[values] = Histogram(self.bounds)
        return h  # type: ignore[return-value]

    def collect(self):
        if self.kind == "counter":
            fam = CounterMetricFamily(self.name, self.doc, labels=self.labels)
            for lv, c in self.series.items():
                fam.add_metric(list(lv), c.v)  # type: ignore[union-attr]
        else:
            fam = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
            for lv, h in self.series.items():
                fam.add_metric(list(lv), h.buckets(), h.sum)  # type: ignore[union-attr]
        return fam


class BalancerMetrics:
    def __init__(self, state: Callable[[], list[dict]] | None = None) -> None:
        self._state = state
        f = _Family
        self.requests = f("prefixlb_requests", "Requests answered, by tier, replica and HTTP status",
                          ("tier", "replica", "status"), "counter")
        self.decision_seconds = f("prefixlb_route_decision_seconds", "Time to choose a replica (hash + match + score)",
                                  ("tier",), "histogram", DECISION_BUCKETS)
        self.ttft_seconds = f("prefixlb_ttft_seconds", "Time to first response byte of streamed requests",
                              ("tier", "replica"), "histogram", TTFT_BUCKETS)
        self.e2e_seconds = f("prefixlb_request_duration_seconds", "Request duration at the balancer", ("tier",),
                             "histogram", TTFT_BUCKETS)
        self.predicted_cached = f("prefixlb_predicted_cached_tokens",
                                  "Prompt tokens the router predicted the chosen replica held", ("tier", "replica"),
                                  "counter")
        self.actual_cached = f("prefixlb_actual_cached_tokens",
                               "Prompt tokens the replica reported cached (usage.prompt_tokens_details)",
                               ("tier", "replica"), "counter")
        self.prompt_tokens = f("prefixlb_prompt_tokens", "Prompt tokens reported in usage", ("tier",), "counter")
        self.completion_tokens = f("prefixlb_completion_tokens", "Completion tokens reported in usage", ("tier",),
                                   "counter")
        self.retries = f("prefixlb_retries", "Attempts retried on another replica before the first byte",
                         ("tier", "reason"), "counter")
        self.stream_errors = f("prefixlb_stream_errors", "Streams ended with an error event after the first byte",
                               ("tier",), "counter")
        self.client_disconnects = f("prefixlb_client_disconnects", "Clients that went away mid-request", ("tier",),
                                    "counter")
        self.cost = f("prefixlb_cost_dollars", "Spend by tier at the configured prices", ("tier",), "counter")
        self.kv_events = f("prefixlb_kv_events", "KV-cache events applied to the index (precise mode), by kind",
                           ("tier", "replica", "kind"), "counter")
        self.kv_resyncs = f("prefixlb_kv_event_resyncs", "Times a replica's index was rebuilt from its events "
                            "(restart, unrepairable gap, cache reset)", ("tier", "replica"), "counter")
        self.precise_fallbacks = f("prefixlb_precise_fallbacks", "Requests routed on text because tokenizing "
                                   "them as the replica would failed", ("tier",), "counter")
        self.admission_waits = f("prefixlb_admission_waits", "Requests held at the balancer because their replica "
                                 "had its admission budget of prefill outstanding, by how the wait ended (admitted, "
                                 "timeout, cancelled, no_replica)", ("tier", "outcome"), "counter")
        self.admission_wait_seconds = f("prefixlb_admission_wait_seconds", "Time requests were held at the balancer "
                                        "(admission)", ("tier",), "histogram", TTFT_BUCKETS)
        self._families = [self.kv_events, self.kv_resyncs, self.precise_fallbacks, self.requests, self.decision_seconds, self.ttft_seconds, self.e2e_seconds,
                          self.predicted_cached, self.actual_cached, self.prompt_tokens, self.completion_tokens,
                          self.retries, self.stream_errors, self.client_disconnects, self.cost,
                          self.admission_waits, self.admission_wait_seconds]
        # tier routing (prefixlb.server.tiering); its gauges (drift, feedback accuracy) come from
        # ``extra`` collectors, read at scrape time like the replica state
        self.tier_decisions = f("prefixlb_tier_decisions", "Tier decisions, by tier and the pipeline step that made "
                                "them (explicit, rules, classifier, default)", ("tier", "step"), "counter")
        self.tier_decision_seconds = f("prefixlb_tier_decision_seconds", "Time to decide the tier (rules, classifier, "
                                       "per-user offset)", (), "histogram", DECISION_BUCKETS)
        self.classifier_score = f("prefixlb_classifier_score", "Classifier scores: P(a tier above the cheapest is "
                                  "needed), shadow mode included", (), "histogram", SCORE_BUCKETS)
        self.classifier_errors = f("prefixlb_classifier_errors", "Classifier calls that raised (the pipeline went on "
                                   "to the default tier)", (), "counter")
        self.cascade_escalations = f("prefixlb_cascade_escalations", "Cascade escalations, by the tier whose answer "
                                     "was rejected and why", ("tier", "reason"), "counter")
        self.cascade_outcomes = f("prefixlb_cascade_outcomes", "Cascades finished, by outcome (accepted, top, deadline, "
                                  "error_passed) and the tier that answered", ("outcome", "tier"), "counter")
        self.verifier_calls = f("prefixlb_cascade_verifier_calls", "Cascade verifier calls, by result (accept, reject, "
                                "error)", ("result",), "counter")
        self.feedback_labels = f("prefixlb_feedback_labels", "Labels posted to /admin/feedback, by kind and whether "
                                 "the request was still remembered", ("kind", "known"), "counter")
        self._families += [self.tier_decisions, self.tier_decision_seconds, self.classifier_score,
                           self.classifier_errors, self.cascade_escalations, self.cascade_outcomes,
                           self.verifier_calls, self.feedback_labels]
        self.extra: list[Callable[[], list]] = []
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def describe(self):
        return []

    def collect(self):
        for fam in self._families:
            yield fam.collect()
        if self._state is not None:
            yield from _state_families(self._state())
        for extra in self.extra:
            yield from extra()


def _state_families(rows: list[dict]):
    def g(name, doc):
        return GaugeMetricFamily(name, doc, labels=["tier", "replica"])

    inflight = g("prefixlb_inflight_requests", "Requests in flight")
    backlog = g("prefixlb_prefill_backlog_tokens", "Modelled prefill backlog")
    healthy = g("prefixlb_replica_healthy", "1 if the replica passes health checks")
    available = g("prefixlb_replica_available", "1 if new work may be routed to the replica")
    breaker = g("prefixlb_breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open")
    rate = g("prefixlb_prefill_rate_tokens_per_second", "Learned prefill rate")
    blocks = g("prefixlb_index_blocks", "Index blocks believed held")
    pending = g("prefixlb_pending_prefill_tokens", "Uncached prompt tokens sent and not yet prefilled (admission)")
    evictions = CounterMetricFamily("prefixlb_index_evictions", "Index evictions so far", labels=["tier", "replica"])
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
        pending.add_metric(lab, row["pending_prefill_tokens"])
    return [inflight, backlog, healthy, available, breaker, rate, blocks, evictions, pending]
