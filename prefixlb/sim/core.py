"""The simulator: thousands of replicas, millions of requests, on a virtual clock.

Nothing here is a second copy. Each replica is a :class:`prefixlb.engine.Engine` (the model the
emulator serves over HTTP, checked against a real vLLM trace); every decision is
:meth:`prefixlb.routing.TierRouter.decide` and the same ``dispatched`` / ``first_token`` /
``finished`` hooks the server calls. Only the transport is replaced by events on a heap of
``(time, seq, kind, payload)`` (SimPy's pattern: the counter makes ties deterministic), so a
run is a pure function of the workload and the seed.

What the balancer would see over the network is modelled explicitly: a one-way latency on each
hop, and the replicas' ``/metrics`` (waiting, running, KV usage) scraped every
``scrape_interval`` -- a stale view, as in production.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from prefixlb.engine import Engine, EngineRequest, request_prompt_ids
from prefixlb.engine.tokenizer import default_tokenizer
from prefixlb.loadgen import RequestSpec
from prefixlb.routing import CostParams, TierRouter, make_policy, prompt_key
from prefixlb.routing.router import Decision

__all__ = ["SimConfig", "SimResult", "Simulation", "simulate"]

_ARRIVE, _STEP, _SCRAPE, _MAINTAIN = 0, 1, 2, 3


@dataclass
class SimConfig:
    replicas: int = 16
    profile: str = "h100-llama3-8b"
    kv_capacity_tokens: int | None = None  # per replica; None: the profile's
    max_model_len: int = 16_384
    policy: str = "cache_aware"
    pressure_weight: float = 1.0
    params: CostParams = field(default_factory=CostParams)
    scrape_interval: float = 1.0  # 0: the balancer never sees the replicas' /metrics
    network_s: float = 0.0003  # one way, balancer <-> replica
    index_capacity_tokens: int | None = None  # what the router's index may hold per replica (None: KV size)
    maintain_interval: float = 0.25  # the balancer's upkeep tick (TierRouter.maintain)
    seed: int = 0


@dataclass
class SimResult:
    requests: int
    hit_rate: float  # from the engines' own counters, as the live benchmark reads vLLM's
    ttft_ms: list[float]  # per request, in spec order (emulated ms)
    e2e_ms: list[float]
    per_replica_requests: list[int]
    predicted_cached_tokens: float
    actual_cached_tokens: float
    virtual_s: float
    wall_s: float
    steps: int

    def pct(self, q: float) -> float:
        xs = sorted(x for x in self.ttft_ms if not math.isnan(x))
        return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))] if xs else math.nan

    def summary(self) -> dict:
        return {
            "requests": self.requests,
            "hit_rate": round(self.hit_rate, 4),
            "ttft_p50_ms": round(self.pct(0.5), 1),
            "ttft_p90_ms": round(self.pct(0.9), 1),
            "ttft_p99_ms": round(self.pct(0.99), 1),
            "throughput_rps": round(self.requests / self.virtual_s, 2) if self.virtual_s else 0.0,
            "busiest_replica_share": round(max(self.per_replica_requests) / max(1, self.requests), 4),
            "predicted_vs_actual_cached": round(self.predicted_cached_tokens / self.actual_cached_tokens, 3)
            if self.actual_cached_tokens else None,
            "virtual_s": round(self.virtual_s, 2),
            "wall_s": round(self.wall_s, 2),
            "steps": self.steps,
        }


class Simulation:
    def __init__(self, specs: Sequence[RequestSpec], config: SimConfig | None = None) -> None:
        self.specs = specs
        self.cfg = c = config or SimConfig()
        self.now = 0.0
        self._heap: list = []
        self._seq = 0
        tok = default_tokenizer()
        self.tokenizer = tok
        self.engines = [
            Engine(c.profile, kv_capacity_tokens=c.kv_capacity_tokens, max_model_len=c.max_model_len,
                   hash_algo="fast", enable_kv_events=False, grade_quality=False, tokenizer=tok)
            for _ in range(c.replicas)
        ]
        rng = random.Random(c.seed)
        policy_kw = {"pressure_weight": c.pressure_weight} if c.policy == "cache_aware" else {}
        self.router = TierRouter("sim", policy=make_policy(c.policy, rng, **policy_kw), params=c.params,
                                 seed=c.seed, clock=lambda: self.now)
        for i, e in enumerate(self.engines):
            cap = c.index_capacity_tokens or (e.num_gpu_blocks - 1) * e.block_size
            self.router.add_replica(i, f"sim://{i}", capacity_tokens=cap)
        self._busy = [False] * c.replicas
        self._inflight: dict[str, tuple[Decision, int, float]] = {}
        self.ttft = [math.nan] * len(specs)
        self.e2e = [math.nan] * len(specs)
        self.per_replica = [0] * c.replicas
        self.predicted = 0.0
        self.actual = 0.0
        self.steps = 0

    # -- the heap ---------------------------------------------------------------------------

    def _at(self, t: float, kind: int, payload) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, payload))

    def run(self, progress: Callable[[int], None] | None = None) -> SimResult:
        t0 = time.perf_counter()
        for i, spec in enumerate(self.specs):
            self._at(spec.at, _ARRIVE, i)
        self._arrivals_left = len(self.specs)
        c = self.cfg
        self._at(c.maintain_interval, _MAINTAIN, None)
        if c.scrape_interval > 0:
            for r in range(c.replicas):  # staggered, as independent scrapers would be
                self._at(c.scrape_interval * (r + 1) / c.replicas, _SCRAPE, r)
        done = 0
        heap = self._heap
        while heap:
            t, _, kind, payload = heapq.heappop(heap)
            self.now = t
            if kind == _STEP:
                done += self._step_done(payload)
                if progress and done >= 1000:
                    progress(done)
                    done = 0
            elif kind == _ARRIVE:
                self._arrive(payload)
            elif kind == _MAINTAIN:
                self.router.maintain(t)
                if self._inflight or self._arrivals_left:
                    self._at(t + c.maintain_interval, _MAINTAIN, None)
            elif kind == _SCRAPE:
                self._scrape(payload)
                if self._inflight or self._arrivals_left:  # stop once no work can come
                    self._at(t + c.scrape_interval, _SCRAPE, payload)
        if progress and done:
            progress(done)
        counters = [e.metrics().counters for e in self.engines]
        q = sum(x.prefix_cache_queries for x in counters)
        h = sum(x.prefix_cache_hits for x in counters)
        return SimResult(
            requests=len(self.specs), hit_rate=h / q if q else 0.0, ttft_ms=self.ttft, e2e_ms=self.e2e,
            per_replica_requests=self.per_replica, predicted_cached_tokens=self.predicted,
            actual_cached_tokens=self.actual, virtual_s=self.now, wall_s=time.perf_counter() - t0, steps=self.steps,
        )

    # -- events ---------------------------------------------------------------------------

    def _arrive(self, i: int) -> None:
        self._arrivals_left -= 1
        spec = self.specs[i]
        now = self.now
        max_tokens = int(spec.body.get("max_tokens") or 16)
        d = self.router.decide(prompt_key(spec.body, spec.chat), now, max_tokens=max_tokens)
        self.router.dispatched(d, now)
        r = d.replica.id
        self.per_replica[r] += 1
        self.predicted += d.cached_tokens
        ids = request_prompt_ids(self.tokenizer, spec.body, spec.chat)
        rid = f"s{i}"
        req = EngineRequest(rid, ids, max_tokens=max_tokens, ignore_eos=True)
        t_replica = now + self.cfg.network_s
        self.engines[r].add_request(req, t_replica)
        self._inflight[rid] = (d, i, spec.at)
        if not self._busy[r]:
            self._busy[r] = True
            self._at(t_replica, _STEP, (r, None))

    def _step_done(self, payload) -> int:
        r, res = payload
        e = self.engines[r]
        finished = 0
        net = self.cfg.network_s
        if res is not None:
            for out in res.outputs:
                entry = self._inflight.get(out.request_id)
                if entry is None:
                    continue
                d, i, arrival = entry
                t_client = self.now + net  # the byte reaches the balancer (and its client)
                if out.first_token:
                    self.ttft[i] = (t_client - arrival) * 1e3
                    self.router.first_token(d, t_client)
                if out.finished:
                    del self._inflight[out.request_id]
                    self.e2e[i] = (t_client - arrival) * 1e3
                    self.actual += out.num_cached_tokens
                    usage = {"prompt_tokens": out.num_prompt_tokens,
                             "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens}}
                    self.router.finished(d, t_client, usage, prompt_text_bytes=None)
                    finished += 1
        nxt = e.step(self.now)
        if nxt is None:
            self._busy[r] = False
        else:
            self.steps += 1
            self._at(nxt.end, _STEP, (r, nxt))
        return finished

    def _scrape(self, r: int) -> None:
        e = self.engines[r]
        self.router.replicas[r].observe_scrape(e.num_requests_waiting, e.num_requests_running, e.kv_cache_usage,
                                               self.now)


def simulate(specs: Sequence[RequestSpec], config: SimConfig | None = None,
             progress: Callable[[int], None] | None = None) -> SimResult:
    return Simulation(specs, config).run(progress)
