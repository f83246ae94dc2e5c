"""Quality model: deterministic difficulty, P(correct) = sigmoid(k(s-d)), informative logprobs."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prefixlb.engine import Engine, EngineRequest, assess, prompt_difficulty, token_difficulty, token_logprob
from prefixlb.engine.quality import SLOPE

from .helpers import run_one


@given(st.text(max_size=300))
def test_difficulty_is_deterministic_and_in_unit_interval(text):
    d = prompt_difficulty(text)
    assert 0.0 <= d <= 1.0 and d == prompt_difficulty(text)


def test_longer_number_heavy_prompts_are_harder_on_average():
    rng = random.Random(1)
    words = "the a cat sat on mat why how explain".split()
    short = [" ".join(rng.choice(words) for _ in range(5)) + str(i) for i in range(300)]
    hard = [" ".join(str(rng.randrange(10**6)) for _ in range(400)) + str(i) for i in range(300)]
    mean = lambda xs: sum(map(prompt_difficulty, xs)) / len(xs)  # noqa: E731
    assert mean(hard) > mean(short) + 0.1
    assert 0.0 <= token_difficulty([1, 2, 3]) <= 1.0


def test_p_correct_is_the_logistic_of_skill_minus_difficulty():
    rng = random.Random(0)
    outcomes = [assess(0.5, 0.6, rng) for _ in range(4000)]
    expected = 1 / (1 + math.exp(-SLOPE * 0.1))
    assert outcomes[0].p_correct == pytest.approx(expected)
    assert sum(o.correct for o in outcomes) / len(outcomes) == pytest.approx(expected, abs=0.03)


def test_mean_accuracy_tracks_skill_under_uniform_difficulty():
    rng = random.Random(2)
    for skill in (0.3, 0.7):
        acc = sum(assess(rng.random(), skill, rng).correct for _ in range(4000)) / 4000
        assert acc == pytest.approx(skill, abs=0.04)


def test_logprobs_partly_reveal_wrong_answers():
    rng = random.Random(3)
    pool = list(range(100, 200))
    scored = []
    for _ in range(1500):
        o = assess(rng.random(), 0.6, rng)
        lps = [token_logprob(5, o.confidence, 2, rng, pool) for _ in range(8)]
        mean_lp = sum(t.logprob for t in lps) / len(lps)
        scored.append((mean_lp, o.correct))
    right = [s for s, ok in scored if ok]
    wrong = [s for s, ok in scored if not ok]
    # AUC of "mean logprob" as a detector of correct answers: informative, not perfect
    auc = sum((r > w) + 0.5 * (r == w) for r in right for w in wrong) / (len(right) * len(wrong))
    assert 0.7 < auc < 0.97


def test_top_logprobs_are_sorted_and_sum_below_one():
    t = token_logprob(5, 0.4, 5, random.Random(4), list(range(100, 200)))
    assert len(t.top) == 5 and [lp for _, lp in t.top] == sorted((lp for _, lp in t.top), reverse=True)
    assert sum(math.exp(lp) for _, lp in t.top) <= 1.0 + 1e-9 and t.logprob <= 0.0
    assert token_logprob(5, 0.4, 0, random.Random(4), [1]).top == ()


def test_engine_grades_deterministically_and_logprobs_do_not_change_the_text():
    def run(logprobs):
        eng = Engine("h100-llama3-8b", num_gpu_blocks=64, max_model_len=512)
        res = run_one(eng, EngineRequest("q", [3, 1, 4, 1, 5, 9, 2, 6], max_tokens=20, logprobs=logprobs, difficulty=0.5))
        outs = [o for r in res for o in r.outputs]
        return [t for o in outs for t in o.new_token_ids], outs[-1].quality, [o.logprobs for o in outs]

    toks_a, q_a, lps_a = run(3)
    toks_b, q_b, lps_b = run(None)
    assert toks_a == toks_b and q_a == q_b and q_a is not None and q_a.difficulty == 0.5
    assert all(lp is not None and len(lp[0].top) == 3 for lp in lps_a) and all(lp is None for lp in lps_b)
    assert run(3) == (toks_a, q_a, lps_a)


def test_bigger_model_answers_more_prompts_correctly():
    def accuracy(profile: str) -> float:
        eng = Engine(profile, num_gpu_blocks=64, max_model_len=512)
        ok = 0
        for i in range(300):
            prompt = eng.tokenizer.encode(f"question {i}: what is {i} times {i * 7}?")
            res = run_one(eng, EngineRequest(f"q{i}", prompt, max_tokens=1), t=float(i))
            ok += res[-1].outputs[-1].quality.correct
        return ok / 300

    assert accuracy("h100-llama3-70b-tp4") > accuracy("h100-llama3-8b") + 0.05
