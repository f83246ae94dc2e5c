"""The native scoring loop equals its Python twin, and both equal ReplicaState.predict_ttft."""

from __future__ import annotations

import math
from array import array

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prefixlb.routing import CostParams, ReplicaState
from prefixlb.routing.scoring import (
    F_AVG_PROMPT,
    F_AVG_UNC,
    F_BACKLOG,
    F_BACKLOG_T,
    F_CONTEXT,
    F_COUNT,
    F_INFLIGHT,
    F_KV,
    F_KV_ALLOC,
    F_KV_CAP,
    F_RATIO,
    F_RESERVED,
    F_RUNNING,
    F_SCRAPED_AT,
    F_WAITING,
    NATIVE_SCORE,
    score_py,
)
from prefixlb.routing.state import TierModel

native = pytest.importorskip("prefixlb.index._native")

finite = st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False)
row = st.tuples(
    finite,  # backlog
    st.floats(0, 100),  # backlog_t
    st.one_of(st.just(-1.0), st.floats(0.25, 4.0)),  # ratio (-1: unobserved)
    finite,  # context
    st.one_of(st.just(-math.inf), st.floats(0, 110)),  # scraped_at
    st.floats(0, 200), st.floats(0, 200), st.floats(0, 1),  # waiting, running, kv
    st.floats(1, 1e5), st.floats(1, 1e5),  # avg uncached, avg prompt
    st.integers(0, 500),  # inflight
    st.floats(0, 2e5),  # KV allocated by requests in flight
    st.one_of(st.just(0.0), st.floats(1e3, 2e5)),  # KV capacity (0: unknown)
)


@given(
    rows=st.lists(row, min_size=1, max_size=12),
    matched=st.dictionaries(st.integers(0, 11), st.integers(1, 5000), max_size=6),
    P=st.floats(1, 200_000),
    tpb=st.floats(1, 64),
    now=st.floats(0, 120),
    coefs=st.tuples(st.floats(0, 1), st.floats(1e-7, 1e-3), st.floats(0, 1e-2), st.floats(0.25, 4)),
    step=st.floats(16, 16384),
    pw=st.floats(0, 2),
    tie=st.floats(0, 0.1),
    u=st.floats(0, 0.999999),
    out=st.floats(0, 4096),
    duration=st.floats(0, 30),
    congestion=st.floats(0, 19),
)
def test_native_score_equals_the_python_twin(rows, matched, P, tpb, now, coefs, step, pw, tie, u, out, duration,
                                             congestion):
    slab = array("d")
    for r in rows:
        slab.extend((0.0, *map(float, r)))
    ids = array("I", range(len(rows)))
    matches = {k: v for k, v in matched.items() if k < len(rows)}
    args = (P, tpb, now, *coefs, step, 2.0, pw, tie, u, out, duration, congestion)
    a = native.score(slab, ids, matches, *args)
    b = score_py(slab, ids, matches, *args)
    assert a[0] == b[0]
    for x, y in zip(a[1:], b[1:]):
        assert x == pytest.approx(y, rel=1e-9, abs=1e-12)


@pytest.mark.skipif(not NATIVE_SCORE, reason="C extension not built")
@given(backlog=finite, ctx=finite, inflight=st.integers(0, 100), uncached=st.floats(1, 1e5),
       scraped=st.booleans(), waiting=st.floats(0, 50), running=st.floats(0, 50))
def test_the_scorer_predicts_what_the_replica_model_predicts(backlog, ctx, inflight, uncached, scraped, waiting, running):
    tier = TierModel(CostParams())
    slab = array("d", [0.0] * F_COUNT)
    r = ReplicaState(0, params=tier.params, tier=tier, slab=slab)
    r._backlog, r._backlog_t, r.context, r.inflight = backlog, 1.0, ctx, inflight
    if scraped:
        r.observe_scrape(waiting, running, 0.0, 1.5)
    r._sync()
    _, _, ttft, _ = native.score(slab, array("I", [0]), {}, uncached, 16.0, 2.0, tier.fixed, tier.inv_rate,
                                 tier.params.context_weight, tier.mean_ratio, float(tier.params.step_tokens),
                                 tier.params.staleness_s, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    assert ttft == pytest.approx(r.predict_ttft(uncached, 2.0), rel=1e-9)


def test_bad_inputs_are_refused():
    slab = array("d", [0.0] * F_COUNT)
    with pytest.raises(ValueError):
        native.score(slab, array("I"), {}, *([1.0] * 15))
    with pytest.raises(IndexError):
        native.score(slab, array("I", [5]), {}, *([1.0] * 15))
    with pytest.raises(TypeError):
        native.score(array("f", [0.0] * F_COUNT), array("I", [0]), {}, *([1.0] * 15))
    with pytest.raises(TypeError):
        native.score(slab, array("I", [0]), {}, 1.0)


@pytest.mark.parametrize("score", [score_py, native.score], ids=["python", "native"])
def test_within_the_tie_band_the_least_load_wins_not_the_replica_that_looks_faster(score):
    """A learned speed ratio a few percent low (noise) must not pull every cold request to its
    replica: within ``tie`` of the best cost, the least load with the ratio divided out wins."""
    P, fixed, inv = 1000.0, 0.01, 1e-4

    def row(ratio, inflight, context):
        # reserved, backlog, backlog_t, ratio, context, scraped_at, waiting, running, kv, avg unc,
        # avg prompt, inflight, KV allocated, KV capacity (unscraped, cache size unknown)
        return (0.0, 0.0, 0.0, ratio, context, -math.inf, 0.0, 0.0, 0.0, 512.0, 1024.0, inflight, 0.0, 0.0)

    slab = array("d", [*row(0.97, 3.0, 3000.0), *row(1.0, 0.0, 0.0)])  # busy, looks 3% faster | idle
    ids = array("I", [0, 1])

    def pick(tie):
        return score(slab, ids, {}, P, 16.0, 0.0, fixed, inv, 0.001, 1.0, 8192.0, 2.0, 0.0, tie, 0.0,
                     0.0, 0.0, 0.0)

    busy, idle = pick(0.0)[0], pick(0.05)[0]
    assert busy == 0  # by predicted TTFT alone the busy replica wins (its ratio says it is faster)
    assert idle == 1  # inside the band the idle one does: 2.5% apart is within the ratios' noise


def test_a_replicas_row_holds_its_state_field_by_field():
    """``ReplicaState._sync`` writes its row in one call (struct.pack_into): every field lands at
    its F_* offset, in its own row only, and the reserved slot stays untouched."""
    slab = array("d", [-7.0] * (3 * F_COUNT))
    r = ReplicaState(1, params=CostParams(), slab=slab)
    r._backlog, r._backlog_t, r.context, r.scraped_at = 101.0, 2.5, 303.0, 4.25
    r.ratio, r.observations = 1.25, 3
    r.scraped_waiting, r.scraped_running, r.scraped_kv_usage, r.index_fullness = 2.0, 3.0, 0.4, 0.6
    r.avg_uncached, r.avg_prompt, r.inflight, r.kv_alloc, r.capacity_tokens = 11.0, 22.0, 7, 123.0, 4567
    r._sync()
    want = {F_BACKLOG: 101.0, F_BACKLOG_T: 2.5, F_RATIO: 1.25, F_CONTEXT: 303.0, F_SCRAPED_AT: 4.25, F_WAITING: 2.0,
            F_RUNNING: 3.0, F_KV: 0.6, F_AVG_UNC: 11.0, F_AVG_PROMPT: 22.0, F_INFLIGHT: 7.0, F_KV_ALLOC: 123.0,
            F_KV_CAP: 4567.0, F_RESERVED: -7.0}
    assert sorted(want) == list(range(F_COUNT))
    assert {f: slab[F_COUNT + f] for f in want} == want
    assert list(slab[:F_COUNT]) == [-7.0] * F_COUNT and list(slab[2 * F_COUNT:]) == [-7.0] * F_COUNT
    r.observations, r.capacity_tokens, r.scraped_kv_usage = 0, None, 0.9
    r._sync()
    assert (slab[F_COUNT + F_RATIO], slab[F_COUNT + F_KV_CAP], slab[F_COUNT + F_KV]) == (-1.0, 0.0, 0.9)
