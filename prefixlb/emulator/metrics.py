"""``/metrics`` of one emulated replica: vLLM's Prometheus names, labels and buckets.

Each replica has its own ``CollectorRegistry``, so many replicas can live in one process.
Series carry ``model_name`` (the served model name) and ``engine="0"`` like vLLM's
``PrometheusStatLogger``. Counters and gauges are read from the engine's counters as last
published by the replica's driver (after a step's outputs take effect), so a scrape never runs
ahead of the responses. Histograms are observed in **emulated seconds** (the engine's clock),
so they read like the modelled hardware whatever the time scale.

Besides vLLM's series the registry has ``prefixlb_emulator_*`` series describing the emulation
itself (time scale, how late steps are delivered), so a benchmark can tell when the host could
not keep up with the requested time scale.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from prefixlb.engine import MetricsSnapshot, RequestOutput, StepResult

if TYPE_CHECKING:
    from prefixlb.engine import Engine

__all__ = ["REQUEST_LATENCY_BUCKETS", "ReplicaMetrics"]

# vllm/v1/metrics/buckets.py (0.32/0.33)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
TIME_TO_FIRST_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                               7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
INTER_TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                               10.0, 20.0, 40.0, 80.0)  # fmt: skip
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
FINISHED_REASONS = ("stop", "length", "abort", "error", "repetition")


def _buckets_1_2_5(max_value: int) -> list[float]:
    out: list[float] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return out
            out.append(float(m * scale))
        scale *= 10


class _EngineCollector(Collector):
    """Counters and gauges from the replica's last published snapshot."""

    def __init__(self, owner: ReplicaMetrics) -> None:
        self._m = owner

    def collect(self) -> Iterator[Metric]:
        m = self._m
        snap = m.snapshot
        c = snap.counters
        labels = m.label_values
        names = ["model_name", "engine"]
        created = m.created

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=names)
            g.add_metric(labels, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            f = CounterMetricFamily(name, doc, labels=names)
            f.add_metric(labels, value, created=created)
            return f

        yield gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches.", snap.num_requests_running
        )
        yield gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.", snap.num_requests_waiting
        )
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", snap.kv_cache_usage_perc)
        yield counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            c.prefix_cache_queries,
        )
        yield counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", c.prefix_cache_hits
        )
        yield counter(
            "vllm:external_prefix_cache_queries",
            "External prefix cache queries from KV connector cross-instance cache sharing, "
            "in terms of number of queried tokens.",
            0,
        )
        yield counter(
            "vllm:external_prefix_cache_hits",
            "External prefix cache hits from KV connector cross-instance cache sharing, "
            "in terms of number of cached tokens.",
            0,
        )
        yield counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.", c.num_preemptions)
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", c.prompt_tokens)
        yield counter(
            "vllm:prompt_tokens_cached", "Number of cached prompt tokens (local + external).", c.prefix_cache_hits
        )
        yield counter("vllm:generation_tokens", "Number of generation tokens processed.", c.generation_tokens)
        success = CounterMetricFamily(
            "vllm:request_success", "Count of successfully processed requests.", labels=[*names, "finished_reason"]
        )
        by_reason = dict(c.request_success)
        # requests the frontend stopped on a stop string were aborted in the engine; vLLM counts them as "stop"
        moved = min(m.stop_string_finishes, by_reason.get("abort", 0))
        by_reason["abort"] = by_reason.get("abort", 0) - moved
        by_reason["stop"] = by_reason.get("stop", 0) + moved
        for reason in FINISHED_REASONS:
            success.add_metric([*labels, reason], by_reason.get(reason, 0), created=created)
        yield success
        info = GaugeMetricFamily(
            "vllm:cache_config_info", "Information of the LLMEngine CacheConfig", labels=list(m.cache_config)
        )
        info.add_metric(list(m.cache_config.values()), 1.0)
        yield info


class TextFormat:
    """``generate_latest(registry)``, byte for byte, at a fraction of its cost.

    The emulated replicas of a fleet share one event loop, so rendering /metrics (~2 ms with
    prometheus_client for a replica's ~270 series) holds back every replica's engine steps --
    which real vLLM, rendering in its API server process beside the engine core, never does, and
    which would penalise exactly the balancers that scrape. Everything but the values is the
    same from one scrape to the next, so each header and each sample's name-and-labels prefix is
    produced once, by ``generate_latest`` itself on a one-sample copy of the metric (so the
    library's escaping rules, whatever its version, are the ones applied), and then reused; a
    scrape formats only the values (``floatToGoString``, as the library does).
    """

    _OM = ("_created", "_gsum", "_gcount")

    def __init__(self) -> None:
        self._heads: dict[tuple, tuple[str, dict[str, str]]] = {}
        self._prefixes: dict[tuple, str] = {}

    @staticmethod
    def _latest(metric: Metric, samples: list) -> list[str]:
        m = copy.copy(metric)
        m.samples = samples

        class _One(Collector):
            def collect(self) -> Iterator[Metric]:
                yield m

        return generate_latest(_One()).decode("utf-8").splitlines(keepends=True)

    def render(self, registry: CollectorRegistry) -> bytes:
        out: list[str] = []
        heads, prefixes, om_suffixes = self._heads, self._prefixes, self._OM
        for metric in registry.collect():
            hk = (metric.name, metric.type, metric.documentation)
            head = heads.get(hk)
            if head is None:
                head = heads[hk] = ("".join(self._latest(metric, [])), {})
            out.append(head[0])
            om: dict[str, list[str]] | None = None
            for s in metric.samples:
                if s.timestamp is not None or s.exemplar is not None:
                    return generate_latest(registry)  # not produced by this emulator: the library decides
                key = (s.name, tuple(s.labels.items()))
                prefix = prefixes.get(key)
                suffix = None
                if s.name.startswith(metric.name):
                    tail = s.name[len(metric.name):]
                    if tail in om_suffixes:
                        suffix = tail
                if prefix is None:
                    lines = self._latest(metric, [Sample(s.name, s.labels, 0.0)])
                    prefix = prefixes[key] = lines[-1][: -len(" 0.0\n")]
                    if suffix is not None and suffix not in head[1]:
                        head[1][suffix] = "".join(lines[2:4])
                line = f"{prefix} {floatToGoString(s.value)}\n"
                if suffix is None:
                    out.append(line)
                else:
                    if om is None:
                        om = {}
                    om.setdefault(suffix, []).append(line)
            if om:
                for suffix, lines in sorted(om.items()):
                    out.append(head[1][suffix])
                    out.extend(lines)
        return "".join(out).encode("utf-8")


class ReplicaMetrics:
    """The Prometheus side of one replica (see the module docstring)."""

    def __init__(self, engine: Engine, *, time_scale: float, engine_index: str = "0") -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._text = TextFormat()
        self.snapshot: MetricsSnapshot = engine.metrics()
        self.stop_string_finishes = 0
        self.created = time.time()
        self.label_values = [engine.model, engine_index]
        p = engine.profile
        self.cache_config = {
            "block_size": str(p.block_size),
            "cache_dtype": "auto",
            "enable_prefix_caching": str(engine.enable_prefix_caching),
            "engine": engine_index,
            "gpu_memory_utilization": "0.9",
            "kv_cache_size_tokens": str(p.num_gpu_blocks * p.block_size),
            "num_cpu_blocks": "None",
            "num_gpu_blocks": str(p.num_gpu_blocks),
            "num_gpu_blocks_override": "None",
            "prefix_caching_hash_algo": engine.hash_algo,
            "sliding_window": "None",
            "emulator_profile": p.name,
        }
        self.registry.register(_EngineCollector(self))
        names = ["model_name", "engine"]
        req_tokens = _buckets_1_2_5(p.max_model_len)

        def hist(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(name, doc, names, buckets=buckets, registry=self.registry).labels(*self.label_values)

        self.ttft = hist(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            TIME_TO_FIRST_TOKEN_BUCKETS,
        )
        self.itl = hist(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            INTER_TOKEN_LATENCY_BUCKETS,
        )
        self.e2e = hist(
            "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", REQUEST_LATENCY_BUCKETS
        )
        self.queue = hist(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.inference = hist(
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.prefill = hist(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.decode = hist(
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.prompt_tokens = hist("vllm:request_prompt_tokens", "Number of prefill tokens processed.", req_tokens)
        self.generation_tokens = hist(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", req_tokens
        )
        self.iteration_tokens = hist(
            "vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.", ITERATION_TOKENS_BUCKETS
        )
        # the emulation itself
        Gauge("prefixlb_emulator_time_scale", "Emulated seconds per wall second.", registry=self.registry).set(
            time_scale
        )
        self.lag = Gauge(
            "prefixlb_emulator_lag_seconds",
            "Wall seconds by which the last engine step was delivered after its scheduled time.",
            registry=self.registry,
        )
        self.late_steps = Counter(
            "prefixlb_emulator_late_steps",
            "Engine steps delivered later than the tolerance (the host cannot keep up with the time scale).",
            registry=self.registry,
        )
        self.rebases = Counter(
            "prefixlb_emulator_rebases",
            "Times the schedule was so far behind that emulated time was re-anchored to now.",
            registry=self.registry,
        )
        self.steps = Counter("prefixlb_emulator_steps", "Engine steps run.", registry=self.registry)

    def on_step(self, res: StepResult) -> None:
        self.steps.inc()
        n = res.composition.num_tokens
        if n:
            self.iteration_tokens.observe(n)

    def on_output(self, out: RequestOutput, t: float, last_token_t: float | None) -> None:
        """Observe one output taking effect at emulated time ``t``."""
        times = out.times
        if out.new_token_ids:
            if out.first_token:
                self.ttft.observe(max(0.0, t - times.arrival))
            elif last_token_t is not None:
                self.itl.observe(max(0.0, t - last_token_t))
        if not out.finished:
            return
        end = times.finished if times.finished is not None else t
        self.e2e.observe(max(0.0, end - times.arrival))
        self.prompt_tokens.observe(out.num_prompt_tokens)
        self.generation_tokens.observe(out.num_output_tokens)
        if times.first_scheduled is not None:
            self.queue.observe(max(0.0, times.first_scheduled - times.arrival))
            self.inference.observe(max(0.0, end - times.first_scheduled))
            if times.first_token is not None:
                self.prefill.observe(max(0.0, times.first_token - times.first_scheduled))
                self.decode.observe(max(0.0, end - times.first_token))

    def exposition(self) -> bytes:
        return self._text.render(self.registry)
