"""The routing core of one tier: decide, then learn. Used as-is by the server, the simulator
and the tests (DESIGN.md: one routing core, written once).

``decide(key, now)`` is pure with respect to the outside world: one native call hashes the
prompt and matches it against the index, the policy picks a replica, and a :class:`Decision`
comes back. Nothing is recorded until the caller dispatches: the hooks ``dispatched``,
``first_token``, ``finished`` and ``failed`` are the only way replica state and the index
change, so the load accounting cannot leak (each dispatched decision is closed by exactly one
of ``finished`` / ``failed``, which the caller guarantees with ``try/finally``).
"""

from __future__ import annotations

import math
import random
import time
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import xxhash

from prefixlb.index import PrefixIndex

from .policies import Pick, Policy, make_policy
from .precise import EventIndex
from .prompt import PromptKey
from .scoring import F_COUNT
from .state import CostParams, ReplicaState, TierModel

__all__ = ["Decision", "NoReplicaAvailable", "TierRouter"]

#: index capacity for a replica whose KV capacity is not known yet (blocks of block_bytes)
DEFAULT_CAPACITY_TOKENS = 256_000
#: time constant of the tier's utilisation estimate (seconds)
_WORK_TAU = 5.0


class NoReplicaAvailable(Exception):
    """No replica of the tier can take the request (all unhealthy, draining or excluded)."""


@dataclass(slots=True)
class Decision:
    replica: ReplicaState
    chain: object  # the prompt's block chain (prefixlb.index Chain / array)
    matched_blocks: int  # index blocks the chosen replica was believed to hold
    prompt_tokens: float  # estimated (exact for token-id prompts)
    cached_tokens: float  # predicted prefix-cache hit on the chosen replica
    predicted_ttft: float
    policy: str
    out_tokens: float  # the output budget the request may use (max_tokens, or the tier default)
    decided_at: float
    # prompt - cached, and that plus the output budget: the KV blocks (in tokens) the request
    # allocates on the replica. Given at construction (``_decision``); read ~10 times a request,
    # which as properties cost more than the arithmetic
    uncached_tokens: float
    kv_tokens: float
    decision_s: float = 0.0  # wall time spent deciding
    # set by the hooks
    dispatched_at: float | None = None
    backlog_end: float = 0.0
    work_at_dispatch: float = 0.0  # token-equivalents ahead of the first token (the TTFT model's x)
    queued_at_dispatch: float = 0.0  # of which prefill queued ahead (the model's estimate)
    pending: float = 0.0  # tokens this request holds in its replica's pending_prefill (admission)
    held: bool = False  # waiting at the balancer for its replica (TierRouter.hold)
    first_token_at: float | None = None
    closed: bool = False
    inserted: bool = False
    attempts: list[int] = field(default_factory=list)
    remote: bool = False  # another balancer instance dispatched it (peer sync)
    tag: int = 0  # this instance's id for it, as peers know it


def _decision(replica: ReplicaState, chain: object, matched_blocks: int, prompt_tokens: float, cached_tokens: float,
              predicted_ttft: float, policy: str, out_tokens: float, decided_at: float, decision_s: float = 0.0,
              remote: bool = False) -> Decision:
    u = prompt_tokens - cached_tokens
    return Decision(replica, chain, matched_blocks, prompt_tokens, cached_tokens, predicted_ttft, policy, out_tokens,
                    decided_at, u, u + out_tokens, decision_s, remote=remote)


class TierRouter:
    """Replica choice for one tier: a prefix index, the replicas' states and a policy."""

    def __init__(
        self,
        name: str = "default",
        *,
        policy: str | Policy = "cache_aware",
        params: CostParams | None = None,
        block_bytes: int = 64,
        bytes_per_token: float = 4.0,
        default_capacity_tokens: int = DEFAULT_CAPACITY_TOKENS,
        seed: int = 0,
        clock=time.monotonic,
    ) -> None:
        self.name = name
        self.params = params or CostParams()
        self.block_bytes = block_bytes
        self.bytes_per_token = bytes_per_token
        self.default_capacity_tokens = default_capacity_tokens
        self.rng = random.Random(seed)
        self.policy = policy if isinstance(policy, Policy) else make_policy(policy, self.rng)
        self.admission = self.params.admit_tokens > 0.0 and self.policy.admission  # see admits()
        self.index = PrefixIndex(self._blocks_for_tokens(default_capacity_tokens))
        self.replicas: dict[int, ReplicaState] = {}
        self._ordered: list[ReplicaState] = []
        self.model = TierModel(self.params)
        self.default_output_tokens = 256.0  # output budget assumed when a request sets none
        self._work = 0.0  # EW sum of uncached prompt tokens dispatched (time constant _WORK_TAU)
        self._work_t = 0.0
        self._out_tokens = self.default_output_tokens  # of the decision being made (for policies)
        self.slab = array("d")  # one row of F_COUNT doubles per replica id (see scoring.py)
        self._available: list[ReplicaState] = []
        self._available_ids = array("I")
        self._available_dirty = True
        self._decisions = 0
        self.clock = clock
        self.events: EventIndex | None = None  # precise mode (enable_precise)
        # peer sync: called as observer(kind, decision, now) after each hook on a local decision,
        # kind in "dispatched", "first_token", "finished", "failed"
        self.observer = None
        # admission: called (no arguments) when a replica's pending prefill went down and on
        # each upkeep tick (a replica that came back, a wait that timed out), so callers holding
        # requests (prefixlb.routing.admission) try them again
        self.room_listener = None

    def enable_precise(self, block_tokens: int, grace: float = 1.0) -> EventIndex:
        """Precise mode: prompts arrive as token ids (4 bytes each) and the index follows the
        replicas' KV events (:mod:`prefixlb.routing.precise`), one index block per vLLM block."""
        self.block_bytes = 4 * block_tokens
        self.bytes_per_token = 4.0
        self.events = EventIndex(self.index, block_tokens, grace=grace)
        for r in self._ordered:
            self._apply_capacity(r)
        return self.events

    # -- replica set ------------------------------------------------------------------------

    def add_replica(self, replica_id: int, url: str = "", capacity_tokens: int | None = None) -> ReplicaState:
        if replica_id in self.replicas:
            raise ValueError(f"replica {replica_id} is already in tier {self.name!r}")
        need = (replica_id + 1) * F_COUNT
        if len(self.slab) < need:
            grown = array("d", self.slab)
            grown.extend([0.0] * (need - len(self.slab)))
            self.slab = grown
            for other in self.replicas.values():
                other.rebind(grown)
        r = ReplicaState(replica_id, url, self.params, self.model, self.slab, self._mark_available_dirty)
        self.replicas[replica_id] = r
        self._reorder()
        self.set_capacity_tokens(replica_id, capacity_tokens or self.default_capacity_tokens)
        return r

    def remove_replica(self, replica_id: int) -> None:
        self.replicas.pop(replica_id, None)
        self.index.remove_replica(replica_id)
        if self.events is not None:
            self.events.forget(replica_id)
        self._reorder()

    def set_capacity_tokens(self, replica_id: int, tokens: int) -> None:
        """Bound what the index believes ``replica_id`` holds to its KV capacity."""
        r = self.replicas[replica_id]
        r.capacity_tokens = int(tokens)
        self._apply_capacity(r)

    def _apply_capacity(self, r: ReplicaState) -> None:
        tokens = (r.capacity_tokens or self.default_capacity_tokens) * r.capacity_scale
        self.index.set_capacity(r.id, self._blocks_for_tokens(tokens))

    def _blocks_for_tokens(self, tokens: float) -> int:
        return max(1, int(tokens * self.bytes_per_token / self.block_bytes))

    def _reorder(self) -> None:
        self._ordered = [self.replicas[k] for k in sorted(self.replicas)]
        self.policy.replicas_changed(self._ordered)
        self._available_dirty = True

    def _mark_available_dirty(self) -> None:
        self._available_dirty = True

    def available(self, exclude: Iterable[int] = ()) -> tuple[list[ReplicaState], array]:
        """The replicas that may take work now (minus ``exclude``), and their ids as array('I')."""
        if self._available_dirty:
            self._available = [r for r in self._ordered if r.available]
            self._available_ids = array("I", [r.id for r in self._available])
            self._available_dirty = False
        if not exclude:
            return self._available, self._available_ids
        ex = set(exclude)
        reps = [r for r in self._available if r.id not in ex]
        return reps, array("I", [r.id for r in reps])

    # -- the decision -------------------------------------------------------------------------

    @property
    def tokens_per_block(self) -> float:
        return self.block_bytes / self.bytes_per_token

    def decide(self, key: PromptKey, now: float | None = None, exclude: Iterable[int] = (),
               max_tokens: int | None = None) -> Decision:
        """Choose a replica for a prompt; raises NoReplicaAvailable when none can take it.

        ``max_tokens`` is the request's output budget (None: ``default_output_tokens``).
        """
        t0 = time.perf_counter()
        now = self.clock() if now is None else now
        self._decisions += 1
        chain, matches = self.index.lookup(key.data, self.block_bytes, key.seed)
        candidates, ids = self.available(exclude)
        if not candidates:
            raise NoReplicaAvailable(
                f"no replica of tier {self.name!r} can take the request "
                f"({len(self._ordered)} known, {len(set(exclude))} already tried)"
            )
        if key.token_ids is not None:
            prompt_tokens = float(key.token_ids)
        else:
            prompt_tokens = len(key.data) / self.bytes_per_token
            if prompt_tokens < 1.0:
                prompt_tokens = 1.0
        kb = self.policy.key_blocks
        if not kb:
            prefix_key = 0
        elif len(chain):
            prefix_key = chain[(len(chain) if len(chain) < kb else kb) - 1]
        else:
            prefix_key = xxhash.xxh64_intdigest(key.data, key.seed)
        out = float(max_tokens) if max_tokens else self.default_output_tokens
        self._out_tokens = out
        pick: Pick = self.policy.choose(candidates, matches, prefix_key, prompt_tokens, self.tokens_per_block, now,
                                        self, ids)
        matched = matches.get(pick.replica.id, 0)
        return _decision(pick.replica, chain, matched, prompt_tokens, pick.cached_tokens, pick.predicted_ttft,
                         self.policy.name, out, now, time.perf_counter() - t0)

    def maintain(self, now: float | None = None) -> None:
        """Periodic upkeep, off the request path (the server's tick, the simulator's clock):
        each replica's cache fullness from the index, and the drift of unobserved speed ratios
        back toward the tier's."""
        now = self.clock() if now is None else now
        if self.events is not None:
            self.events.expire(now)
        if self.room_listener is not None:  # a replica that came back, a wait that timed out
            self.room_listener()
        per = self.index.stats()["per_replica"]
        for r in self._ordered:
            r.relax(now)
            row = per.get(r.id)
            if row:
                r.observe_fullness(row["blocks"] / row["capacity"])

    def utilisation(self, now: float) -> float:
        """The tier's prefill utilisation: uncached tokens dispatched per second (exponentially
        weighted over ``_WORK_TAU`` s) over what its available replicas prefill per second."""
        n = len(self._available) if not self._available_dirty else sum(1 for r in self._ordered if r.available)
        if not n:
            return 1.0
        dt = now - self._work_t
        rate = (self._work * math.exp(-dt / _WORK_TAU) if dt > 0.0 else self._work) / _WORK_TAU
        return rate * self.model.inv_rate / n

    def congestion(self, now: float) -> float:
        """rho / (1 - rho): the delay one more unit of work imposes on others, per unit (M/M/1)."""
        rho = self.utilisation(now)
        if rho > 0.95:
            rho = 0.95
        return rho / (1.0 - rho)

    # -- admission ----------------------------------------------------------------------------

    def admits(self, d: Decision) -> bool:
        """May ``d`` be sent now? False while its replica would have more than
        ``params.admit_tokens`` of prompt tokens sent and not yet prefilled with this request's
        uncached tokens added -- counted at most half the budget, so a long prompt goes once no
        more than half the budget is outstanding.

        A vLLM replica runs every waiting prompt in its next step, so a request sent to a replica
        with much prefill outstanding waits for all of it and is then batched with whatever else
        arrived. Held at the balancer instead, it is decided again when any replica's prefill
        comes back (``room_listener``) and goes to whichever replica then serves it best -- often
        the same one, a little later, in a smaller step. Only requests whose first byte the
        caller will report (``dispatched(..., track_prefill=True)``) count as pending, and only
        policies with ``admission`` (cache_aware; the baselines dispatch at once) hold.
        """
        if not self.admission:
            return True
        budget = self.params.admit_tokens
        # a prompt counts at most half the budget: a long one goes once no more than half the
        # budget is outstanding, rather than waiting for the replica to have nothing pending
        # (serialising long prompts cost llm-d's shape its tail in the simulator)
        u = d.uncached_tokens
        return d.replica.pending_prefill + (u if u < 0.5 * budget else 0.5 * budget) <= budget

    def hold(self, d: Decision, now: float | None = None) -> None:
        """``d`` is not admitted and will wait at the balancer: count its prefill as queued on its
        replica meanwhile (otherwise every held request keeps choosing a replica whose queue
        the model cannot see, and a hot prefix is never replicated). Undo with ``unhold``."""
        if d.held:
            return
        d.replica.queue_prefill(d.uncached_tokens, self.clock() if now is None else now)
        d.held = True

    def unhold(self, d: Decision, now: float | None = None) -> None:
        """Before deciding a held request again, or when it stops waiting."""
        if not d.held:
            return
        d.replica.unqueue_prefill(d.uncached_tokens, self.clock() if now is None else now)
        d.held = False

    def reserve(self, d: Decision) -> None:
        """``d`` was admitted and will be sent in a moment (the server's held request resumes on
        its own task): count its prefill as pending now, so what is decided before it is sent
        sees it. ``dispatched`` keeps the reservation; ``release`` returns it if ``d`` is not sent."""
        if self.admission and not d.pending and not d.remote:
            d.pending = d.uncached_tokens if d.uncached_tokens > 1.0 else 1.0
            d.replica.pending_prefill += d.pending

    def release(self, d: Decision) -> None:
        """Undo ``reserve`` for a decision that was not sent after all."""
        if d.dispatched_at is None:
            self._release_prefill(d)

    def _release_prefill(self, d: Decision) -> None:
        if d.pending:
            r = d.replica
            left = r.pending_prefill - d.pending
            r.pending_prefill = left if left > 0.0 else 0.0
            d.pending = 0.0
            if self.room_listener is not None:
                self.room_listener()

    # -- hooks: the only writers of replica state and the index ------------------------------

    def dispatched(self, d: Decision, now: float | None = None, track_prefill: bool = True) -> None:
        """The request was sent to ``d.replica``: it will hold the prompt's blocks.
        ``track_prefill``: the caller will report its first byte (``first_token``), so its prefill
        counts as pending on the replica until then (admission); False for a request whose first
        byte cannot be seen (not streamed)."""
        now = self.clock() if now is None else now
        r = d.replica
        if track_prefill:
            self.reserve(d)  # (kept if admission reserved it already)
        else:
            self._release_prefill(d)  # a reservation (``reserve``) its first byte would never return
        d.work_at_dispatch, d.queued_at_dispatch = r.feature(d.uncached_tokens, now)
        d.backlog_end = r.on_dispatch(d.uncached_tokens, d.prompt_tokens, now, d.kv_tokens)
        dt = now - self._work_t
        self._work = (self._work * math.exp(-dt / _WORK_TAU) if dt > 0.0 else self._work) + d.uncached_tokens
        self._work_t = now
        d.dispatched_at = now
        d.attempts.append(r.id)
        if r.id in self.replicas:
            self.index.insert(r.id, d.chain)
            d.inserted = True
            if self.events is not None:
                self.events.speculate(r.id, d.chain)
        if self.observer is not None and not d.remote:
            self.observer("dispatched", d, now)

    def remote_dispatched(self, replica_id: int, chain, prompt_tokens: float, cached_tokens: float,
                          out_tokens: float, now: float | None = None) -> Decision | None:
        """Another balancer instance sent a request to ``replica_id``: count its load and hold its
        blocks there, as if this instance had sent it (peer sync keeps instances' views equal)."""
        r = self.replicas.get(replica_id)
        if r is None:
            return None
        now = self.clock() if now is None else now
        # a peer's numbers, held to what a local decision can produce (cached < prompt, >= 0)
        cached_tokens = min(max(cached_tokens, 0.0), max(prompt_tokens - 1.0, 0.0))
        d = _decision(r, chain, 0, prompt_tokens, cached_tokens, 0.0, "remote", out_tokens, now, remote=True)
        self.dispatched(d, now)
        return d

    def extend(self, d: Decision, chain: Sequence[int], now: float | None = None) -> None:
        """The prompt's full chain became known after dispatch (precise mode tokenizes a prompt's
        unseen tail off the request path): hold it on the replica like the dispatched part."""
        if not d.inserted or d.replica.id not in self.replicas or len(chain) <= len(d.chain):
            return
        now = self.clock() if now is None else now
        rid = d.replica.id
        self.index.insert(rid, chain)
        d.chain = chain
        if self.events is not None:
            self.events.speculate(rid, chain)
            if d.first_token_at is not None or d.closed:
                self.events.settle(rid, chain, now)

    def first_token(self, d: Decision, now: float | None = None) -> None:
        """The first response byte arrived: the prefill is done; learn the TTFT."""
        if d.first_token_at is not None or d.dispatched_at is None:
            return
        now = self.clock() if now is None else now
        d.first_token_at = now
        r = d.replica
        r.on_prefill_done(d.backlog_end, d.dispatched_at, now)
        self._release_prefill(d)
        # Learn only from a request that had (by the model's own account) little prefill queued
        # ahead of it: its TTFT then measures the replica, not the model's queue estimate. Fed
        # every sample, the regression of TTFT on an estimated queue reads the queue's errors
        # as a faster rate and a larger fixed cost (errors in the variable), the faster rate
        # drains the modelled queue too soon, and the errors grow: unstable under load.
        u = d.uncached_tokens if d.uncached_tokens > 1.0 else 1.0
        if d.queued_at_dispatch <= self.params.learn_queue_share * u:
            r.observe_ttft(d.work_at_dispatch, now - d.dispatched_at, now)
        if self.events is not None and d.inserted:
            self.events.settle(r.id, d.chain, now)
        if self.observer is not None and not d.remote:
            self.observer("first_token", d, now)

    def finished(self, d: Decision, now: float | None = None, usage: dict | None = None,
                 prompt_text_bytes: int | None = None) -> None:
        """The request ended after reaching the replica (success, or an error after the first byte)."""
        if d.closed or d.dispatched_at is None:
            return
        now = self.clock() if now is None else now
        d.closed = True
        r = d.replica
        if d.first_token_at is None:
            r.on_prefill_done(d.backlog_end, d.dispatched_at, now, sync=False)  # on_finish syncs
            if self.events is not None and d.inserted:
                self.events.settle(r.id, d.chain, now)
        r.on_finish(d.prompt_tokens, d.kv_tokens)
        self._release_prefill(d)
        self.model.observe_duration(now - d.dispatched_at)
        if usage:
            self._learn_from_usage(d, usage, prompt_text_bytes)
        if self.observer is not None and not d.remote:
            self.observer("finished", d, now)

    def failed(self, d: Decision, now: float | None = None) -> None:
        """The request never reached the replica (connect error, refused, timed out before any
        byte): take back its load and the blocks it would have added."""
        if d.closed or d.dispatched_at is None:
            return
        now = self.clock() if now is None else now
        d.closed = True
        d.replica.on_cancel(d.uncached_tokens, d.prompt_tokens, now, d.kv_tokens)
        self._release_prefill(d)
        if self.events is not None:
            if d.inserted:  # unconfirmed blocks go at the next upkeep; confirmed ones stay
                self.events.settle(d.replica.id, d.chain, now - self.events.grace)
        elif d.inserted and d.replica.id in self.replicas and len(d.chain) > d.matched_blocks:
            self.index.remove_blocks(d.replica.id, d.chain[d.matched_blocks:])
        if self.observer is not None and not d.remote:
            self.observer("failed", d, now)

    # -- feedback ---------------------------------------------------------------------------------

    def _learn_from_usage(self, d: Decision, usage: dict, text_bytes: int | None) -> None:
        prompt = usage.get("prompt_tokens")
        if isinstance(prompt, int) and prompt > 0 and text_bytes:
            # bytes per token of this tier's traffic, so block <-> token conversions stay right
            self.bytes_per_token += 0.02 * (min(max(text_bytes / prompt, 1.0), 16.0) - self.bytes_per_token)
        details = usage.get("prompt_tokens_details") or {}
        actual = details.get("cached_tokens") if isinstance(details, dict) else None
        if not isinstance(actual, int) or self.events is not None:  # precise: the events say what it holds
            return
        r = d.replica
        tol = self.tokens_per_block * 2
        if actual + tol < d.cached_tokens:
            # the replica had evicted what we thought it held: believe it holds less
            r.capacity_scale = max(0.25, r.capacity_scale * 0.95)
            self._apply_capacity(r)
        elif r.capacity_scale < 1.0 and actual >= d.cached_tokens:
            r.capacity_scale = min(1.0, r.capacity_scale * 1.01)
            self._apply_capacity(r)

    # -- introspection ------------------------------------------------------------------------------

    def snapshot(self, now: float | None = None) -> list[dict]:
        now = self.clock() if now is None else now
        per = self.index.stats()["per_replica"]
        return [
            {
                "id": r.id,
                "url": r.url,
                "available": r.available,
                "draining": r.draining,
                "inflight": r.inflight,
                "backlog_tokens": round(r.backlog(now), 1),
                "prefill_tokens_per_s": round(r.prefill_rate, 1),
                "fixed_ms": round(r.fixed_s * 1e3, 2),
                "context_tokens": round(r.context),
                "capacity_tokens": r.capacity_tokens,
                "capacity_scale": round(r.capacity_scale, 3),
                "index_blocks": per.get(r.id, {}).get("blocks", 0),
            }
            for r in self._ordered
        ]

    def replicas_in_order(self) -> Sequence[ReplicaState]:
        return self._ordered
