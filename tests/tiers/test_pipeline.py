"""The tier pipeline as pure code: each rule condition, the classifier step, shadow and kill,
the default, per-user offsets (learning, decay, memory bound), drift."""

from __future__ import annotations

import random

import pytest

from prefixlb.routing.drift import ScoreDrift
from prefixlb.routing.tiers import (
    ClassifierMode,
    Rule,
    TierPipeline,
    UserOffsets,
    request_view,
)

TIERS = ("small", "medium", "large")


def view(content="hello", *, path="/v1/chat/completions", headers=None, user=None, tools=False, max_tokens=None,
         messages=None):
    body = {"messages": messages or [{"role": "system", "content": "be brief"}, {"role": "user", "content": content}]}
    if tools:
        body["tools"] = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return request_view(body, path, headers or {}, user, chat=True)


class Keyword:
    """A scorer standing in for a trained classifier: 'hard' prompts need the largest tier."""

    def __init__(self):
        self.calls = 0

    def choose(self, prompt, tiers):
        self.calls += 1
        return (tiers[-1], 0.9) if "hard" in prompt else (tiers[0], 0.1)


class Broken:
    def choose(self, prompt, tiers):
        raise RuntimeError("weights missing")


@pytest.mark.parametrize("rule, hit, miss", [
    (Rule("rx", "large", last_user_regex=r"\bdef \w+\("), view("fix def f(x): pass"), view("define it")),
    (Rule("kw", "large", keywords_any=("Traceback", "segfault")), view("got a TRACEBACK here"), view("all good")),
    (Rule("hdr", "large", header=(("X-Tier-Hint", "big"),)), view(headers={"x-tier-hint": "big"}),
     view(headers={"x-tier-hint": "small"})),
    (Rule("hdr-any", "large", header=(("x-premium", "*"),)), view(headers={"x-premium": "1"}), view()),
    (Rule("path", "large", path=("/v1/completions",)), view(path="/v1/completions"), view()),
    (Rule("user", "large", user_in=frozenset({"alice"})), view(user="alice"), view(user="bob")),
    (Rule("tools", "large", tools=True), view(tools=True), view()),
    (Rule("no-tools", "large", tools=False), view(), view(tools=True)),
    (Rule("long-answer", "large", max_tokens_gt=1000), view(max_tokens=2000), view(max_tokens=100)),
    (Rule("short-answer", "large", max_tokens_lt=10), view(max_tokens=5), view()),
    (Rule("long-prompt", "large", prompt_chars_gt=100), view("x" * 200), view("x" * 20)),
    (Rule("short-prompt", "large", prompt_chars_lt=30), view("hi"), view("x" * 50)),
])
def test_each_rule_condition_decides_when_it_holds_and_passes_when_not(rule, hit, miss):
    p = TierPipeline(TIERS, "small", [rule])
    d = p.decide(hit)
    assert (d.tier, d.step, d.rule) == ("large", "rules", rule.name)
    d = p.decide(miss)
    assert (d.tier, d.step, d.rule) == ("small", "default", None)


def test_rule_conditions_are_anded_and_the_first_matching_rule_wins():
    rules = [Rule("both", "large", keywords_any=("proof",), max_tokens_gt=500),
             Rule("kw", "medium", keywords_any=("proof",))]
    p = TierPipeline(TIERS, "small", rules)
    assert p.decide(view("a proof", max_tokens=1000)).rule == "both"
    assert p.decide(view("a proof", max_tokens=10)).rule == "kw"


def test_rules_read_the_last_user_message_not_the_system_prompt():
    p = TierPipeline(TIERS, "small", [Rule("kw", "large", keywords_any=("brief",))])
    assert p.decide(view("hello")).step == "default"  # "brief" is only in the system message
    msgs = [{"role": "user", "content": "be brief"}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "text", "text": "now a proof"}]}]
    assert p.decide(view(messages=msgs)).step == "default"


def test_classifier_decides_after_rules_and_before_the_default():
    clf = Keyword()
    p = TierPipeline(TIERS, "medium", [Rule("kw", "small", keywords_any=("cheap",))], clf)
    assert p.decide(view("cheap hard")).step == "rules" and clf.calls == 0  # a rule short-circuits
    d = p.decide(view("a hard one"))
    assert (d.tier, d.step, d.score) == ("large", "classifier", 0.9)
    d = p.decide(view("easy"))
    assert (d.tier, d.step) == ("small", "classifier")


def test_shadow_mode_records_the_prediction_and_dispatches_the_default():
    p = TierPipeline(TIERS, "medium", (), Keyword(), ClassifierMode.SHADOW)
    d = p.decide(view("hard"))
    assert (d.tier, d.step, d.shadow_tier, d.score) == ("medium", "default", "large", 0.9)


def test_kill_switch_stops_consulting_the_classifier_at_once_and_revive_restores_it():
    clf = Keyword()
    p = TierPipeline(TIERS, "small", (), clf)
    assert p.decide(view("hard")).tier == "large"
    p.kill()
    d = p.decide(view("hard"))
    assert (d.tier, d.step, d.score) == ("small", "default", None) and clf.calls == 1
    p.revive(shadow=True)
    assert p.decide(view("hard")).shadow_tier == "large"
    p.revive()
    assert p.decide(view("hard")).step == "classifier"


def test_a_failing_classifier_falls_through_to_the_default_and_says_why():
    d = TierPipeline(TIERS, "medium", (), Broken()).decide(view("x"))
    assert (d.tier, d.step) == ("medium", "default") and "weights missing" in d.classifier_error


def test_unknown_tiers_are_refused_when_the_pipeline_is_built():
    with pytest.raises(ValueError):
        TierPipeline(TIERS, "huge")
    with pytest.raises(ValueError):
        TierPipeline(TIERS, "small", [Rule("r", "huge")])


# -- per-user offsets -----------------------------------------------------------------------------------


def test_user_offsets_learn_from_escalations_and_apply_to_that_user_only():
    uo = UserOffsets(half_life_s=100, prior=1.0, step=0.5)
    p = TierPipeline(TIERS, "small", (), user_offsets=uo)
    for t in range(3):
        uo.observe("alice", 1, now=t)
    assert uo.offset("alice", 3) == 1 and uo.offset("bob", 3) == 0
    d = p.decide(view(user="alice"), now=3)
    assert (d.tier, d.base_tier, d.user_offset, d.step) == ("medium", "small", 1, "default")
    assert p.decide(view(user="bob"), now=3).tier == "small"
    assert p.decide(view(), now=3).user_offset == 0  # no user: no offset


def test_user_offsets_need_evidence_and_are_capped():
    uo = UserOffsets(half_life_s=100, prior=2.0, step=0.5, max_offset=1)
    uo.observe("u", 1, now=0)  # one escalation against the prior's two "no escalation"s: 1/3
    assert uo.offset("u", 0) == 0
    for _ in range(20):
        uo.observe("u", 2, now=0)
    assert uo.offset("u", 0) == 1  # capped
    uo2 = UserOffsets(half_life_s=100, prior=0.0, max_offset=2)
    for _ in range(5):
        uo2.observe("v", 2, now=0)
    p = TierPipeline(TIERS, "small", (), user_offsets=uo2)
    assert p.decide(view(user="v")).tier == "large"
    for _ in range(5):
        uo2.observe("w", -2, now=0)
    assert TierPipeline(TIERS, "large", (), user_offsets=uo2).decide(view(user="w")).tier == "small"


def test_user_offsets_decay_back_to_zero_when_a_user_stops_escalating():
    uo = UserOffsets(half_life_s=10, prior=1.0, step=0.5)
    for _ in range(5):
        uo.observe("u", 1, now=0)
    assert uo.offset("u", 0) == 1
    assert uo.value("u", 10) < uo.value("u", 0)
    assert uo.offset("u", 100) == 0  # ten half-lives later the prior dominates again


def test_user_offsets_memory_is_bounded_dropping_the_least_recently_seen():
    uo = UserOffsets(max_users=50)
    for i in range(500):
        uo.observe(f"user{i}", 1, now=i)
    assert len(uo) == 50
    assert uo.value("user0", 500) == 0.0 and uo.value("user499", 500) > 0


# -- drift ----------------------------------------------------------------------------------------------


def test_drift_is_small_for_the_training_distribution_and_large_after_a_shift():
    rng = random.Random(7)
    ref = [rng.betavariate(2, 5) for _ in range(5000)]
    d = ScoreDrift(ref, window=1000)
    assert d.reference_source == "training" and d.psi() is None
    for _ in range(1000):
        d.observe(rng.betavariate(2, 5))
    assert d.psi() < 0.05 and d.ks() < 0.06
    for _ in range(1000):
        d.observe(rng.betavariate(5, 2))
    assert d.psi() > 1.0 and d.ks() > 0.5


def test_drift_takes_the_first_scores_as_reference_when_the_model_ships_none():
    rng = random.Random(3)
    d = ScoreDrift(None, warmup=200, window=400)
    for _ in range(199):
        d.observe(rng.random())
    assert d.reference_source == "none" and d.psi() is None
    d.observe(rng.random())
    assert d.reference_source == "warmup" and d.psi() is not None
    for _ in range(400):
        d.observe(0.99)
    assert d.psi() > 1.0
