"""The request-path classifier: numpy only (no torch), a model directory written by hand."""

from __future__ import annotations

import json
import math

import pytest

np = pytest.importorskip("numpy", reason="inference needs numpy (the classifier extra)")

from prefixlb.routing.classifier import ModelError, TierClassifier  # noqa: E402
from prefixlb.routing.classifier.features import FEATURE_NAMES  # noqa: E402
from prefixlb.routing.classifier.model import save_model  # noqa: E402

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "what", "is", "the", "integral", "of", "x", "?", "2", "+", "=", "capital"]


def _model(tmp_path, tiers=("small", "large"), seed=0, zero=False, calibration=None):
    rng = np.random.default_rng(seed)
    K, G, H, F = len(tiers), 3, 8, len(FEATURE_NAMES)
    D = K - 1 + F
    arrays = {
        "group_table": rng.normal(size=(len(VOCAB), G)),
        "group_bias": rng.normal(size=G),
        "rates": rng.uniform(size=(G, K - 1)),
        "feat_mean": rng.normal(size=D),
        "feat_std": rng.uniform(0.5, 2.0, size=D),
        "w1": rng.normal(size=(H, D)) * 0.3,
        "b1": rng.normal(size=H),
        "w2": rng.normal(size=(K - 1, H)),
        "b2": rng.normal(size=K - 1),
    }
    if zero:
        arrays["w1"] = np.zeros((H, D))
        arrays["b2"] = np.linspace(0.5, -0.5, K - 1)
    cfg = {
        "tiers": list(tiers),
        "prices": [float(5**i) for i in range(K)],
        "text_cap": 2000,
        "feature_names": list(FEATURE_NAMES),
        "calibration": calibration or {"default_threshold": 0.5, "budgets": {"0.20": 0.9, "0.50": 0.6, "0.80": 0.3}},
    }
    d = tmp_path / f"m{seed}{len(tiers)}"
    save_model(d, cfg, arrays, VOCAB)
    return d


PROMPTS = ["What is the integral of x?", "2 + 2 =", "capital", "", "Ünïcode ✓ text\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"]


def test_scores_are_probabilities_and_identical_across_loads(tmp_path):
    d = _model(tmp_path)
    a, b = TierClassifier.load(d), TierClassifier.load(d)
    for p in PROMPTS:
        s = a.score(p)
        assert 0.0 <= s <= 1.0
        assert s == b.score(p) == a.score(p)


def test_the_output_is_the_head_bias_when_the_hidden_layer_is_silent(tmp_path):
    clf = TierClassifier.load(_model(tmp_path, zero=True))
    w2 = np.load(tmp_path / "m02" / "weights.npz")["w2"]
    b1 = np.load(tmp_path / "m02" / "weights.npz")["b1"]
    expected = 1 / (1 + math.exp(-(w2 @ np.maximum(b1, 0) + 0.5)[0]))
    assert clf.score("anything at all") == pytest.approx(expected, rel=1e-6)


def test_three_tiers_probabilities_never_increase_and_choose_climbs(tmp_path):
    clf = TierClassifier.load(_model(tmp_path, tiers=("small", "medium", "large"), seed=3))
    for p in PROMPTS:
        probs = clf.probs(p)
        assert probs.shape == (2,) and probs[1] <= probs[0]
    low = TierClassifier.load(tmp_path / "m33", threshold=0.0)
    high = TierClassifier.load(tmp_path / "m33", threshold=2.0)
    assert low.choose(PROMPTS[0])[0] == "large"
    assert high.choose(PROMPTS[0])[0] == "small"
    tier, score = clf.choose(PROMPTS[0], ["s", "m", "l"])
    assert tier in ("s", "m", "l") and score == clf.score(PROMPTS[0])
    with pytest.raises(ValueError, match="3 tiers"):
        clf.choose(PROMPTS[0], ["a", "b"])


def test_choose_follows_the_threshold(tmp_path):
    d = _model(tmp_path, seed=5)
    clf = TierClassifier.load(d)
    for p in PROMPTS:
        tier, s = clf.choose(p)
        assert tier == ("large" if s >= clf.threshold else "small")


def test_budget_picks_the_nearest_calibrated_threshold(tmp_path):
    d = _model(tmp_path)
    assert TierClassifier.load(d).threshold == 0.5
    assert TierClassifier.load(d, budget=0.25).threshold == 0.9
    assert TierClassifier.load(d, budget=0.7).threshold == 0.3
    assert TierClassifier.load(d, budget=0.7, threshold=0.42).threshold == 0.42


def test_broken_model_directories_are_refused_with_the_file_named(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        TierClassifier.load(tmp_path / "missing")
    d = _model(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "format": "something-else"}))
    with pytest.raises(ModelError, match="format"):
        TierClassifier.load(d)
    (d / "config.json").write_text(json.dumps(cfg))
    w = dict(np.load(d / "weights.npz"))
    w["rates"] = w["rates"][:2]
    np.savez(d / "weights.npz", **w)
    with pytest.raises(ModelError, match="rates"):
        TierClassifier.load(d)


def test_weights_are_never_unpickled(tmp_path):
    d = _model(tmp_path)
    w = dict(np.load(d / "weights.npz"))
    w["rates"] = np.array([{"evil": 1}], dtype=object)
    np.savez(d / "weights.npz", **w)
    with pytest.raises(ModelError):
        TierClassifier.load(d)


def test_importing_the_package_pulls_neither_torch_nor_matplotlib():
    import subprocess
    import sys

    code = ("import sys, prefixlb.routing.classifier as c; c.TierClassifier; "
            "print('torch' in sys.modules, 'matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_native_forward_pass_equals_the_numpy_reference(tmp_path):
    """native/tiernet.c against TierClassifier._probs_reference: same probabilities to float
    rounding (the table is float32), hence the same tier, on prompts of every shape."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    c = TierClassifier.load(_model(tmp_path, tiers=("s", "m", "l", "xl"), seed=3))
    if not c.native:
        pytest.skip("the _tiernet extension is not built")

    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=400) | st.sampled_from(PROMPTS))
    def check(prompt):
        ids, feats = c._feat(prompt)
        got = np.asarray(c._net.probs(ids, feats))
        want = c._probs_reference(ids, feats)
        assert got.shape == want.shape
        assert np.allclose(got, want, rtol=1e-5, atol=1e-6)
        assert all(got[i] >= got[i + 1] for i in range(len(got) - 1))

    check()


def test_native_forward_pass_refuses_bad_input(tmp_path):
    c = TierClassifier.load(_model(tmp_path))
    if not c.native:
        pytest.skip("the _tiernet extension is not built")
    ids, feats = c._feat("what is the integral of x?")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        c._net.probs([len(VOCAB)], feats)
    with pytest.raises(ValueError, match="features"):
        c._net.probs(ids, feats[:-1])
    with pytest.raises(TypeError):
        c._net.probs(ids, ["x"] * len(feats))
    from prefixlb.routing.classifier._tiernet import TierNet

    with pytest.raises(ValueError, match="shapes"):
        TierNet(np.zeros((3, 2), np.float32), np.zeros(3), np.zeros((2, 1)), np.zeros(4), np.ones(4),
                np.zeros((5, 4)), np.zeros(5), np.zeros((1, 5)), np.zeros(1))
    with pytest.raises(ValueError, match="feat_std"):
        TierNet(np.zeros((3, 2), np.float32), np.zeros(2), np.zeros((2, 1)), np.zeros(4), np.zeros(4),
                np.zeros((5, 4)), np.zeros(5), np.zeros((1, 5)), np.zeros(1))


def test_the_numpy_forward_pass_runs_when_native_is_forced_off(tmp_path):
    import subprocess
    import sys

    d = _model(tmp_path)
    code = ("from prefixlb.routing.classifier import TierClassifier as T; c = T.load(%r); "
            "print(c.native, round(c.score('2 + 2 ='), 9))" % str(d))
    env = {**__import__("os").environ, "PREFIXLB_NATIVE": "0"}
    off = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert off.stdout.split()[0] == "False"
    c = TierClassifier.load(d)
    assert abs(float(off.stdout.split()[1]) - c.score("2 + 2 =")) < 1e-6


WP_VOCAB = ["[PAD]", "[UNK]", "what", "is", "the", "int", "##egral", "##e", "##g", "of", "x", "?", "2", "##2", "+",
            "=", "capital", "a", "##b", "##c", "b", "c", "1", "##1", "not", "answer", ":", ".", "d", "all", "none",
            "above", "statement", "%", "$", "false", "a", "##s"]  # "a" twice: the last index wins


def _ascii_prompts():
    from hypothesis import strategies as st

    ascii_text = st.text(alphabet=st.characters(max_codepoint=127), max_size=300)
    piece = st.sampled_from(["what is the integral of x?", "2 + 2 = 4", "Statement 1 | x", " not ", "except",
                             "least", "All of the above", "none of the following", "12.5%", "$30", "aab", "2222",
                             "ints", "\x1c", "\t", " \n", "?", "! ", ". ", "intxegral", "a" * 101, "#", "##b", "_not_"])
    body = st.lists(piece | ascii_text, max_size=6).map("".join)
    option = st.lists(piece | st.text(alphabet="0123456789 .x", max_size=8), max_size=3).map("".join)
    mc = st.builds(lambda q, a, b, c, d, tail: f"{q}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:{tail}",
                   body, option, option, option, option, st.sampled_from(["", " ", "\n", " x"]))
    return body | mc | ascii_text


def test_native_featuriser_equals_the_python_one_on_ascii_prompts(tmp_path):
    """native/tiernet.c's ASCII fast path against tokenize.py + features.py: the same token ids
    and bit-identical features, so the model sees exactly what it was trained on."""
    from hypothesis import given, settings

    rng = np.random.default_rng(5)
    K, G, H, F = 3, 4, 8, len(FEATURE_NAMES)
    D = K - 1 + F
    arrays = {"group_table": rng.normal(size=(len(WP_VOCAB), G)), "group_bias": rng.normal(size=G),
              "rates": rng.uniform(size=(G, K - 1)), "feat_mean": rng.normal(size=D),
              "feat_std": rng.uniform(0.5, 2.0, size=D), "w1": rng.normal(size=(H, D)) * 0.3,
              "b1": rng.normal(size=H), "w2": rng.normal(size=(K - 1, H)), "b2": rng.normal(size=K - 1)}
    cfg = {"tiers": ["s", "m", "l"], "prices": [1.0, 2.0, 4.0], "text_cap": 120, "feature_names": list(FEATURE_NAMES),
           "calibration": {"default_threshold": 0.5}}
    save_model(tmp_path / "wp", cfg, arrays, WP_VOCAB)
    c = TierClassifier.load(tmp_path / "wp")
    if not c.native:
        pytest.skip("the _tiernet extension is not built")
    assert c._net.featurize("Ünïcode", 120) is None and c._net.probs_text("Ünïcode", 120) is None

    @settings(max_examples=600, deadline=None)
    @given(_ascii_prompts())
    def check(prompt):
        ids, feats = c._feat(prompt)
        got = c._net.featurize(prompt, 120)
        assert got is not None
        assert got[0] == list(ids)
        assert got[1] == feats  # bit-identical floats
        assert c._net.probs_text(prompt, 120) == c._net.probs(ids, feats)

    check()
