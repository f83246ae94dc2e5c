"""train-router / eval-router end to end on a small sample of the shared routing outcomes,
drawn at test time (nothing is copied into the repository). Needs torch and MiniLM's weights."""

from __future__ import annotations

import contextlib
import io
import json
import random
from pathlib import Path

import pytest

pytest.importorskip("numpy", reason="the classifier needs numpy (the classifier extra)")
pytest.importorskip("torch", reason="training needs torch: pip install 'prefixlb[classifier]'")

from prefixlb.cli import main  # noqa: E402

OUTCOMES = Path("/work/shared/data/routing-outcomes/outcomes.jsonl")
ROWS = 400
FAST = ["--vocab", "corpus", "--epochs", "15", "--group-epochs", "10"]


def _minilm_or_skip():
    from prefixlb.routing.classifier.minilm import MiniLMNotInstalled, minilm_dir

    try:
        minilm_dir()
    except MiniLMNotInstalled as exc:
        pytest.skip(str(exc))


def _sample(seed: int = 11) -> list[dict]:
    if not OUTCOMES.exists():
        pytest.skip(f"{OUTCOMES} is absent (the shared routing-outcomes data set)")
    lines = OUTCOMES.read_text(encoding="utf-8").split("\n")
    rng = random.Random(seed)
    picked = rng.sample([ln for ln in lines if ln.strip()], ROWS)
    return [json.loads(ln) for ln in picked]


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def two_tier(tmp_path_factory):
    _minilm_or_skip()
    d = tmp_path_factory.mktemp("two")
    data = d / "two.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _sample()))
    model = d / "model"
    rc, out, err = _run(["train-router", "--data", str(data), "--out", str(model), "--seed", "3", *FAST])
    assert rc == 0, err
    return data, model, out


@pytest.fixture(scope="module")
def three_tier(tmp_path_factory):
    _minilm_or_skip()
    d = tmp_path_factory.mktemp("three")
    rng = random.Random(5)
    rows = []
    for r in _sample(seed=12):
        medium = r["strong_correct"] if rng.random() < 0.5 else r["weak_correct"]
        # key order scrambled on purpose: --tiers gives the order
        rows.append({"prompt": r["prompt"], "correct": {"large": r["strong_correct"], "small": r["weak_correct"],
                                                        "medium": medium}})
    data = d / "three.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = d / "model"
    rc, out, err = _run(["train-router", "--data", str(data), "--out", str(model), "--tiers", "small,medium,large",
                         "--prices", "small=1,medium=3,large=9", *FAST])
    assert rc == 0, err
    return data, model, out


KEYS = ("auc", "apgr", "cpt50", "cpt80", "cost_saved_at_95", "latency_ms_p50")


def test_train_router_writes_model_split_and_held_out_report(two_tier):
    _, model, out = two_tier
    for name in ("config.json", "weights.npz", "vocab.txt", "split.json", "report.json", "report.md", "curve.png"):
        assert (model / name).exists(), name
    split = json.loads((model / "split.json").read_text())
    held, val, train = set(split["heldout"]), set(split["validation"]), set(split["train"])
    assert held and val and train
    assert held.isdisjoint(train) and held.isdisjoint(val) and val.isdisjoint(train)
    assert 0.15 < len(held) / (len(held) + len(val) + len(train)) < 0.25
    report = json.loads((model / "report.json").read_text())
    for k in KEYS:
        assert isinstance(report["heldout"][k], float), k
    assert 0 <= report["heldout"]["cpt50"] <= 1 and 0 <= report["heldout"]["auc"] <= 1
    assert json.loads(out.strip().splitlines()[-1]).keys() == set(KEYS)
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["tiers"] == ["weak", "strong"] and cfg["group_source"] == "subject"
    assert "default_threshold" in cfg["calibration"]


def test_scores_round_trip_and_holdout_eval_reproduces_the_training_report(two_tier, tmp_path):
    from prefixlb.routing.classifier import TierClassifier

    data, model, _ = two_tier
    prompts = [json.loads(ln)["prompt"] for ln in data.read_text().splitlines()[:20]]
    a, b = TierClassifier.load(model), TierClassifier.load(model)
    assert [a.score(p) for p in prompts] == [b.score(p) for p in prompts]
    out = tmp_path / "held.json"
    rc, _, err = _run(["eval-router", "--model", str(model), "--data", str(data), "--holdout-only", "--json", str(out)])
    assert rc == 0, err
    got = json.loads(out.read_text())
    want = json.loads((model / "report.json").read_text())["heldout"]
    for k in ("auc", "apgr", "cpt50", "cpt80", "cost_saved_at_95", "n"):
        assert got[k] == want[k], k


def test_eval_router_scores_every_prompt_and_says_training_prompts_are_included(two_tier, tmp_path):
    data, model, _ = two_tier
    out, png = tmp_path / "all.json", tmp_path / "curve.png"
    rc, stdout, err = _run(["eval-router", "--model", str(model), "--data", str(data), "--json", str(out),
                            "--plot", str(png)])
    assert rc == 0, err
    assert "used to train" in err and "--holdout-only" in err
    got = json.loads(out.read_text())
    assert got["n"] == ROWS and set(KEYS) <= got.keys()
    assert got["overlap_with_training"]["train"] > 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "APGR" in stdout


def test_three_tier_format_trains_and_evaluates(three_tier, tmp_path):
    from prefixlb.routing.classifier import TierClassifier

    data, model, _ = three_tier
    clf = TierClassifier.load(model)
    assert clf.tiers == ["small", "medium", "large"] and clf.prices == [1.0, 3.0, 9.0]
    assert json.loads((model / "config.json").read_text())["group_source"] == "kmeans"
    p = clf.probs("Natalia sold clips to 48 of her friends in April. How many clips did she sell?")
    assert p.shape == (2,) and p[1] <= p[0]
    out = tmp_path / "e.json"
    rc, _, err = _run(["eval-router", "--model", str(model), "--data", str(data), "--tiers", "small,medium,large",
                       "--json", str(out)])
    assert rc == 0, err
    got = json.loads(out.read_text())
    assert got["tiers"] == ["small", "medium", "large"] and set(KEYS) <= got.keys()


def test_training_is_deterministic_in_the_seed(two_tier, tmp_path):
    import numpy as np

    from prefixlb.routing.classifier.train import TrainConfig, train

    data, model, _ = two_tier
    again = tmp_path / "again"
    train(data, again, TrainConfig(seed=3, vocab="corpus", epochs=15, group_epochs=10), log=lambda m: None)
    a, b = np.load(model / "weights.npz"), np.load(again / "weights.npz")
    for k in a.files:
        assert np.array_equal(a[k], b[k]), k
    assert (model / "split.json").read_text() == (again / "split.json").read_text()


def test_cli_errors_are_one_clear_line(tmp_path):
    rc, _, err = _run(["eval-router", "--model", str(tmp_path / "nope"), "--data", str(tmp_path / "x.jsonl")])
    assert rc == 2 and "no config.json" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n')
    rc, _, err = _run(["train-router", "--data", str(bad), "--out", str(tmp_path / "m")])
    assert rc == 2 and "bad.jsonl:1" in err
