"""Admission: the requests a tier holds at the balancer, and the pass that decides them again.

``TierRouter.admits`` says whether a decision may be sent now (its replica's prompt tokens sent
and not yet prefilled stay within budget). A request it does not admit is *held*: its prefill
counts as queued on the replica it chose (``TierRouter.hold``), and it waits in an
:class:`AdmissionQueue`. Whenever room may have come back -- a first byte, a request ending, the
upkeep tick -- the owner runs :meth:`AdmissionQueue.run`: the held requests are decided again in
arrival order, and each one now admitted (or past ``admit_max_wait_s``) is handed to the owner's
``admit`` callback, which must make its prefill count as pending before it returns (send it:
``TierRouter.dispatched``; or reserve it for a send a moment later: ``TierRouter.reserve``), so
the next held request is decided against it.

One queue serves the server (``Balancer``: ``admit`` resolves the waiting request's future) and
the simulator (``admit`` sends at once): the same pass in the same order.

Every pass decides every held request again. Bounding it (stop after K requests in a row stay
held; requests held on the replica that got room always decided) was measured and rejected:
``prefixlb sim --replicas 256 --requests 20000 --workload mixed --policies cache_aware`` went
from p90/p99 342/560 ms unbounded to 357/615 with K = 64 and 421/671 with K = 16 (the bounded
pass is in git at commit 661e514, K = 16; K = 64 was the same code with the constant changed) -- a request
far back in the line, held for a busy replica, is often the one that should take the room a
first byte just freed elsewhere. The server runs at most one pass per event-loop turn (every
first byte of that turn shares it), which bounds its cost by the loop's pace rather than by the
number of first bytes. Pure and synchronous; the owner passes ``now``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from .router import Decision, NoReplicaAvailable, TierRouter

__all__ = ["AdmissionQueue", "Held"]


class Held:
    """One request waiting at the balancer: what deciding it again needs, and its latest decision
    (counted as queued on its replica while it waits). ``error`` is set when deciding it again
    found no replica (the owner answers as it would have on arrival); ``timed_out`` when it was
    released for having waited ``admit_max_wait_s``. ``token`` is the owner's own handle."""

    __slots__ = ("decision", "error", "exclude", "key", "max_tokens", "since", "timed_out", "token")

    def __init__(self, key: Any, decision: Decision, since: float, exclude: Sequence[int] = (),
                 max_tokens: int | None = None, token: Any = None) -> None:
        self.key = key
        self.decision = decision
        self.since = since
        self.exclude = exclude
        self.max_tokens = max_tokens
        self.token = token
        self.error: NoReplicaAvailable | None = None
        self.timed_out = False


class AdmissionQueue:
    """The requests one tier holds, in arrival order (see the module docstring)."""

    __slots__ = ("_q", "router")

    def __init__(self, router: TierRouter) -> None:
        self.router = router
        self._q: deque[Held] = deque()

    def __len__(self) -> int:
        return len(self._q)

    def __iter__(self):
        return iter(self._q)

    def hold(self, key: Any, d: Decision, now: float, exclude: Sequence[int] = (), max_tokens: int | None = None,
             token: Any = None) -> Held:
        """Hold a request whose decision ``d`` was not admitted; it goes to the back of the line."""
        self.router.hold(d, now)
        h = Held(key, d, now, exclude, max_tokens, token)
        self._q.append(h)
        return h

    def leave(self, h: Held, now: float) -> None:
        """``h`` stops waiting on its own (client gone, its own deadline): nothing stays queued for it."""
        self.router.unhold(h.decision, now)
        try:
            self._q.remove(h)
        except ValueError:
            pass  # a pass released it already

    def run(self, now: float, admit: Callable[[Held], None]) -> int:
        """Decide the held requests again, in arrival order; hand each one admitted, timed out
        or without a replica to ``admit`` (``h.decision`` is the one to send, no longer held),
        and keep the rest held, in order, on their new decisions. Returns how many were released."""
        router = self.router
        q, self._q = self._q, deque()  # (anything held while the pass runs goes behind)
        wait = router.params.admit_max_wait_s
        kept: deque[Held] = deque()
        released = 0
        for h in q:
            router.unhold(h.decision, now)
            try:
                d = router.decide(h.key, now, exclude=h.exclude, max_tokens=h.max_tokens)
            except NoReplicaAvailable as exc:
                h.error = exc
            else:
                h.decision = d
                if not router.admits(d):
                    if now - h.since < wait:
                        router.hold(d, now)
                        kept.append(h)
                        continue
                    h.timed_out = True
            released += 1
            admit(h)
        kept.extend(self._q)
        self._q = kept
        return released
