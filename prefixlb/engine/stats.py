"""Counters and gauges with vLLM's meanings (names without the ``vllm:`` prefix).

No Prometheus dependency here: the emulator turns a :class:`MetricsSnapshot` into
``vllm:*`` series (counters get ``_total``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["EngineCounters", "MetricsSnapshot"]


@dataclass(slots=True)
class EngineCounters:
    """Monotonic counters of one engine.

    * ``prefix_cache_queries``: prompt tokens looked up (``num_tokens`` of each request when it
      is admitted; resumed preempted requests are not counted).
    * ``prefix_cache_hits``: tokens of those lookups served from the cache.
    * ``prompt_tokens``: prompt tokens of requests that produced their first token.
    * ``generation_tokens``: output tokens produced.
    * ``request_success``: finished requests by ``finished_reason`` (stop/length/abort).
    * ``num_preemptions``: preemptions (recompute mode).
    """

    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    request_success: dict[str, int] = field(default_factory=lambda: {"stop": 0, "length": 0, "abort": 0})
    num_preemptions: int = 0

    def copy(self) -> EngineCounters:
        return EngineCounters(
            self.prefix_cache_queries,
            self.prefix_cache_hits,
            self.prompt_tokens,
            self.generation_tokens,
            dict(self.request_success),
            self.num_preemptions,
        )


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """Counters and gauges at one instant, plus ``vllm:cache_config_info`` labels."""

    counters: EngineCounters
    num_requests_running: int
    num_requests_waiting: int
    kv_cache_usage_perc: float
    num_gpu_blocks: int
    block_size: int
    prefix_caching_hash_algo: str
