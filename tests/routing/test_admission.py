"""The admission queue (prefixlb.routing.admission): the pass the server and the simulator share."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefixlb.routing import CostParams, TierRouter, prompt_key
from prefixlb.routing.admission import AdmissionQueue

PARAMS = CostParams(prefill_tokens_per_s=10_000, fixed_s=0.01, admit_max_wait_s=2.0)
BUDGET = PARAMS.admit_tokens  # 6,144 tokens


def router(n=1):
    t = TierRouter("t", policy="cache_aware", params=PARAMS, seed=7, clock=lambda: 0.0)
    for i in range(n):
        t.add_replica(i, f"http://r{i}")
    return t


def key(tag: str, tokens: int):
    """A cold prompt of about ``tokens`` tokens (4 bytes each)."""
    return prompt_key({"messages": [{"role": "user", "content": f"{tag} " + "x" * (4 * tokens)}]}, chat=True)


def fill(t, tokens=int(0.7 * BUDGET)):
    """Send one request that leaves ``tokens`` of prefill pending on replica 0."""
    d = t.decide(key("filler", tokens), 0.0)
    t.dispatched(d, 0.0)
    return d


class Sent(list):
    """An ``admit`` callback that sends at once (as the simulator does) and records the order."""

    def __init__(self, t):
        super().__init__()
        self.t = t

    def __call__(self, h):
        assert not h.decision.held and h.error is None
        self.t.dispatched(h.decision, 0.0)
        self.append(h.token)


def test_held_requests_are_decided_again_in_arrival_order_and_each_admission_counts_for_the_next():
    t = router(1)
    first = fill(t)
    q = AdmissionQueue(t)
    for i in range(3):
        d = t.decide(key(f"r{i}", int(0.4 * BUDGET)), 0.0)
        assert not t.admits(d)
        q.hold(key(f"r{i}", int(0.4 * BUDGET)), d, 0.0, token=i)
    assert len(q) == 3 and all(h.decision.held for h in q)
    # held prefill counts as queued on the replica (the cost model sees it), not as pending
    assert t.replicas[0].pending_prefill == pytest.approx(first.uncached_tokens)
    sent = Sent(t)
    assert q.run(0.1, sent) == 0  # no room yet: all stay, in order
    assert [h.token for h in q] == [0, 1, 2]
    t.first_token(first, 0.2)
    assert q.run(0.2, sent) == 2  # 40% + 40% fit in the budget, the third does not
    assert sent == [0, 1] and [h.token for h in q] == [2]
    assert t.replicas[0].pending_prefill <= BUDGET


def test_a_pass_decides_each_held_request_once_and_keeps_it_held_once():
    t = router(2)
    for r in (0, 1):  # both replicas with 70% of the budget pending
        d = t.decide(key(f"filler{r}", int(0.7 * BUDGET)), 0.0)
        t.dispatched(d, 0.0)
    q = AdmissionQueue(t)
    for i in range(10):
        k = key(f"r{i}", int(0.6 * BUDGET))
        q.hold(k, t.decide(k, 0.0), 0.0, token=i)
    decided = []
    decide = t.decide
    t.decide = lambda *a, **kw: decided.append(1) or decide(*a, **kw)
    before = sum(r.backlog(0.0) for r in t.replicas.values())
    assert q.run(0.0, Sent(t)) == 0 and len(decided) == 10
    assert q.run(0.0, Sent(t)) == 0 and len(decided) == 20
    assert [h.token for h in q] == list(range(10)) and all(h.decision.held for h in q)
    # each request's prefill is queued on exactly one replica however often it was decided
    assert sum(r.backlog(0.0) for r in t.replicas.values()) == pytest.approx(before)


def test_a_request_held_for_admit_max_wait_s_is_released_with_its_latest_decision():
    t = router(1)
    fill(t)
    q = AdmissionQueue(t)
    k = key("late", int(0.6 * BUDGET))
    h = q.hold(k, t.decide(k, 0.0), 0.0, token="late")
    got = []
    assert q.run(1.0, got.append) == 0 and not got
    assert q.run(2.0, got.append) == 1 and got == [h] and h.timed_out and not h.decision.held
    assert not q


def test_no_replica_left_releases_the_request_with_the_error():
    t = router(1)
    fill(t)
    q = AdmissionQueue(t)
    k = key("orphan", int(0.6 * BUDGET))
    h = q.hold(k, t.decide(k, 0.0), 0.0)
    t.replicas[0].draining = True
    got = []
    assert q.run(0.1, got.append) == 1 and got == [h] and h.error is not None and not q


def test_leave_takes_back_what_the_request_queued_and_is_harmless_after_a_release():
    t = router(1)
    fill(t)
    q = AdmissionQueue(t)
    k = key("gone", int(0.6 * BUDGET))
    before = t.replicas[0].backlog(0.0)
    h = q.hold(k, t.decide(k, 0.0), 0.0)
    assert t.replicas[0].backlog(0.0) > before
    q.leave(h, 0.0)
    assert not q and t.replicas[0].backlog(0.0) == pytest.approx(before) and not h.decision.held
    q.leave(h, 0.0)  # twice (a pass released it, then the client left): nothing more happens
    assert t.replicas[0].backlog(0.0) == pytest.approx(before)


def test_reserve_then_release_leaves_no_pending_prefill_and_dispatch_keeps_one_reservation():
    t = router(1)
    d = t.decide(key("a", 1000), 0.0)
    t.reserve(d)
    t.reserve(d)  # idempotent
    assert t.replicas[0].pending_prefill == pytest.approx(d.uncached_tokens)
    t.dispatched(d, 0.0)  # the reservation becomes the dispatch's pending count, not a second one
    assert t.replicas[0].pending_prefill == pytest.approx(d.uncached_tokens)
    t.first_token(d, 0.1)
    assert t.replicas[0].pending_prefill == 0
    d2 = t.decide(key("b", 1000), 0.2)
    t.reserve(d2)
    t.release(d2)  # not sent after all (its replica's breaker refused it)
    assert t.replicas[0].pending_prefill == 0
    d3 = t.decide(key("c", 1000), 0.3)
    t.reserve(d3)
    t.dispatched(d3, 0.3, track_prefill=False)  # not streamed: no first byte will return it
    assert t.replicas[0].pending_prefill == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["arrive"] * 4 + ["first", "pass", "leave"]),
                          st.integers(1500, 5000)), min_size=10, max_size=80))
def test_pending_prefill_is_what_was_admitted_and_not_yet_prefilled_whatever_happens(ops):
    """Invariants over any interleaving: a replica's pending prefill is the sum over admitted
    requests whose first byte has not come back; each admission within the budget (or timed out);
    nothing is lost -- every request is held, in flight or done."""
    t = router(2)
    q = AdmissionQueue(t)
    inflight, done, clock = [], 0, [0.0]
    arrived = 0

    def admit(h):
        d = h.decision
        r = d.replica
        assert h.timed_out or r.pending_prefill + min(d.uncached_tokens, 0.5 * BUDGET) <= BUDGET + 1e-6
        t.dispatched(d, clock[0])
        inflight.append(d)

    for op, n in ops:
        clock[0] += 0.01
        now = clock[0]
        if op == "arrive":
            arrived += 1
            k = key(f"p{arrived}", n)
            d = t.decide(k, now)
            if t.admits(d):
                t.dispatched(d, now)
                inflight.append(d)
            else:
                q.hold(k, d, now)
        elif op == "first" and inflight:
            d = inflight.pop(n % len(inflight))
            t.first_token(d, now)
            t.finished(d, now)
            done += 1
        elif op == "pass":
            q.run(now, admit)
        elif op == "leave" and len(q):
            q.leave(list(q)[n % len(q)], now)
            arrived -= 1  # it never was sent: count it out
        for r in t.replicas.values():
            want = sum(d.pending for d in inflight if d.replica is r)
            assert r.pending_prefill == pytest.approx(want, abs=1e-6)
        assert arrived == len(q) + len(inflight) + done
    # drain: everything finishes, then a full pass releases the rest (admitted or timed out)
    while inflight or len(q):
        clock[0] += 1.0
        for d in inflight:
            t.first_token(d, clock[0])
            t.finished(d, clock[0])
        done += len(inflight)
        inflight.clear()
        q.run(clock[0], admit)
    assert all(r.pending_prefill == 0 and r.backlog(clock[0] + 1e6) == 0 for r in t.replicas.values())
