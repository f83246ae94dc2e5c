"""The router metrics against hand-computed cases (pure Python: runs without numpy or torch)."""

from __future__ import annotations

import math
import random

import pytest

from prefixlb.routing.classifier import metrics as M


def _report(scores, weak, strong, prices=(1.0, 5.0)):
    return M.report(M.two_tier_probs(scores), [[w, s] for w, s in zip(weak, strong)], ["weak", "strong"], prices)


def test_auc_of_a_perfect_ranking_is_one_and_of_its_reverse_zero():
    labels = [False, False, True, True]
    assert M.roc_auc([0.1, 0.2, 0.8, 0.9], labels) == 1.0
    assert M.roc_auc([0.9, 0.8, 0.2, 0.1], labels) == 0.0


def test_auc_counts_ties_as_one_half():
    assert M.roc_auc([0.5, 0.5, 0.5, 0.5], [False, True, False, True]) == 0.5
    # positives 0.5 and 0.9, negatives 0.5 and 0.1: pairs (0.5,0.5)=1/2, (0.5,0.1)=1, (0.9,*)=1+1 -> 3.5/4
    assert M.roc_auc([0.5, 0.9, 0.5, 0.1], [True, True, False, False]) == pytest.approx(3.5 / 4)


def test_auc_is_nan_with_one_class():
    assert math.isnan(M.roc_auc([0.1, 0.2], [True, True]))


def test_oracle_apgr_and_cpt_match_the_hand_computed_curve():
    # gains (strong - weak) = [+1, 0, 0, 0]: quality 0.5 -> 0.75 after the first strong call, then flat.
    weak, strong = [0, 1, 0, 1], [1, 1, 0, 1]
    r = _report([0.9, 0.1, 0.2, 0.3], weak, strong)
    assert r.apgr == pytest.approx(0.25 * 0.5 + 0.75 * 1.0)  # 0.875
    assert r.cpt50 == pytest.approx(0.125)
    assert r.cpt80 == pytest.approx(0.2)
    assert r.quality_by_tier == {"weak": 0.5, "strong": 0.75}


def test_pgr_is_not_capped_when_the_router_beats_the_strong_model():
    # gains [-1, +1, +1]: routing the two wins first peaks at PGR 2 before the loss is routed.
    r = _report([0.1, 0.8, 0.9], [1, 0, 0], [0, 1, 1])
    assert [round(p.pgr, 9) for p in r.curve] == [0, 1, 2, 1]
    assert r.apgr == pytest.approx(7 / 6)


def test_a_constant_score_has_apgr_exactly_one_half():
    rng = random.Random(3)
    weak = [rng.random() < 0.6 for _ in range(500)]
    strong = [rng.random() < 0.8 for _ in range(500)]
    r = _report([0.5] * 500, weak, strong)
    assert r.apgr == pytest.approx(0.5)
    assert r.cpt50 == pytest.approx(0.5)
    assert r.cpt80 == pytest.approx(0.8)


def test_a_random_router_has_apgr_near_one_half():
    rng = random.Random(7)
    n = 20000
    weak = [rng.random() < 0.65 for _ in range(n)]
    strong = [rng.random() < 0.8 for _ in range(n)]
    r = _report([rng.random() for _ in range(n)], weak, strong)
    assert abs(r.apgr - 0.5) < 0.03
    assert abs(r.auc - 0.5) < 0.03


def test_cost_saved_at_95_percent_of_strong_quality():
    # 10 prompts; weak right on 5, strong right on 10; the 5 weak misses ranked first.
    weak = [0] * 5 + [1] * 5
    strong = [1] * 10
    scores = [1.0 - i / 10 for i in range(10)]
    r = _report(scores, weak, strong, prices=(1.0, 5.0))
    # 95% of 1.0 needs 0.95 quality: 4.5 of the 5 misses routed -> call fraction 0.45
    assert r.call_fraction_at_95 == pytest.approx(0.45)
    # cost = 0.55 * 1 + 0.45 * 5 = 2.8 -> saved 1 - 2.8 / 5
    assert r.cost_saved_at_95 == pytest.approx(1 - 2.8 / 5)


def test_call_fraction_is_cost_weighted_with_three_tiers():
    # one prompt, tiers priced 1, 2, 4: climbing to the middle tier spends 1/3 of the range
    curve = M.quality_curve([[0.9, 0.3]], [[0, 1, 1]], [1.0, 2.0, 4.0])
    assert [round(p.call_fraction, 9) for p in curve] == [0, round(1 / 3, 9), 1]
    assert [p.quality for p in curve] == [0, 1, 1]


def test_two_tier_curve_is_the_n_tier_curve_with_two_tiers():
    rng = random.Random(1)
    rows = [[float(rng.random() < 0.6), float(rng.random() < 0.8)] for _ in range(50)]
    s = [rng.random() for _ in range(50)]
    a = M.quality_curve(M.two_tier_probs(s), rows, [1.0, 9.0])
    b = M.quality_curve(M.two_tier_probs(s), rows, [2.0, 3.0])
    assert [(round(p.call_fraction, 9), p.quality) for p in a] == [(round(p.call_fraction, 9), p.quality) for p in b]


def test_ordinal_probabilities_are_made_non_increasing():
    # p[1] > p[0] is clipped to p[0]: the prompt climbs both steps at threshold 0.4
    curve = M.quality_curve([[0.4, 0.9]], [[0, 0, 1]], [1.0, 2.0, 3.0])
    assert len(curve) == 2 and curve[-1].quality == 1


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        M.quality_curve([], [], [1.0, 2.0])
    with pytest.raises(ValueError, match="cheapest first"):
        M.quality_curve([[0.5]], [[0, 1]], [2.0, 1.0])
    with pytest.raises(ValueError):
        M.quality_curve([[0.5, 0.5]], [[0, 1]], [1.0, 2.0])
