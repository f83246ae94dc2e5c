"""The simulator: thousands of replicas, millions of requests, on a virtual clock.

Nothing here is a second copy. Each replica is a :class:`prefixlb.engine.Engine` (the model the
emulator serves over HTTP, checked against a real vLLM trace), stepped with
:meth:`~prefixlb.engine.Engine.advance` (the same plan and commit as ``step``, without building
an output for every streamed token); every decision is :meth:`prefixlb.routing.TierRouter.decide`
and the same ``dispatched`` / ``first_token`` / ``finished`` / ``maintain`` calls the server
makes. Only the transport is replaced by events on a heap of ``(time, seq, code)`` (SimPy's
pattern: the counter makes ties deterministic), so a run is a pure function of the workload,
the configuration and the seed.

What the balancer would see over the network is modelled explicitly: a one-way latency on each
hop, and the replicas' ``/metrics`` (waiting, running, KV usage) scraped every
``scrape_interval`` -- a stale view, as in production. With ``time_scale`` X the replicas run X
times faster than the balancer's clock, as an emulated fleet started with ``--time-scale X``
does in the live benchmark: the router then sees the times the live balancer sees.

Scale: arrivals are pulled from the workload one at a time (an iterator is enough; nothing holds
the requests), a request's state lives only while it is in flight, and what is kept per request
is two doubles (TTFT and end-to-end time) in ``array('d')``.
"""

from __future__ import annotations

import gc
import heapq
import math
import random
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prefixlb.engine import BlockHasher, Engine, EngineRequest
from prefixlb.engine.tokenizer import default_tokenizer, prompt_text
from prefixlb.index import block_hashes
from prefixlb.loadgen import RequestSpec
from prefixlb.routing import CostParams, TierRouter, make_policy, prompt_key
from prefixlb.routing.admission import AdmissionQueue, Held
from prefixlb.routing.router import Decision

__all__ = ["SGLANG_INDEX_TOKENS", "SimConfig", "SimResult", "Simulation", "percentile", "simulate"]

#: sglang-router's radix tree keeps 2**26 characters per worker (its ``max_tree_size``): the
#: index capacity the ``sglang_like`` policy gets unless one is given (4 bytes a token).
SGLANG_INDEX_TOKENS = (1 << 26) // 4

# heap codes: >= 0 a step of that replica ends; _MAINTAIN the router's upkeep tick;
# <= _SCRAPE0 a scrape of replica (_SCRAPE0 - code)
_MAINTAIN = -1
_SCRAPE0 = -2


@dataclass
class SimConfig:
    """One simulated fleet and balancer. Durations are seconds of the replicas' (virtual)
    clock, except ``scrape_interval`` and ``maintain_interval``: those are the balancer's
    settings, in the balancer's seconds (``time_scale`` times longer on the replicas' clock)."""

    replicas: int = 16
    profile: str = "h100-llama3-8b"
    kv_capacity_tokens: int | None = None  # per replica; None: the profile's
    max_model_len: int = 16_384
    policy: str = "cache_aware"
    pressure_weight: float = 1.0
    params: CostParams = field(default_factory=CostParams)
    scrape_interval: float = 1.0  # 0: the balancer never sees the replicas' /metrics
    network_s: float = 0.0003  # one way, balancer <-> replica
    # the balancer sees each first byte this much later on average (exponential; its event loop's
    # delay). 0 = exact, which makes every run one deterministic trajectory of a feedback system
    # that real jitter can move a long way (see benchmarks/README.md, "the simulator's jitter")
    observe_jitter_s: float = 0.0
    index_capacity_tokens: int | None = None  # what the router's index may hold per replica (None: KV size)
    maintain_interval: float = 0.25  # the balancer's upkeep tick (TierRouter.maintain)
    time_scale: float = 1.0  # replica seconds per balancer second (an emulated fleet's --time-scale)
    balancers: int = 1  # independent balancer processes, requests spread round-robin over them
    seed: int = 0

    def validate(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"--replicas: must be >= 1, got {self.replicas}")
        if self.balancers < 1:
            raise ValueError(f"--balancers: must be >= 1, got {self.balancers}")
        if not self.time_scale > 0:
            raise ValueError(f"--time-scale: must be > 0, got {self.time_scale}")
        if self.scrape_interval < 0:
            raise ValueError(f"--scrape-interval: must be >= 0 (0: never), got {self.scrape_interval}")
        if self.network_s < 0:
            raise ValueError(f"--network-ms: must be >= 0, got {self.network_s * 1e3}")
        if self.observe_jitter_s < 0:
            raise ValueError(f"--observe-jitter-ms: must be >= 0, got {self.observe_jitter_s * 1e3}")
        if not self.maintain_interval > 0:
            raise ValueError(f"maintain_interval: must be > 0, got {self.maintain_interval}")
        if self.index_capacity_tokens is not None and self.index_capacity_tokens < 1:
            raise ValueError(f"--index-capacity-tokens: must be >= 1, got {self.index_capacity_tokens}")


def percentile(sorted_xs, q: float) -> float:
    """The nearest-rank ``q`` quantile of an already sorted sequence (as benchmarks/bounds.py)."""
    n = len(sorted_xs)
    return sorted_xs[min(n - 1, max(0, math.ceil(q * n) - 1))] if n else math.nan


@dataclass
class SimResult:
    requests: int
    errors: int  # requests a replica refused (e.g. longer than max_model_len)
    hit_rate: float  # from the engines' own counters, as the live benchmark reads vLLM's
    ttft_ms: array  # per request, in arrival order (replica-clock ms; NaN for an error)
    e2e_ms: array
    per_replica_requests: list[int]
    per_replica_query_tokens: list[int]  # vllm:prefix_cache_queries of each replica
    predicted_cached_tokens: float
    actual_cached_tokens: float
    virtual_s: float  # the last request's end
    wall_s: float
    cpu_s: float  # this process's CPU time (wall_s also counts waiting for a core)
    steps: int
    events: int
    preemptions: int
    max_running: int  # the most requests one replica ever ran at once
    kv_checks: int = 0  # KV-accounting invariant checks that passed (Simulation(check_kv_every=N))
    replica_of: array | None = None  # each request's replica (Simulation(record_replicas=True))
    cached_of: array | None = None  # each request's prefix-cache hit in tokens (-1: not finished)
    prompt_of: array | None = None  # each request's prompt tokens (-1: not finished)
    learned_prefill_rate: float = 0.0  # tokens/s the (first) balancer's TTFT model ended with

    def pct(self, q: float) -> float:
        return percentile(sorted(x for x in self.ttft_ms if not math.isnan(x)), q)

    def summary(self) -> dict:
        """The live benchmark's per-target metrics (benchmarks/runner.py), plus the simulator's own."""
        ttft = sorted(x for x in self.ttft_ms if not math.isnan(x))
        e2e = sorted(x for x in self.e2e_ms if not math.isnan(x))
        ok = self.requests - self.errors
        total_q = sum(self.per_replica_query_tokens)
        return {
            "hit_rate": round(self.hit_rate, 4),
            "ttft_p50_ms": round(percentile(ttft, 0.5), 1),
            "ttft_p90_ms": round(percentile(ttft, 0.9), 1),
            "ttft_p99_ms": round(percentile(ttft, 0.99), 1),
            "ttft_mean_ms": round(sum(ttft) / len(ttft), 1) if ttft else math.nan,
            "e2e_p50_ms": round(percentile(e2e, 0.5), 1),
            "throughput_rps": round(ok / self.virtual_s, 2) if self.virtual_s else 0.0,
            "errors": self.errors,
            "requests": self.requests,
            # as the runner counts it: the busiest replica's share of prefix-cache query tokens
            "busiest_replica_share": round(max(self.per_replica_query_tokens) / total_q, 3) if total_q else 0.0,
            "busiest_replica_request_share": round(max(self.per_replica_requests) / max(1, self.requests), 4),
            "predicted_vs_actual_cached": round(self.predicted_cached_tokens / self.actual_cached_tokens, 3)
            if self.actual_cached_tokens else None,
            "preemptions": self.preemptions,
            "learned_prefill_tokens_per_s": round(self.learned_prefill_rate),
            "virtual_s": round(self.virtual_s, 2),
            "wall_s": round(self.wall_s, 2),
            "cpu_s": round(self.cpu_s, 2),
            "steps": self.steps,
            "events": self.events,
        }


class _ChainHasher(BlockHasher):
    """The engine's ``fast`` block hashes through :func:`prefixlb.index.block_hashes`: the same
    XXH64 chain (hashing.py: "the same chain as prefixlb.index.block_hashes over the ids' bytes"),
    one native call per prompt instead of one Python-level call per 16-token block."""

    __slots__ = ()

    def extend(self, hashes, token_ids, extra_keys=None) -> int:
        if extra_keys is not None:
            return super().extend(hashes, token_ids, extra_keys)
        bs = self.block_size
        start = len(hashes)
        end = len(token_ids) // bs
        if end <= start:
            return 0
        part = token_ids[start * bs : end * bs]
        if not (isinstance(part, array) and part.typecode == "I"):
            part = array("I", part)
        hashes += block_hashes(part.tobytes() if _LITTLE else _swapped(part), 4 * bs,
                               hashes[-1] if hashes else self.none_hash)
        return end - start


def _swapped(a: array) -> bytes:
    b = array("I", a)
    b.byteswap()
    return b.tobytes()


_LITTLE = array("I", [1]).tobytes()[0] == 1


class Simulation:
    """One run: ``specs`` (any iterable in arrival order; a list or a lazy generator) through
    ``config``'s fleet and balancer. ``run()`` returns a :class:`SimResult`."""

    def __init__(self, specs: Iterable[RequestSpec], config: SimConfig | None = None, *,
                 check_kv_every: int = 0, record_replicas: bool = False) -> None:
        self.cfg = c = config or SimConfig()
        c.validate()
        self._specs: Iterator[RequestSpec] = iter(specs)
        self._jitter = random.Random(c.seed * 7919 + 1)  # the balancer's observation delays
        self.now = 0.0
        self._heap: list[tuple[float, int, int]] = []
        self._seq = 0
        tok = default_tokenizer()
        self.tokenizer = tok
        self.engines = [
            Engine(c.profile, kv_capacity_tokens=c.kv_capacity_tokens, max_model_len=c.max_model_len,
                   hash_algo="fast", enable_kv_events=False, grade_quality=False, tokenizer=tok)
            for _ in range(c.replicas)
        ]
        for e in self.engines:
            e.hasher = _ChainHasher("fast", e.block_size)
        policy_kw = {"pressure_weight": c.pressure_weight} if c.policy == "cache_aware" else {}
        scale = c.time_scale
        cap = c.index_capacity_tokens
        if cap is None and c.policy == "sglang_like":
            cap = SGLANG_INDEX_TOKENS
        self.routers: list[TierRouter] = []
        for b in range(c.balancers):  # each its own index, load accounting and seeded policy
            router = TierRouter("sim", policy=make_policy(c.policy, random.Random(c.seed + b), **policy_kw),
                                params=c.params, seed=c.seed + b, clock=lambda: self.now / scale)
            for i, e in enumerate(self.engines):
                # what the live balancer learns from vllm:cache_config_info: num_gpu_blocks x block_size
                router.add_replica(i, f"sim://{i}", capacity_tokens=cap or e.num_gpu_blocks * e.block_size)
            self.routers.append(router)
        self.router = self.routers[0]
        self._busy = [False] * c.replicas
        self._pending: list[list] = [[] for _ in range(c.replicas)]  # outputs of each replica's step in flight
        # request id -> (decision, arrival index, arrival time, prompt text bytes, its balancer)
        self._inflight: dict[str, tuple[Decision, int, float, int | None, TierRouter]] = {}
        # requests waiting at each balancer (admission), decided again as the server does
        self._queues = [AdmissionQueue(r) for r in self.routers]
        # per request, when asked: the replica that served it, and its prompt / cached tokens
        self.replica_of = array("i") if record_replicas else None
        self.cached_of = array("i") if record_replicas else None
        self.prompt_of = array("i") if record_replicas else None
        self.ttft = array("d")
        self.e2e = array("d")
        self.per_replica = [0] * c.replicas
        self.predicted = 0.0
        self.actual = 0.0
        self.steps = 0
        self.events = 0
        self.errors = 0
        self.arrived = 0
        self.max_running = 0
        self.last_end = 0.0
        self.check_kv_every = check_kv_every
        self.kv_checks = 0
        self._last_at = -math.inf

    # -- the heap ---------------------------------------------------------------------------

    def _at(self, t: float, code: int) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, code))

    def _next_arrival(self) -> RequestSpec | None:
        spec = next(self._specs, None)
        if spec is not None:
            if spec.at < self._last_at:
                raise ValueError(f"request {self.arrived + 1}: arrives at {spec.at} s, before the one before it "
                                 f"({self._last_at} s); the simulator needs requests in arrival order")
            self._last_at = spec.at
        return spec

    def run(self, progress: Callable[[int], None] | None = None) -> SimResult:
        """Run to the end of the workload; ``progress(k)`` is told of finished requests in batches."""
        gc_threshold = gc.get_threshold()
        gc.freeze()  # the fleet and the router live for the whole run: keep them out of collections
        gc.set_threshold(max(gc_threshold[0], 50_000), *gc_threshold[1:])
        try:
            return self._run(progress)
        finally:
            gc.set_threshold(*gc_threshold)
            gc.unfreeze()

    def _run(self, progress: Callable[[int], None] | None) -> SimResult:
        t0 = time.perf_counter()
        c0 = time.process_time()
        c = self.cfg
        scale = c.time_scale
        maintain_every = c.maintain_interval * scale
        scrape_every = c.scrape_interval * scale
        self._at(maintain_every, _MAINTAIN)
        if scrape_every > 0:
            for r in range(c.replicas):  # staggered, as independent scrapers would be
                self._at(scrape_every * (r + 1) / c.replicas, _SCRAPE0 - r)
        routers = self.routers
        heap = self._heap
        pop = heapq.heappop
        nxt = self._next_arrival()
        done = 0
        batch = 1000
        while heap or nxt is not None:
            if nxt is not None and (not heap or nxt.at <= heap[0][0]):
                self.now = nxt.at
                self._arrive(nxt)
                nxt = self._next_arrival()
                continue
            t, _, code = pop(heap)
            self.now = t
            self.events += 1
            if code >= 0:
                done += self._step_done(code, t)
                if progress and done >= batch:
                    progress(done)
                    done = 0
            elif code == _MAINTAIN:
                for router in routers:
                    router.maintain(t / scale)
                if self.held:
                    self._retry_held()
                if self._inflight or self.held or nxt is not None:
                    self._at(t + maintain_every, _MAINTAIN)
            else:
                r = _SCRAPE0 - code
                e = self.engines[r]
                waiting, running, usage = e.num_requests_waiting, e.num_requests_running, e.kv_cache_usage
                for router in routers:  # every balancer scrapes every replica
                    router.replicas[r].observe_scrape(waiting, running, usage, t / scale)
                if self._inflight or nxt is not None:  # stop once no work can come
                    self._at(t + scrape_every, code)
        if progress and done:
            progress(done)
        q = h = 0
        per_q = []
        preemptions = 0
        for e in self.engines:
            k = e.counters
            q += k.prefix_cache_queries
            h += k.prefix_cache_hits
            per_q.append(k.prefix_cache_queries)
            preemptions += k.num_preemptions
        return SimResult(
            requests=self.arrived, errors=self.errors, hit_rate=h / q if q else 0.0, ttft_ms=self.ttft,
            e2e_ms=self.e2e, per_replica_requests=self.per_replica, per_replica_query_tokens=per_q,
            predicted_cached_tokens=self.predicted, actual_cached_tokens=self.actual, virtual_s=self.last_end,
            wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0, steps=self.steps, events=self.events,
            preemptions=preemptions,
            max_running=self.max_running, kv_checks=self.kv_checks, replica_of=self.replica_of,
            cached_of=self.cached_of, prompt_of=self.prompt_of,
            learned_prefill_rate=1.0 / self.routers[0].model.inv_rate,
        )

    # -- events ---------------------------------------------------------------------------

    def _arrive(self, spec: RequestSpec) -> None:
        i = self.arrived
        self.arrived += 1
        self.ttft.append(math.nan)
        self.e2e.append(math.nan)
        if self.replica_of is not None:
            self.replica_of.append(-1)
            self.cached_of.append(-1)
            self.prompt_of.append(-1)
        k = i % len(self.routers)
        router = self.routers[k]
        key = prompt_key(spec.body, spec.chat)
        max_tokens = int(spec.body.get("max_tokens") or 16)
        now = self.now / self.cfg.time_scale
        d = router.decide(key, now, max_tokens=max_tokens)
        if router.admits(d) or router.params.admit_max_wait_s <= 0:
            self._send(i, spec, key, max_tokens, router, d)
        else:
            self._queues[k].hold(key, d, now, max_tokens=max_tokens, token=(i, spec, router))

    @property
    def held(self) -> int:
        """Requests waiting at the balancers now (admission)."""
        return sum(len(q) for q in self._queues)

    def _retry_held(self) -> None:
        """Room may have come back: each balancer's admission pass (prefixlb.routing.admission)."""
        now = self.now / self.cfg.time_scale
        for q in self._queues:
            if q:
                q.run(now, self._admit_held)

    def _admit_held(self, h: Held) -> None:
        if h.error is not None:
            raise h.error
        i, spec, router = h.token
        self._send(i, spec, h.key, h.max_tokens, router, h.decision)

    def _send(self, i: int, spec: RequestSpec, key, max_tokens: int, router: TierRouter, d: Decision) -> None:
        now = self.now
        scale = self.cfg.time_scale
        body = spec.body
        chat = spec.chat
        router.dispatched(d, now / scale)
        r = d.replica.id
        self.per_replica[r] += 1
        if self.replica_of is not None:
            self.replica_of[i] = r
        rid = f"s{i}"
        t_replica = now + self.cfg.network_s
        try:
            self.engines[r].add_request(
                EngineRequest(rid, self._prompt_ids(body, chat), max_tokens=max_tokens, ignore_eos=True), t_replica)
        except ValueError:
            # the replica answers 400 (e.g. the prompt exceeds max_model_len): an error at the client
            self.errors += 1
            router.failed(d, now / scale)
            return
        self.predicted += d.cached_tokens
        # as the server does: token-id prompts teach nothing about bytes per token
        self._inflight[rid] = (d, i, spec.at, key.text_bytes if key.token_ids is None else None, router)
        if not self._busy[r]:
            self._busy[r] = True
            self._at(t_replica, r)

    def _prompt_ids(self, body: dict, chat: bool):
        """The prompt's token ids as the replica computes them (request_prompt_ids), as array('I')."""
        got = prompt_text(self.tokenizer, body, chat)
        if isinstance(got, list):
            return got
        return self.tokenizer.encode_array(got[0], add_special_tokens=got[1])

    def _step_done(self, r: int, now: float) -> int:
        """Replica ``r``'s step (if any) ended at ``now``: deliver its outputs, start the next."""
        finished = 0
        room = False
        outs = self._pending[r]
        if outs:
            net = self.cfg.network_s
            jit = self.cfg.observe_jitter_s
            scale = self.cfg.time_scale
            t_client = now + net  # the byte reaches the balancer (and its client)
            inflight = self._inflight
            for out in outs:
                entry = inflight.get(out.request_id)
                if entry is None:
                    continue
                d, i, arrival, text_bytes, router = entry
                if out.first_token:
                    self.ttft[i] = (t_client - arrival) * 1e3
                    seen = t_client + (self._jitter.expovariate(1.0 / jit) if jit else 0.0)
                    router.first_token(d, seen / scale)
                    room = True
                if out.finished:
                    del inflight[out.request_id]
                    self.e2e[i] = (t_client - arrival) * 1e3
                    self.actual += out.num_cached_tokens
                    if self.cached_of is not None:
                        self.cached_of[i] = out.num_cached_tokens
                        self.prompt_of[i] = out.num_prompt_tokens
                    router.finished(d, t_client / scale, {"prompt_tokens": out.num_prompt_tokens,
                                                          "prompt_tokens_details":
                                                              {"cached_tokens": out.num_cached_tokens}},
                                    prompt_text_bytes=text_bytes)
                    finished += 1
                    if t_client > self.last_end:
                        self.last_end = t_client
        e = self.engines[r]
        res = e.advance(now)
        if res is None:
            self._busy[r] = False
            self._pending[r] = []
        else:
            end, self._pending[r] = res
            self.steps += 1
            running = e.num_requests_running
            if running > self.max_running:
                self.max_running = running
            self._seq += 1
            heapq.heappush(self._heap, (end, self._seq, r))
            if self.check_kv_every and self.steps % self.check_kv_every == 0:
                e.kv.check_invariants()  # used + free blocks == the replica's capacity, and more
                self.kv_checks += 1
        if room and self.held:
            # the balancer learns of the room one hop after the step ended and its requests take
            # another hop: the replica has begun its next step, they join the one after
            saved, self.now = self.now, now + self.cfg.network_s
            try:
                self._retry_held()
            finally:
                self.now = saved
        return finished


def simulate(specs: Iterable[RequestSpec], config: SimConfig | None = None,
             progress: Callable[[int], None] | None = None) -> SimResult:
    """Run ``specs`` (in arrival order; a list or an iterator) through ``config``'s fleet."""
    return Simulation(specs, config).run(progress)
