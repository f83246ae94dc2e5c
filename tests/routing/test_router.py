"""Replica choice: the behaviours the field's users ask for (../shared/field.md §4), pinned."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prefixlb.routing import CostParams, NoReplicaAvailable, TierRouter, prompt_key

PARAMS = CostParams(prefill_tokens_per_s=10_000, fixed_s=0.01)


def router(n=4, policy="cache_aware", **kw):
    t = TierRouter("t", policy=policy, params=PARAMS, seed=7, clock=lambda: 0.0, **kw)
    for i in range(n):
        t.add_replica(i, f"http://r{i}")
    return t


def chat(system: str, user: str):
    return prompt_key({"messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}, chat=True)


SYS = [f"tenant {k} system prompt. " * 200 for k in range(8)]  # ~5KB each, ~1,250 tokens


def send(t, key, now, finish=True):
    d = t.decide(key, now)
    t.dispatched(d, now)
    if finish:
        t.first_token(d, now + d.predicted_ttft)
        t.finished(d, now + d.predicted_ttft + 0.05)
    return d


def test_shared_prefixes_stick_to_one_replica():
    t = router()
    first = send(t, chat(SYS[0], "q0"), 0.0).replica.id
    for i in range(1, 30):
        d = send(t, chat(SYS[0], f"question {i}"), i * 1.0)
        assert d.replica.id == first
        assert d.cached_tokens > 1000  # predicted hit on the shared system prompt


def test_cold_prefixes_spread_instead_of_piling_on_the_first_replica():
    """sglang#14305 / peers.md §5: cold misses all went to the first-listed worker."""
    t = router(4)
    # sequential, each finished before the next: every replica idle at each decision
    chosen = [send(t, chat(SYS[k], "hello"), float(k)).replica.id for k in range(8)]
    assert len(set(chosen)) >= 3
    # concurrent (nothing finishes): queued work pushes each new prefix elsewhere
    t2 = router(4)
    chosen = [send(t2, chat(SYS[k], "hello"), 0.0, finish=False).replica.id for k in range(8)]
    assert sorted(chosen.count(i) for i in range(4)) == [2, 2, 2, 2]


def test_a_hot_replica_stops_receiving_cold_work():
    t = router(4)
    hot = t.replicas[0]
    for i in range(20):  # 20 long uncached prompts queued on replica 0
        d = t.decide(chat(f"unique {i} " * 800, "x"), 0.0, exclude=[1, 2, 3])
        t.dispatched(d, 0.0)
    assert hot.backlog(0.0) > 30_000
    for k in range(10):
        assert send(t, chat(f"cold {k} " * 300, "y"), 0.0).replica.id != 0


def test_a_hot_prefix_is_replicated_when_its_queue_outgrows_the_saving():
    t = router(4)
    owner = send(t, chat(SYS[1], "warm"), 0.0).replica.id
    burst = [send(t, chat(SYS[1], f"burst {i} " + "tail " * 400), 1.0, finish=False) for i in range(40)]
    # the owner takes the first share, then other replicas pick the prefix up
    assert burst[0].replica.id == owner and len({d.replica.id for d in burst}) >= 2
    # ...each paying for the shared prefix once, then serving it from cache
    misses = [d for d in burst if d.cached_tokens < 1000]
    assert len(misses) == len({d.replica.id for d in burst}) - 1


def test_affinity_survives_a_moderate_imbalance():
    """sglang#32195: one imbalance disabled prefix routing fleet-wide. Here a saving worth more
    than the queue keeps the request on its cache."""
    t = router(4)
    owner = send(t, chat(SYS[2], "a"), 0.0).replica.id
    d = t.decide(chat("other " * 300, "z"), 1.0, exclude=[i for i in range(4) if i != owner])
    t.dispatched(d, 1.0)  # ~450 uncached tokens of unrelated work on the owner
    assert send(t, chat(SYS[2], "b"), 1.0).replica.id == owner


@given(st.lists(st.tuples(st.integers(0, 7), st.booleans(), st.booleans()), min_size=1, max_size=60))
def test_accounting_returns_to_zero_whatever_the_outcomes(events):
    """vllm-project/router#215: counters leaked on cancel. Every dispatch is closed once."""
    t = router(3)
    open_ = []
    for k, ok, got_first in events:
        d = t.decide(chat(SYS[k], "q"), 0.0)
        t.dispatched(d, 0.0)
        open_.append((d, ok, got_first))
    assert sum(r.inflight for r in t.replicas.values()) == len(events)
    for d, ok, got_first in open_:
        if got_first:
            t.first_token(d, 0.5)
        if ok or got_first:
            t.finished(d, 1.0)
            t.finished(d, 1.0)  # idempotent
        else:
            t.failed(d, 1.0)
            t.failed(d, 1.0)
    assert all(r.inflight == 0 for r in t.replicas.values())
    assert all(r.backlog(1e6) == 0 for r in t.replicas.values())
    assert all(r.pending_prefill == 0 for r in t.replicas.values())  # admission's count too


# -- admission: hold a request while its replica has much prefill outstanding -------------------


def test_admission_holds_a_request_behind_a_full_prefill_budget_and_wakes_on_the_first_byte():
    t = router(1)  # one replica: every request goes there
    budget = PARAMS.admit_tokens
    assert budget == 0.75 * PARAMS.step_tokens
    woken = []
    t.room_listener = lambda: woken.append(1)
    big = chat("x" * int(4 * budget * 0.7), "q")  # ~70% of the budget, uncached
    d1 = t.decide(big, 0.0)
    assert t.admits(d1)  # nothing pending: always admitted, whatever its size
    t.dispatched(d1, 0.0)
    assert t.replicas[0].pending_prefill == pytest.approx(d1.uncached_tokens)
    d2 = t.decide(chat("y" * int(4 * budget * 0.7), "q"), 0.0)
    assert not t.admits(d2)  # 70% + 70% of the budget would be outstanding
    small = t.decide(chat("z" * 400, "q"), 0.0)
    assert t.admits(small)  # a small one still fits beside the first
    t.first_token(d1, 0.3)
    assert t.replicas[0].pending_prefill == 0 and woken == [1]
    assert t.admits(t.decide(chat("y" * int(4 * budget * 0.7), "q"), 0.3))
    t.finished(d1, 0.5)
    assert woken == [1]  # its pending prefill was already released


def test_a_long_prompt_goes_once_half_the_budget_is_free():
    t = router(1)
    budget = PARAMS.admit_tokens
    d1 = t.decide(chat("a" * int(4 * budget * 0.4), "q"), 0.0)
    t.dispatched(d1, 0.0)  # 40% of the budget outstanding
    long = t.decide(chat("b" * int(4 * budget * 2), "q"), 0.0)
    assert long.uncached_tokens > budget and t.admits(long)  # counts as half: 0.4 + 0.5 <= 1
    t.dispatched(long, 0.0)
    assert not t.admits(t.decide(chat("c" * int(4 * budget * 2), "q"), 0.0))


def test_a_held_request_counts_as_queued_on_its_replica_until_unheld():
    """Held requests must show as queue: otherwise each keeps choosing the replica whose queue
    the model cannot see, and a hot prefix is never replicated."""
    t = router(2)
    d = t.decide(chat(SYS[1], "q"), 0.0)
    r = d.replica
    before = r.backlog(0.0)
    t.hold(d, 0.0)
    t.hold(d, 0.0)  # idempotent
    assert r.backlog(0.0) == pytest.approx(before + d.uncached_tokens)
    assert r.inflight == 0 and r.pending_prefill == 0  # nothing was sent
    t.unhold(d, 0.0)
    t.unhold(d, 0.0)
    assert r.backlog(0.0) == pytest.approx(before) and not d.held


def test_admission_counts_only_requests_whose_first_byte_will_be_seen():
    t = router(1)
    d = t.decide(chat("x" * 30_000, "q"), 0.0)
    t.dispatched(d, 0.0, track_prefill=False)  # not streamed: the balancer never sees its first byte
    assert t.replicas[0].pending_prefill == 0
    assert t.admits(t.decide(chat("y" * 30_000, "q"), 0.0))


@pytest.mark.parametrize("policy", ["round_robin", "least_loaded", "consistent_hash", "sglang_like"])
def test_baselines_never_hold(policy):
    t = router(1, policy=policy)
    for k in range(3):
        d = t.decide(chat(f"{k}" * 40_000, "q"), 0.0)
        assert t.admits(d)
        t.dispatched(d, 0.0)
    assert t.replicas[0].pending_prefill == 0


def test_admission_off():
    t = TierRouter("t", params=CostParams(admit_share=0.0), seed=7, clock=lambda: 0.0)
    t.add_replica(0, "http://r0")
    for k in range(3):
        d = t.decide(chat(f"{k}" * 40_000, "q"), 0.0)
        assert t.admits(d)
        t.dispatched(d, 0.0)
    assert t.replicas[0].pending_prefill == 0


@given(st.lists(st.tuples(st.integers(0, 7), st.sampled_from(["first", "finish", "fail", "both"]), st.booleans()),
                min_size=1, max_size=40))
def test_pending_prefill_is_the_sum_over_open_streamed_requests(events):
    """Invariant: a replica's pending prefill is exactly the uncached tokens of its dispatched,
    streamed requests whose first byte has not come back and that have not ended."""
    t = router(3)
    open_ = []
    for k, how, stream in events:
        d = t.decide(chat(SYS[k], f"q{len(open_)}"), 0.0)
        t.dispatched(d, 0.0, track_prefill=stream)
        open_.append((d, how, stream))
    for i, (d, how, _) in enumerate(open_):
        if how in ("first", "both"):
            t.first_token(d, 0.1)
        if how in ("finish", "both"):
            t.finished(d, 0.2)
        elif how == "fail":
            t.failed(d, 0.2)
        for r in t.replicas.values():
            want = sum(max(1.0, x.uncached_tokens) for x, h, st_ in open_[i + 1:] + [(d, how, _)]
                       if st_ and x.replica is r and not (x.first_token_at is not None or x.closed))
            assert r.pending_prefill == pytest.approx(want)
            assert r.pending_prefill >= 0


def test_failed_dispatch_takes_back_the_blocks_it_inserted():
    t = router(2)
    key = chat(SYS[3], "q")
    d = t.decide(key, 0.0)
    t.dispatched(d, 0.0)
    assert t.decide(key, 0.0).matched_blocks == len(d.chain)
    t.failed(d, 0.0)
    assert t.index.match(d.chain) == {}


def test_no_available_replica_raises():
    t = router(2)
    for r in t.replicas.values():
        r.eligible = False
    with pytest.raises(NoReplicaAvailable):
        t.decide(chat("a", "b"), 0.0)
    t.replicas[1].eligible = True
    t.replicas[1].draining = True
    with pytest.raises(NoReplicaAvailable):
        t.decide(chat("a", "b"), 0.0)


def test_retry_excludes_the_replicas_already_tried():
    t = router(3)
    key = chat(SYS[4], "q")
    tried = []
    for _ in range(3):
        d = t.decide(key, 0.0, exclude=tried)
        assert d.replica.id not in tried
        tried.append(d.replica.id)
    with pytest.raises(NoReplicaAvailable):
        t.decide(key, 0.0, exclude=tried)


def test_prefill_rate_is_learned_from_observed_ttfts():
    """A replica 4x slower than the prior, with 20 ms fixed cost, running batches of varying
    context: the model learns its rate and predicts its TTFT where it has seen traffic."""
    t = router(1)
    r = t.replicas[0]
    assert r.prefill_rate == pytest.approx(10_000)
    kappa = PARAMS.context_weight

    def truth(work, running, ctx):
        return 0.02 + (work + running + kappa * ctx) / 2500

    for i in range(120):
        work, running, ctx = 1000 + 500 * (i % 7), i % 4, 20_000 * (i % 5)
        r.observe_ttft(work + running + kappa * ctx, truth(work, running, ctx))
    assert 2200 < r.prefill_rate < 2900 and 0.005 < r.fixed_s < 0.04  # intercept: an extrapolation
    for work, running, ctx in [(1000, 0, 0), (2500, 2, 40_000), (4000, 3, 80_000)]:
        r._backlog, r.inflight, r.context = 0.0, running, ctx
        assert r.predict_ttft(work, 0.0) == pytest.approx(truth(work, running, ctx), rel=0.1)


def test_only_requests_with_little_queued_ahead_teach_the_ttft_model():
    """A TTFT measured behind a queue measures the model's queue estimate as much as the replica:
    learning from it fed the estimate's errors back into the rate (errors in the variable) and
    made routing unstable under load. Such a request is not learned from; one dispatched to an
    idle replica is, and a burst leaves the learned rate where the idle requests put it."""
    t = router(1)
    r = t.replicas[0]
    key = lambda i: chat(f"unique {i} " * 300, "q")  # noqa: E731 - ~1,000 uncached tokens each
    burst = [t.decide(key(i), 0.0) for i in range(6)]
    for d in burst:
        t.dispatched(d, 0.0)
    assert [d.queued_at_dispatch > 0 for d in burst] == [False] + [True] * 5
    for k, d in enumerate(burst):  # a replica at 20,000 tokens/s, the burst served in order
        t.first_token(d, 0.01 + (k + 1) * d.prompt_tokens / 20_000)
        t.finished(d, 1.0)
    assert r.observations == 1  # the first of the burst only
    for i in range(60):  # idle dispatches, one at a time
        d = t.decide(key(100 + i), 10.0 + i)
        t.dispatched(d, 10.0 + i)
        assert d.queued_at_dispatch == 0
        t.first_token(d, 10.0 + i + 0.01 + d.uncached_tokens / 20_000)
        t.finished(d, 10.5 + i)
    assert r.observations == 61
    assert 16_000 < r.prefill_rate < 24_000


def test_what_one_replica_learns_its_untried_peers_share():
    """An untried replica predicts like its peers, not like a stale prior (so it gets tried)."""
    t = router(3)
    for i in range(40):
        work = 2000 + 300 * (i % 5)
        t.replicas[0].observe_ttft(work, 0.005 + work / 80_000)  # 8x faster than the prior
    fresh, seen = t.replicas[2], t.replicas[0]
    assert fresh.observations == 0 and fresh.prefill_rate == pytest.approx(seen.prefill_rate, rel=0.2)
    assert fresh.predict_ttft(4000, 0.0) == pytest.approx(seen.predict_ttft(4000, 0.0), rel=0.2)


def test_a_replica_slower_than_its_peers_learns_a_higher_ratio():
    t = router(2)
    for i in range(60):
        work = 1000 + 400 * (i % 6)
        base = 0.01 + work / 10_000
        t.replicas[0].observe_ttft(work, base)
        t.replicas[1].observe_ttft(work, 2 * base)
    assert t.replicas[1].ratio > 1.4 * t.replicas[0].ratio


def test_scraped_load_from_other_balancers_counts_while_fresh():
    t = router(2)
    t.replicas[0].observe_scrape(waiting=30, running=40, kv_usage=0.9, now=0.0)
    assert send(t, chat("fresh scrape " * 300, "q"), 0.1).replica.id == 1
    assert t.replicas[0].backlog(100.0) == 0  # a stale scrape fades out


def test_cached_tokens_feedback_shrinks_a_replica_that_evicts_sooner():
    t = router(1)
    r = t.replicas[0]
    for i in range(5):
        d = send(t, chat(SYS[5], f"q{i}"), float(i), finish=False)
        t.first_token(d, i + 0.1)
        t.finished(d, i + 0.2, usage={"prompt_tokens": 1300, "prompt_tokens_details": {"cached_tokens": 0}})
    assert r.capacity_scale < 1.0


def test_round_robin_cycles():
    t = router(3, policy="round_robin")
    assert [send(t, chat(SYS[0], str(i)), 0.0).replica.id for i in range(6)] == [0, 1, 2, 0, 1, 2]


def test_least_loaded_takes_the_lighter_of_two():
    t = router(2, policy="least_loaded")
    for _ in range(5):
        d = t.decide(chat("heavy " * 500, "x"), 0.0, exclude=[1])
        t.dispatched(d, 0.0)
    assert all(t.decide(chat(SYS[0], str(i)), 0.0).replica.id == 1 for i in range(10))


def test_consistent_hash_is_sticky_with_bounded_load():
    t = router(4, policy="consistent_hash")
    owner = send(t, chat(SYS[6], "x"), 0.0).replica.id
    assert all(send(t, chat(SYS[6], f"q{i}"), 0.0).replica.id == owner for i in range(10))
    spread = [send(t, chat(SYS[6], f"burst {i}"), 0.0, finish=False).replica.id for i in range(20)]
    assert spread.count(owner) < 20 and max(spread.count(i) for i in range(4)) <= 0.45 * 20


def test_unknown_policy_names_the_valid_ones():
    with pytest.raises(ValueError, match="cache_aware, round_robin, least_loaded, consistent_hash"):
        router(policy="nope")


def test_a_peers_impossible_numbers_leave_no_negative_backlog():
    """A peer's message claiming more cached than prompt tokens is held to what a local decision
    can produce, and a replica's backlog never reads below zero, dispatched at this instant or later."""
    t = TierRouter("t", clock=lambda: 0.0)
    t.add_replica(0)
    d = t.remote_dispatched(0, [], 10.0, 60.0, 0.0, now=1.0)
    assert d is not None and d.cached_tokens == 9.0 and d.uncached_tokens == 1.0
    r = t.replicas[0]
    r._backlog = -50.0  # however it got there
    for now in (r._backlog_t, r._backlog_t + 1.0):
        assert r.backlog(now) == 0.0
        assert r.feature(100.0, now)[1] == 0.0
