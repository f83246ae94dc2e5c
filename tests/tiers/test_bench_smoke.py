"""benchmarks/bench_tiers.py stays importable and its offline parts stay right: the seeded
workload, the replay of a cascade on recorded answers, the threshold search."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_tiers as bt
import pytest


def test_workload_is_seeded_varied_and_the_sets_are_disjoint():
    a, b = bt.workload(200, 0), bt.workload(200, 0)
    assert a == b and len({p for _, p in a}) == 200
    assert {f for f, _ in a} >= {"fact", "explain", "code", "math", "summary"}
    lengths = sorted(len(p) for _, p in a)
    assert lengths[0] < 60 and lengths[-1] > 1500
    train, evals = bt.workload(100, 0), bt.workload(150, 0)[100:]
    assert not {p for _, p in train} & {p for _, p in evals}


def _row(means, correct, tokens=(10, 20)):
    return {"prompt": "p", "tiers": {t: {"mean": m, "correct": c, "prompt_tokens": tokens[0],
                                         "completion_tokens": tokens[1]} for t, m, c in zip(bt.TIERS, means, correct)}}


def test_replay_pays_every_attempt_and_stops_at_the_first_confident_answer():
    rows = [_row((-0.1, -0.1, -0.1), (True, True, True)),  # confident on small
            _row((-2.0, -0.1, -0.1), (False, True, True)),  # small unsure, medium confident
            _row((-2.0, -2.0, -0.1), (False, False, False))]  # escalates to the top
    t = bt._table(rows)
    cost, q = bt.replay(t, [0, 0, 0], (-1.0, -1.0))
    per = {k: 30 * v / 1e6 for k, v in bt.PRICES.items()}
    assert cost == pytest.approx((per["small"] + (per["small"] + per["medium"]) + sum(per.values())) / 3)
    assert q == 2 / 3
    assert bt.replay(t, [2, 2, 2], None) == pytest.approx((per["large"], 2 / 3))
    th = bt.choose_thresholds(rows, None, 1.0)
    assert th["cascade"]["quality"] >= th["all_large"]["quality"]


def test_correct_is_read_from_the_emulator_header():
    assert bt.correct_from("correct=1; difficulty=0.4; skill=0.6") is True
    assert bt.correct_from("correct=0; difficulty=0.4") is False
    assert bt.correct_from(None) is None
