"""Configuration: the DESIGN contract parses; every bad key is named."""

from __future__ import annotations

import re

import pytest
import yaml

from prefixlb.config import ConfigError, config_from_flags, load_config, parse_config

GOOD = """
listen: {host: 127.0.0.1, port: 8000}
tiers:
  - name: small
    model: llama-3.1-8b
    price: {input_per_mtok: 0.18, output_per_mtok: 0.18}
    replicas: [http://127.0.0.1:9001, http://127.0.0.1:9002]
  - name: large
    model: llama-3.3-70b
    price: {input_per_mtok: 0.88, output_per_mtok: 0.88}
    replicas: [{url: "http://127.0.0.1:9101", capacity_tokens: 500000}]
routing:
  policy: cache_aware
"""


def test_design_example_parses(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(GOOD)
    c = load_config(p)
    assert [t.name for t in c.tiers] == ["small", "large"] and c.default == "small"
    assert c.tiers[1].replicas[0].capacity_tokens == 500000 and c.tiers[0].input_per_mtok == 0.18
    assert c.policy == "cache_aware" and c.port == 8000


@pytest.mark.parametrize(
    "patch, where",
    [
        ({"tiers": []}, "tiers"),
        ({"tiers": [{"name": "a", "replicas": ["ftp://x"]}]}, "tiers[0].replicas[0]"),
        ({"tiers": [{"name": "a", "replicas": ["http://x:1"], "colour": 1}]}, "tiers[0].colour"),
        ({"tiers": [{"replicas": ["http://x:1"]}]}, "tiers[0].name"),
        ({"tiers": [{"name": "a", "replicas": []}]}, "tiers[0].replicas"),
        ({"tiers": [{"name": "a", "replicas": ["http://x:1", "http://x:1"]}]}, "tiers[0].replicas[1]"),
        ({"tiers": [{"name": "auto", "replicas": ["http://x:1"]}]}, "tiers[0].name"),
        ({"routing": {"policy": "best"}}, "routing.policy"),
        ({"routing": {"default_tier": "huge"}}, "routing.default_tier"),
        ({"listen": {"port": 70000}}, "listen.port"),
        ({"listen": {"port": "80"}}, "listen.port"),
        ({"retries": {"max_attempts": 0}}, "retries.max_attempts"),
        ({"tiers": [{"name": "a", "replicas": ["http://x:1"], "cost": {"prefill_tokens_per_s": -1}}]}, "tiers[0].cost.prefill_tokens_per_s"),
        ({"tiers": [{"name": "a", "replicas": ["http://x:1"], "cost": {"admit_share": -0.5}}]}, "tiers[0].cost.admit_share"),
        ({"tiers": [{"name": "a", "replicas": ["http://x:1"], "cost": {"admit_max_wait_s": "2"}}]}, "tiers[0].cost.admit_max_wait_s"),
        ({"health": {"interval": 3}}, "health.interval"),
    ],
)
def test_bad_config_names_the_offending_key(patch, where):
    raw = yaml.safe_load(GOOD)
    raw.update(patch)
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    assert str(e.value).startswith(where), str(e.value)


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiers: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_flags_form_one_tier_learning_models():
    c = config_from_flags(["http://127.0.0.1:9001/", "http://127.0.0.1:9002"], policy="round_robin", port=0)
    assert c.tiers[0].model is None and [r.url for r in c.tiers[0].replicas] == ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]
    with pytest.raises(ConfigError, match="--replica"):
        config_from_flags([])
    with pytest.raises(ConfigError, match="--policy"):
        config_from_flags(["http://a:1"], policy="x")


def test_admin_token_from_environment(monkeypatch):
    monkeypatch.setenv("PLB_TOKEN", "s3cret")
    raw = yaml.safe_load(GOOD)
    raw["admin"] = {"token_env": "PLB_TOKEN"}
    assert parse_config(raw).admin_token == "s3cret"


@pytest.mark.parametrize("url", ["http://svc:s3cr3t-pw@10.0.0.5:8000", "http://s3cr3t-pw@10.0.0.5:8000",
                                 "ftp://u:s3cr3t-pw@host"])
def test_credentials_in_a_replica_url_are_refused_without_echoing_them(url):
    with pytest.raises(ConfigError) as e:
        parse_config({"tiers": [{"name": "a", "replicas": ["http://10.0.0.4:8000", url]}]})
    assert "tiers[0].replicas[1]" in str(e.value) and "credentials" in str(e.value)
    assert "s3cr3t" not in str(e.value)
    with pytest.raises(ConfigError) as e:
        config_from_flags([url])
    assert "--replica[0]" in str(e.value) and "s3cr3t" not in str(e.value)


@pytest.mark.parametrize("tier, url, where", [
    ("a\r\nx-evil: 1", "http://10.0.0.4:8000", "tiers[0].name"),
    ("a", "http://10.0.0.4:8000/\r\nx-evil: 1", "tiers[0].replicas[0]"),
    ("a", "http://10.0.0.4:8000/a b", "tiers[0].replicas[0]"),
    ("a", "http://10.0.\t0.4:8000", "tiers[0].replicas[0]"),  # (urlsplit would drop the tab silently)
])
def test_a_tier_name_or_replica_url_that_could_not_be_a_header_value_is_refused(tier, url, where):
    # both go out on every answer (x-prefixlb-tier, x-prefixlb-replica), rendered once at startup
    with pytest.raises(ConfigError, match=rf"^{re.escape(where)}"):
        parse_config({"tiers": [{"name": tier, "replicas": [url]}]})
