"""What physics allows for a workload on a fleet: the two bounds every result is read against.

* **Pooled-cache hit rate** (upper bound on hit rate): one prefix cache the size of the whole
  fleet, serving every request in arrival order. No router can place prefixes better than a
  single cache that never has to choose.
* **TTFT floor** (lower bound on TTFT): each request alone on an idle replica whose cache is
  that pooled cache's state when the request arrives: it prefills only what the pooled cache
  misses, waits for nothing.

Both come from one sequential pass of one engine (prefixlb.engine, the emulator's replica
model: same profile, same block size and eviction) with ``replicas x`` the KV blocks of a
replica, each request run to completion before the next arrives. The hit rate is counted as
vLLM counts it (``prefix_cache_hits / prefix_cache_queries``, tokens); the prompt tokens are
computed exactly as the emulated replicas compute them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from prefixlb.emulator.replica import load_tokenizer
from prefixlb.engine import Engine, EngineRequest, request_prompt_ids
from prefixlb.loadgen import RequestSpec

__all__ = ["Bounds", "compute_bounds", "percentile"]


def percentile(xs: Sequence[float], q: float) -> float:
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


@dataclass
class Bounds:
    pooled_hit_rate: float
    ttft_floor_ms: dict[str, float]  # p50, p90, p99 (emulated ms)
    floors_ms: list[float]  # per request, in spec order
    misses: list[int]  # per request, in spec order: the prompt tokens the pooled cache missed
    prompt_tokens: int
    pooled_kv_tokens: int


def compute_bounds(specs: Sequence[RequestSpec], *, profile: str, replicas: int, kv_capacity_tokens: int | None,
                   block_size: int | None = None, max_model_len: int | None = None,
                   tokenizer: str | None = None) -> Bounds:
    tok = load_tokenizer(tokenizer)
    probe = Engine(profile, block_size=block_size, kv_capacity_tokens=kv_capacity_tokens,
                   max_model_len=max_model_len, tokenizer=tok, enable_kv_events=False, grade_quality=False,
                   hash_algo="fast")
    engine = Engine(profile, block_size=probe.block_size, num_gpu_blocks=probe.num_gpu_blocks * replicas,
                    max_model_len=probe.max_model_len, tokenizer=tok, enable_kv_events=False, grade_quality=False,
                    hash_algo="fast")
    now = 0.0
    floors: list[float] = []
    misses: list[int] = []
    prompt_total = 0
    for i, spec in enumerate(specs):
        ids = request_prompt_ids(tok, spec.body, spec.chat)
        prompt_total += len(ids)
        max_tokens = int(spec.body.get("max_tokens") or 16)
        engine.add_request(EngineRequest(f"b{i}", ids, max_tokens=max_tokens, ignore_eos=True), now)
        first = None
        miss = len(ids)
        while engine.has_unfinished():
            res = engine.step(now)
            now = res.end
            for out in res.outputs:
                if out.first_token:
                    first = out.times.first_token - out.times.arrival
                if out.finished:
                    miss = out.num_prompt_tokens - out.num_cached_tokens
        floors.append((first or 0.0) * 1e3)
        misses.append(miss)
    c = engine.metrics().counters
    return Bounds(
        pooled_hit_rate=c.prefix_cache_hits / c.prefix_cache_queries if c.prefix_cache_queries else 0.0,
        ttft_floor_ms={q: round(percentile(floors, v), 2) for q, v in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))},
        floors_ms=floors,
        misses=misses,
        prompt_tokens=prompt_total,
        pooled_kv_tokens=(engine.num_gpu_blocks - 1) * engine.block_size,
    )
