"""Tier routing in the running balancer, against emulated tiers on 127.0.0.1: every pipeline
step, shadow mode and the kill switch, per-user offsets, feedback, cost counters, the decision
log and ``prefixlb report``."""

from __future__ import annotations

import json
import subprocess
import sys

import aiohttp
import orjson
import pytest

from prefixlb.routing.decision_log import decision_log_to_training, read_log

from .support import AUTH, PRICES, call, chat, keyword_model, metric_lines, tiered


async def test_explicit_names_skip_the_pipeline_and_auto_goes_to_the_default():
    rules = [{"name": "all", "tier": "large", "when": {}}]  # would catch every auto request
    async with tiered({"default_tier": "medium", "rules": rules}) as (b, base):
        async with aiohttp.ClientSession() as s:
            for model, tier in (("small", "small"), ("m-medium", "medium")):
                st, h, _ = await call(s, base, chat("hi", model=model))
                assert st == 200 and h["x-prefixlb-tier"] == tier and h["x-prefixlb-step"] == "explicit"
            st, _, body = await call(s, base, chat("hi", model="gpt-17"))
            assert st == 404 and b"does not exist" in body
    async with tiered({"default_tier": "medium"}) as (b, base):
        async with aiohttp.ClientSession() as s:
            st, h, _ = await call(s, base, chat("hi"))
            assert (h["x-prefixlb-tier"], h["x-prefixlb-step"]) == ("medium", "default")
            st, h, _ = await call(s, base, {"messages": [{"role": "user", "content": "no model"}], "max_tokens": 4})
            assert h["x-prefixlb-step"] == "default"
            counts = await metric_lines(s, base, "prefixlb_tier_decisions_total")
            assert counts['prefixlb_tier_decisions_total{step="default",tier="medium"}'] == 2


async def test_rules_from_yaml_route_on_headers_keywords_and_max_tokens():
    rules = [{"name": "vip", "tier": "large", "when": {"header": {"x-plan": "enterprise"}}},
             {"name": "code", "tier": "medium", "when": {"keywords_any": ["traceback"], "max_tokens_gt": 8}}]
    async with tiered({"rules": rules}) as (b, base):
        async with aiohttp.ClientSession() as s:
            st, h, _ = await call(s, base, chat("hello"), {"x-plan": "enterprise"})
            assert (h["x-prefixlb-tier"], h["x-prefixlb-step"]) == ("large", "rules")
            st, h, _ = await call(s, base, chat("a Traceback (most recent call last)", max_tokens=16))
            assert h["x-prefixlb-tier"] == "medium"
            st, h, _ = await call(s, base, chat("a Traceback (most recent call last)", max_tokens=4))
            assert (h["x-prefixlb-tier"], h["x-prefixlb-step"]) == ("small", "default")


async def test_classifier_decides_then_shadow_then_kill_switch_and_revive(tmp_path):
    model = keyword_model(tmp_path / "router")
    tr = {"classifier": {"model": model, "drift_warmup": 10, "drift_window": 50},
          "decision_log": {"path": str(tmp_path / "d.jsonl")}}
    async with tiered(tr) as (b, base):
        async with aiohttp.ClientSession() as s:
            st, h, _ = await call(s, base, chat("a difficult question"))
            assert (h["x-prefixlb-tier"], h["x-prefixlb-step"]) == ("large", "classifier")
            st, h, _ = await call(s, base, chat("an easy question"))
            assert (h["x-prefixlb-tier"], h["x-prefixlb-step"]) == ("small", "classifier")
            # the admin API needs the token
            async with s.post(base + "/admin/classifier/kill") as r:
                assert r.status == 401
            async with s.post(base + "/admin/classifier/kill", headers=AUTH) as r:
                assert r.status == 200 and (await r.json())["classifier"] == "killed"
            st, h, _ = await call(s, base, chat("a difficult question"))
            assert (h["x-prefixlb-tier"], h["x-prefixlb-step"]) == ("small", "default")
            async with s.post(base + "/admin/classifier/revive", json={"shadow": True}, headers=AUTH) as r:
                assert (await r.json())["classifier"] == "shadow"
            st, h, _ = await call(s, base, chat("a difficult question"))
            assert (h["x-prefixlb-tier"], h["x-prefixlb-step"]) == ("small", "default")
            for i in range(12):
                await call(s, base, chat(f"question {i}"))
            async with s.get(base + "/admin/tiers", headers=AUTH) as r:
                state = await r.json()
            assert state["classifier"]["mode"] == "shadow"
            assert state["classifier"]["drift"]["reference"] == "warmup"
            m = await metric_lines(s, base, "prefixlb_classifier")
            assert m["prefixlb_classifier_score_count"] == 15  # every request the classifier saw
            assert any(k.startswith("prefixlb_classifier_drift{") for k in m)
            assert m['prefixlb_classifier_mode{mode="shadow"}'] == 1
    rows = [r for r in read_log(tmp_path / "d.jsonl") if r["type"] == "request"]
    shadow = rows[3]
    assert (shadow["tier"], shadow["step"], shadow["shadow_tier"]) == ("small", "default", "large")
    assert shadow["score"] > 0.9 and rows[2]["score"] is None  # killed: not consulted


def test_a_classifier_for_another_number_of_tiers_is_refused_at_start(tmp_path):
    from prefixlb.config import ConfigError, parse_config
    from prefixlb.server import Balancer

    raw = {"tiers": [{"name": n, "replicas": [f"http://127.0.0.1:{9000 + i}"]} for i, n in enumerate(("a", "b"))],
           "tier_routing": {"classifier": {"model": keyword_model(tmp_path / "m")}}}  # a three-tier model
    with pytest.raises(ConfigError, match="routes among 3 tiers"):
        Balancer(parse_config(raw))


async def test_a_classifier_disabled_in_config_starts_killed(tmp_path):
    tr = {"classifier": {"model": keyword_model(tmp_path / "m"), "enabled": False}}
    async with tiered(tr) as (b, base), aiohttp.ClientSession() as s:
        st, h, _ = await call(s, base, chat("a difficult question"))
        assert h["x-prefixlb-step"] == "default"
        async with s.post(base + "/admin/classifier/revive", headers=AUTH) as r:
            assert r.status == 200
        st, h, _ = await call(s, base, chat("a difficult question"))
        assert (h["x-prefixlb-tier"], h["x-prefixlb-step"]) == ("large", "classifier")


async def test_cost_counters_decision_log_and_report_agree(tmp_path):
    log = tmp_path / "decisions.jsonl"
    tr = {"rules": [{"name": "hard", "tier": "large", "when": {"keywords_any": ["prove"]}}],
          "cascade": {"min_mean_logprob": -0.0001, "max_tiers": 2},  # nothing passes: every cascade escalates
          "decision_log": {"path": str(log), "prompts": True}}
    async with tiered(tr) as (b, base):
        async with aiohttp.ClientSession() as s:
            st, h, _ = await call(s, base, chat("prove it", max_tokens=10), {"x-request-id": "req-1"})
            assert h["x-prefixlb-request-id"] == "req-1"
            st, h, _ = await call(s, base, chat("say hi", max_tokens=10))
            rid2 = h["x-prefixlb-request-id"]
            st, h, raw = await call(s, base, chat("say hello", model="auto-cascade", max_tokens=10))
            assert h["x-prefixlb-tier"] == "medium" and h["x-prefixlb-escalations"] == "1"
            cost = await metric_lines(s, base, "prefixlb_cost_dollars_total")
            async with s.post(base + "/admin/feedback", json={"request_id": "req-1", "correct": True},
                              headers=AUTH) as r:
                assert r.status == 200 and (await r.json())["applied"] is True
            async with s.post(base + "/admin/feedback", json={"request_id": rid2, "tier_needed": "medium"},
                              headers=AUTH) as r:
                assert r.status == 200
            async with s.post(base + "/admin/feedback", json={"request_id": "nope", "correct": False},
                              headers=AUTH) as r:
                assert r.status == 202 and (await r.json())["applied"] is False
            async with s.post(base + "/admin/feedback", json={"request_id": "req-1"}, headers=AUTH) as r:
                assert r.status == 400
            m = await metric_lines(s, base, "prefixlb_feedback")
            assert m['prefixlb_feedback_accuracy{of="served"}'] == 0.5
    rows = list(read_log(log))
    reqs = [r for r in rows if r["type"] == "request"]
    assert [r["tier"] for r in reqs] == ["large", "small", "medium"]
    assert [r["step"] for r in reqs] == ["rules", "default", "default"]
    for r in reqs:
        for k in ("request_id", "user", "tier", "step", "score", "replica", "predicted_cached_tokens",
                  "actual_cached_tokens", "prompt_tokens", "completion_tokens", "cost", "escalations"):
            assert k in r
        want = sum((a["prompt_tokens"] + a["completion_tokens"]) * PRICES[a["tier"]] / 1e6 for a in r["attempts"])
        assert r["cost"] == pytest.approx(want)
    esc = reqs[2]
    assert esc["escalations"] == 1 and [a["tier"] for a in esc["attempts"]] == ["small", "medium"]
    assert esc["cascade"]["reasons"] == ["low_mean_logprob"] and esc["cascade"]["outcome"] == "top"
    # /metrics counts the same spend per tier, the rejected small answer included
    by_tier = {t: sum(a["cost"] for r in reqs for a in r["attempts"] if a["tier"] == t) for t in PRICES}
    for t, v in by_tier.items():
        assert cost.get(f'prefixlb_cost_dollars_total{{tier="{t}"}}', 0.0) == pytest.approx(v)
    assert len([r for r in rows if r["type"] == "feedback"]) == 3
    # prefixlb report: cost per 1K against all-large, the tier mix, quality from the labels
    out = subprocess.run([sys.executable, "-m", "prefixlb", "report", "--log", str(log), "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert rep["requests"] == 3 and rep["tier_mix"] == pytest.approx({"large": 1 / 3, "small": 1 / 3,
                                                                       "medium": 1 / 3})
    assert rep["cost_per_1k"] == pytest.approx(1000 * sum(r["cost"] for r in reqs) / 3)
    assert rep["all_largest_per_1k"] == pytest.approx(1000 * sum(r["cost_if_largest"] for r in reqs) / 3)
    assert 0 < rep["cost_cut"] < 1 and rep["quality"] == 0.5 and rep["labelled"] == 2
    text = subprocess.run([sys.executable, "-m", "prefixlb", "report", "--log", str(log), "--prices",
                           "small=0.06,medium=0.18,large=0.88"], capture_output=True, text=True, timeout=60)
    assert "cost cut" in text.stdout and "| medium |" in text.stdout
    # the log as training data: the labelled and the cascaded requests, labels for every tier
    train = {r["prompt"]: r["correct"] for r in decision_log_to_training(log, ["small", "medium", "large"])}
    assert "prove it" not in train  # right on large says nothing about the cheaper tiers: not a full label
    assert train["say hi"] == {"small": False, "medium": True, "large": True}
    assert train["say hello"] == {"small": False, "medium": True, "large": True}  # final answer assumed right
    # ... and through the CLI, in the file format prefixlb train-router reads
    out = subprocess.run([sys.executable, "-m", "prefixlb", "report", "--log", str(log), "--to-training",
                          str(tmp_path / "train.jsonl"), "--tiers", "small,medium,large"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "2 labelled prompts" in out.stderr, out.stderr
    from prefixlb.routing.classifier.data import load_jsonl

    ds = load_jsonl(tmp_path / "train.jsonl", ["small", "medium", "large"])
    assert sorted(ex.prompt for ex in ds.examples) == ["say hello", "say hi"]


async def test_per_user_offset_learned_from_escalations_moves_only_that_user(tmp_path):
    tr = {"cascade": {"min_mean_logprob": -1.0, "max_tiers": 2},  # skill-0 small answers fail, medium passes
          "per_user": {"header": "x-user", "prior": 2.0, "half_life_s": 3600, "max_users": 100}}
    async with tiered(tr, tiers=("small", "medium")) as (b, base):
        async with aiohttp.ClientSession() as s:
            for i in range(3):  # three escalations against the prior's two non-escalations: mean 0.6, one tier
                st, h, _ = await call(s, base, chat(f"hard question {i}", model="auto-cascade"), {"x-user": "alice"})
                assert h["x-prefixlb-tier"] == "medium" and h["x-prefixlb-escalations"] == "1"
            st, h, _ = await call(s, base, chat("next one", model="auto-cascade"), {"x-user": "alice"})
            assert h["x-prefixlb-tier"] == "medium" and h["x-prefixlb-escalations"] == "0"  # started at medium
            st, h, _ = await call(s, base, chat("plain", model="auto"), {"x-user": "alice"})
            assert h["x-prefixlb-tier"] == "medium"  # the offset applies to every auto request of hers
            st, h, _ = await call(s, base, chat("plain", model="auto"), {"x-user": "bob"})
            assert h["x-prefixlb-tier"] == "small"
            async with s.get(base + "/admin/tiers", headers=AUTH) as r:
                pu = (await r.json())["per_user"]
            assert pu["users"] == 1 and pu["top"][0]["user"] == "alice" and pu["top"][0]["offset"] == 1
            m = await metric_lines(s, base, "prefixlb_user_offsets_tracked")
            assert m["prefixlb_user_offsets_tracked"] == 1


@pytest.mark.parametrize("patch, where", [
    ({"colour": 1}, "tier_routing.colour"),
    ({"default_tier": "huge"}, "tier_routing.default_tier"),
    ({"rules": [{"tier": "large"}]}, "tier_routing.rules[0].name"),
    ({"rules": [{"name": "r", "tier": "huge"}]}, "tier_routing.rules[0].tier"),
    ({"rules": [{"name": "r", "tier": "large", "when": {"colour": "red"}}]}, "tier_routing.rules[0].when.colour"),
    ({"rules": [{"name": "r", "tier": "large", "when": {"last_user_regex": "(unclosed"}}]},
     "tier_routing.rules[0].when.last_user_regex"),
    ({"rules": [{"name": "r", "tier": "large", "when": {"max_tokens_gt": "10"}}]},
     "tier_routing.rules[0].when.max_tokens_gt"),
    ({"rules": [{"name": "r", "tier": "large", "when": {"keywords_any": [1]}}]},
     "tier_routing.rules[0].when.keywords_any"),
    ({"rules": [{"name": "r", "tier": "large"}, {"name": "r", "tier": "small"}]}, "tier_routing.rules[1].name"),
    ({"classifier": {"model": "/no/such/dir"}}, "tier_routing.classifier.model"),
    ({"classifier": {}}, "tier_routing.classifier.model"),
    ({"cascade": {"max_tiers": 0}}, "tier_routing.cascade.max_tiers"),
    ({"cascade": {"routes": ["large"]}}, "tier_routing.cascade.routes[0]"),
    ({"cascade": {"min_mean_logprob": 0.5}}, "tier_routing.cascade.min_mean_logprob"),
    ({"cascade": {"verifier_url": "ftp://x"}}, "tier_routing.cascade.verifier_url"),
    ({"cascade": {"verifier_python": "nocolon"}}, "tier_routing.cascade.verifier_python"),
    ({"cascade": {"verifier_on_error": "panic"}}, "tier_routing.cascade.verifier_on_error"),
    ({"cascade": {"per_tier": {"huge": {"min_mean_logprob": -1}}}}, "tier_routing.cascade.per_tier.huge"),
    ({"cascade": {"per_tier": {"small": {"json": True}}}}, "tier_routing.cascade.per_tier.small.json"),
    ({"cascade": {"per_tier": {"small": {"min_margin": -1}}}}, "tier_routing.cascade.per_tier.small.min_margin"),
    ({"per_user": {"step": 2}}, "tier_routing.per_user.step"),
    ({"per_user": {"half_life": 3}}, "tier_routing.per_user.half_life"),
    ({"decision_log": {"path": "/no/such/dir/d.jsonl"}}, "tier_routing.decision_log.path"),
    ({"decision_log": {"max_bytes": 10}}, "tier_routing.decision_log.path"),
    ({"decision_log": {"path": "/tmp/d.jsonl", "backups": 0}}, "tier_routing.decision_log.backups"),
])
def test_bad_tier_routing_config_names_the_offending_key(patch, where):
    from prefixlb.config import ConfigError, parse_config

    raw = {"tiers": [{"name": n, "replicas": [f"http://127.0.0.1:{9000 + i}"]}
                     for i, n in enumerate(("small", "medium", "large"))], "tier_routing": patch}
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    assert str(e.value).startswith(where), str(e.value)


def test_a_config_without_tier_routing_keeps_todays_behaviour():
    from prefixlb.config import parse_config

    cfg = parse_config({"tiers": [{"name": "a", "replicas": ["http://127.0.0.1:9"]}]})
    assert cfg.tier_routing is None
    assert orjson.dumps(cfg.default) == b'"a"'


def test_the_decision_log_rotates_by_size_and_is_read_back_in_order(tmp_path):
    from prefixlb.config import DecisionLogConfig
    from prefixlb.server.tiering import DecisionLog

    path = tmp_path / "d.jsonl"
    dl = DecisionLog(DecisionLogConfig(path=str(path), max_bytes=2048, backups=3))
    for i in range(400):  # outside an event loop every entry is written at once
        dl.add({"type": "request", "i": i, "pad": "x" * 40})
    dl.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["d.jsonl", "d.jsonl.1", "d.jsonl.2", "d.jsonl.3"]
    assert all(p.stat().st_size <= 2048 + 200 for p in tmp_path.iterdir())
    seen = [r["i"] for r in read_log(path)]
    assert seen == sorted(seen) and seen[-1] == 399 and len(seen) < 400  # the oldest rotated away
