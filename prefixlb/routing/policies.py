"""Replica-choice policies: one cost model and the baselines it is measured against.

Every policy answers the same question over the same inputs: given the replicas of a tier that
may take work (already filtered: healthy, breaker closed, not draining, not excluded by a
retry) and what the prefix index matched, which replica serves this request? Policies are
pure and deterministic given their ``random.Random``; they never mutate replica state (the
router's hooks do that after dispatch).

* ``cache_aware`` (default): the lowest predicted time to first token. For each replica,
  uncached = prompt - leading tokens it holds; TTFT = fixed + (backlog + uncached) / rate +
  the steps it spans x the context its running batch attends over (see
  :mod:`prefixlb.routing.state`). A cache hit is worth exactly the
  prefill it saves and a queue costs exactly the wait it adds, so affinity, load balance, hot
  prefix replication (when the holder's queue outgrows the saving, the next request goes to a
  second replica, which then holds the prefix too) and cold-prefix spreading (equal costs ->
  the least-loaded replica, ties broken by a hash of the prompt's first blocks) all follow from one formula, with no
  thresholds to tune. Costs within ``tie`` (5%) of the best are not told apart by the replicas'
  learned speed ratios, whose noise is of that order: among them the longest match, then the
  least load (the TTFT with the ratio divided out) wins (see :mod:`prefixlb.routing.scoring`).
  A cache-pressure term charges uncached tokens placed on a replica whose cache is full for
  the prefixes they will evict (Preble's eviction cost), so under pressure a prefix is copied
  only when the queue it avoids is worth it.
* ``round_robin``: rotate through the replicas.
* ``least_loaded``: power of two choices on queued work (prefill tokens and context in
  flight), cache-blind.
* ``consistent_hash``: consistent hashing with bounded loads (CHWBL) on the first prompt
  blocks: a prefix maps to a fixed replica unless that replica has more than ``load_factor``
  times the mean in-flight requests.
* ``sglang_like``: a model of sglang-router's (and vllm-router's) ``cache_aware`` rule, from
  their source (../shared/field.md §2), for the simulator's side-by-side runs: if in-flight
  requests are imbalanced (max - min > 64 and max > 1.5 x min) the least loaded replica;
  else the replica with the longest prefix match if it covers more than 30% of the prompt;
  else the least loaded (ties to the first listed). Pair it with an index that never forgets
  (their tree keeps 2^26 characters per worker), as the simulator's ``--peer`` setting does.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import xxhash

from .scoring import score
from .state import ReplicaState

__all__ = [
    "POLICIES",
    "CacheAware",
    "ConsistentHash",
    "LeastLoaded",
    "Pick",
    "Policy",
    "RoundRobin",
    "SglangLike",
    "make_policy",
]


@dataclass(slots=True)
class Pick:
    replica: ReplicaState
    cached_tokens: float  # predicted leading tokens the replica holds
    predicted_ttft: float


class Policy:
    """Base: ``choose`` one of ``candidates`` (non-empty, in replica-id order).

    ``prefix_key`` identifies the prompt's first ``key_blocks`` blocks (the hash of block
    ``key_blocks - 1`` of the chain, or of the whole prompt when it is shorter than a block).
    """

    name = "policy"
    key_blocks = 0  # > 0: the policy reads prefix_key (the hash of the first key_blocks blocks)
    # hold requests at the balancer while their replica has much prefill outstanding
    # (TierRouter.admits); the baselines dispatch at once, as the routers they stand for do
    admission = False

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random(0)

    def choose(
        self,
        candidates: Sequence[ReplicaState],
        matches: Mapping[int, int],
        prefix_key: int,
        prompt_tokens: float,
        tokens_per_block: float,
        now: float,
        router=None,
        ids=None,
    ) -> Pick:
        """``router`` and ``ids`` (the candidates' ids as array('I')) are given by TierRouter so a
        policy can score over the tier's slab without touching Python objects."""
        raise NotImplementedError

    def replicas_changed(self, replicas: Sequence[ReplicaState]) -> None:
        """The tier's replica set changed (for policies that precompute over it)."""


def cached_for(matched_blocks: int, prompt_tokens: float, tokens_per_block: float) -> float:
    """Leading prompt tokens a replica holding ``matched_blocks`` index blocks would not prefill.

    vLLM always recomputes the last prompt token, so a hit is at most ``prompt_tokens - 1``.
    """
    if matched_blocks <= 0:
        return 0.0
    return min(prompt_tokens - 1.0, matched_blocks * tokens_per_block)


_U53 = (1 << 53) - 1
_INV53 = 1.0 / (1 << 53)


class CacheAware(Policy):
    name = "cache_aware"
    admission = True
    # ties the least load does not settle (replicas in the same state, e.g. an idle fleet) are
    # broken by the prompt's first blocks, not a random draw: every balancer instance (and every
    # worker process) breaks such a tie the same way, so a cold prefix lands on the same
    # replica whichever instance routed it, and different prefixes still spread uniformly
    key_blocks = 4

    def __init__(self, rng: random.Random | None = None, pressure_weight: float = 1.0, tie: float = 0.05,
                 memory: bool = True, congestion: bool = True) -> None:
        super().__init__(rng)
        self.pressure_weight = pressure_weight
        self.memory = memory
        self.congestion = congestion
        # costs within this fraction of the best are ties (a few percent is the noise of the learned
        # speed ratios), broken by the longest match, then the least load, then the prefix hash
        self.tie = tie

    def choose(self, candidates, matches, prefix_key, prompt_tokens, tokens_per_block, now, router=None, ids=None):
        tier = candidates[0].tier
        if router is None:  # called on a bare list of replicas (tests): build the inputs
            from array import array

            ids = array("I", [r.id for r in candidates])
            slab = candidates[0]._slab
        else:
            slab = router.slab
        rid, _cost, ttft, cached = score(
            slab, ids, matches, prompt_tokens, tokens_per_block, now, tier.fixed, tier.inv_rate,
            candidates[0].params.context_weight, tier.mean_ratio, float(candidates[0].params.step_tokens),
            candidates[0].params.staleness_s, self.pressure_weight, self.tie,
            (prefix_key & _U53) * _INV53 if prefix_key else self.rng.random(),
            router._out_tokens if router is not None else 0.0, tier.duration if self.memory else 0.0,
            router.congestion(now) if (router is not None and self.congestion) else 0.0,
        )
        r = router.replicas[rid] if router is not None else next(c for c in candidates if c.id == rid)
        return Pick(r, cached, ttft)


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self, rng: random.Random | None = None) -> None:
        super().__init__(rng)
        self._next = 0

    def choose(self, candidates, matches, prefix_key, prompt_tokens, tokens_per_block, now, router=None, ids=None):
        r = candidates[self._next % len(candidates)]
        self._next += 1
        cached = cached_for(matches.get(r.id, 0), prompt_tokens, tokens_per_block)
        return Pick(r, cached, r.predict_ttft(prompt_tokens - cached, now))


class LeastLoaded(Policy):
    name = "least_loaded"

    def choose(self, candidates, matches, prefix_key, prompt_tokens, tokens_per_block, now, router=None, ids=None):
        if len(candidates) == 1:
            r = candidates[0]
        else:
            a, b = self.rng.sample(range(len(candidates)), 2)
            ra, rb = candidates[a], candidates[b]
            la, lb = (ra.load(now), ra.inflight), (rb.load(now), rb.inflight)
            r = ra if la <= lb else rb
        cached = cached_for(matches.get(r.id, 0), prompt_tokens, tokens_per_block)
        return Pick(r, cached, r.predict_ttft(prompt_tokens - cached, now))


class ConsistentHash(Policy):
    """CHWBL on the hash of the first ``key_blocks`` blocks of the prompt."""

    name = "consistent_hash"
    key_blocks = 4

    def __init__(self, rng: random.Random | None = None, vnodes: int = 160, load_factor: float = 1.25) -> None:
        super().__init__(rng)
        self.vnodes = vnodes
        self.load_factor = load_factor
        self._points: list[int] = []
        self._owners: list[int] = []

    def replicas_changed(self, replicas):
        ring = sorted(
            (xxhash.xxh64_intdigest(f"{r.id}/{v}".encode()), r.id) for r in replicas for v in range(self.vnodes)
        )
        self._points = [p for p, _ in ring]
        self._owners = [o for _, o in ring]

    def choose(self, candidates, matches, prefix_key, prompt_tokens, tokens_per_block, now, router=None, ids=None):
        by_id = {r.id: r for r in candidates}
        total = sum(r.inflight for r in candidates)
        bound = self.load_factor * (total + 1) / len(candidates)
        n = len(self._points)
        r = None
        if n:
            i = bisect.bisect_left(self._points, prefix_key) % n
            seen = set()
            for step in range(n):
                rid = self._owners[(i + step) % n]
                if rid in seen:
                    continue
                seen.add(rid)
                cand = by_id.get(rid)
                if cand is not None and cand.inflight + 1 <= bound:
                    r = cand
                    break
                if len(seen) == len(by_id) + 64:  # every candidate (and then some) was visited
                    break
        if r is None:
            r = min(candidates, key=lambda c: (c.inflight, c.id))
        cached = cached_for(matches.get(r.id, 0), prompt_tokens, tokens_per_block)
        return Pick(r, cached, r.predict_ttft(prompt_tokens - cached, now))


class SglangLike(Policy):
    """sglang-router's cache_aware decision (thresholds at its CLI defaults)."""

    name = "sglang_like"

    def __init__(self, rng: random.Random | None = None, cache_threshold: float = 0.3, balance_abs: int = 64,
                 balance_rel: float = 1.5) -> None:
        super().__init__(rng)
        self.cache_threshold = cache_threshold
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel

    def choose(self, candidates, matches, prefix_key, prompt_tokens, tokens_per_block, now, router=None, ids=None):
        loads = [r.inflight for r in candidates]
        lo, hi = min(loads), max(loads)
        least = candidates[loads.index(lo)]
        if hi - lo > self.balance_abs and hi > self.balance_rel * lo:
            r = least
        else:
            best, best_m = None, 0
            for c in candidates:
                m = matches.get(c.id, 0)
                if m > best_m:
                    best, best_m = c, m
            rate = best_m * tokens_per_block / prompt_tokens if best is not None else 0.0
            r = best if rate > self.cache_threshold else least
        cached = cached_for(matches.get(r.id, 0), prompt_tokens, tokens_per_block)
        return Pick(r, cached, r.predict_ttft(prompt_tokens - cached, now))


POLICIES: dict[str, type[Policy]] = {
    "cache_aware": CacheAware,
    "round_robin": RoundRobin,
    "least_loaded": LeastLoaded,
    "consistent_hash": ConsistentHash,
    "sglang_like": SglangLike,
}


def make_policy(name: str, rng: random.Random | None = None, **params) -> Policy:
    """The policy registered as ``name``; ValueError naming the valid ones otherwise."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {', '.join(POLICIES)}") from None
    return cls(rng, **params)
