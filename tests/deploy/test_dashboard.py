"""deploy/grafana/prefixlb-dashboard.json: a well-formed dashboard over metrics that exist.

Every PromQL expression (panel targets and template variables) is checked against what the
code really exposes: a live scrape of a Balancer and an emulated vLLM replica (conftest).
"""

from __future__ import annotations

import json
import re

import pytest

from .support import DEPLOY, PromQL, label_values_query, parse_promql

DASHBOARD = DEPLOY / "grafana" / "prefixlb-dashboard.json"

# Labels Prometheus attaches to every scraped series (target labels), and labels a scrape config
# is documented to add to vLLM targets (deploy/prometheus/prometheus.yml adds `tier`).
TARGET_LABELS = {"instance", "job", "namespace", "pod", "service", "endpoint", "container"}
ADDED_BY_SCRAPE = {"vllm:": {"tier"}}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict) -> list[dict]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows keep their panels inside
    return out


def expressions(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every target and every query variable."""
    out = []
    for p in all_panels(dashboard):
        for t in p.get("targets", []):
            out.append((f"panel {p['id']} {p['title']!r} target {t.get('refId')}", t["expr"]))
    for v in dashboard["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            selector, _ = label_values_query(q)
            if selector:
                out.append((f"variable {v['name']}", selector))
    return out


def test_dashboard_is_a_grafana_dashboard_with_a_prometheus_datasource_variable(dashboard):
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["title"] and dashboard["uid"]
    assert len(dashboard["uid"]) <= 40  # Grafana's limit
    assert dashboard.get("id") is None  # importable into any Grafana
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    tier = variables["tier"]
    assert tier["type"] == "query" and tier["includeAll"] and tier["multi"]
    # "All" must also match series without the label (vLLM targets not labelled by tier)
    assert tier["allValue"] == ".*"
    assert label_values_query(tier["definition"])[1] == "tier"
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"]["uid"] == "${datasource}", v["name"]


def test_panel_ids_are_unique_and_panels_fit_the_grid_without_overlapping(dashboard):
    panels = all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    cells: dict[tuple[int, int], int] = {}
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['id']} overlaps panel {cells[(x, y)]}"
                cells[(x, y)] = p["id"]


def test_every_target_has_a_datasource_an_expression_and_a_unique_ref_id(dashboard):
    for p in all_panels(dashboard):
        if p["type"] == "row":
            assert not p.get("targets")
            continue
        assert p.get("title"), p["id"]
        targets = p.get("targets", [])
        assert targets, f"panel {p['id']} {p['title']!r} has no query"
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        refs = [t["refId"] for t in targets]
        assert len(refs) == len(set(refs)), p["title"]
        for t in targets:
            assert t.get("datasource") == {"type": "prometheus", "uid": "${datasource}"}, (p["title"], t["refId"])
            assert t.get("expr", "").strip(), (p["title"], t["refId"])
            assert t["expr"].count("(") == t["expr"].count(")"), (p["title"], t["expr"])
            assert t["expr"].count("{") == t["expr"].count("}"), (p["title"], t["expr"])


def _labels_available(q: PromQL, families: dict[str, tuple[str, set[str]]], series) -> set[str]:
    labels = set(TARGET_LABELS)
    for name in q.metrics:
        fam, _kind = series[name]
        labels |= families[fam][1]
        if name.endswith("_bucket"):
            labels.add("le")
        for prefix, extra in ADDED_BY_SCRAPE.items():
            if name.startswith(prefix):
                labels |= extra
    return labels


def test_every_metric_and_label_the_dashboard_queries_is_exposed_by_the_code(dashboard, live_metrics):
    balancer, vllm = live_metrics["balancer"], live_metrics["vllm"]
    series = {**balancer.series, **vllm.series}
    families = {**balancer.families, **vllm.families}
    problems = []
    for where, expr in expressions(dashboard):
        q = parse_promql(expr)
        if not q.metrics:
            problems.append(f"{where}: no metric in {expr!r}")
            continue
        unknown = sorted(m for m in q.metrics if m not in series)
        if unknown:
            problems.append(f"{where}: unknown series {unknown}")
            continue
        for name in q.metrics:
            if not name.startswith(("prefixlb_", "vllm:")):
                problems.append(f"{where}: {name} is neither prefixlb_* nor vllm:*")
        available = _labels_available(q, families, series)
        for name, used in q.matchers.items():
            own = _labels_available(parse_promql(name), families, series)
            missing = used - own
            if missing:
                problems.append(f"{where}: {name} has no label(s) {sorted(missing)}")
        missing = q.grouping - available
        if missing:
            problems.append(f"{where}: grouping by unknown label(s) {sorted(missing)}")
    for p in all_panels(dashboard):
        for t in p.get("targets", []):
            q = parse_promql(t["expr"])
            if not all(m in series for m in q.metrics):
                continue
            legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat", "")))
            missing = legend - _labels_available(q, families, series)
            if missing:
                problems.append(f"panel {p['title']!r}: legend uses unknown label(s) {sorted(missing)}")
    assert not problems, "\n".join(problems)


def test_histogram_quantiles_aggregate_buckets_by_le(dashboard):
    for where, expr in expressions(dashboard):
        for m in re.finditer(r"histogram_quantile\(\s*([0-9.]+)\s*,\s*(.*)", expr):
            assert 0 < float(m.group(1)) < 1, where
            inner = m.group(2)
            assert "_bucket" in inner, where
            by = re.search(r"\bby\s*\(([^)]*)\)", inner)
            assert by and "le" in [x.strip() for x in by.group(1).split(",")], f"{where}: sum by (le, ...)"


def _panels_using(dashboard: dict, *metrics: str, grouping: str | None = None) -> list[str]:
    found = []
    for p in all_panels(dashboard):
        qs = [parse_promql(t["expr"]) for t in p.get("targets", [])]
        used = set().union(*(q.metrics for q in qs)) if qs else set()
        groups = set().union(*(q.grouping for q in qs)) if qs else set()
        if set(metrics) <= used and (grouping is None or grouping in groups):
            found.append(p["title"])
    return found


@pytest.mark.parametrize(
    ("what", "metrics", "grouping"),
    [
        ("hit rate predicted vs actual (router, usage, vLLM counters)",
         ("prefixlb_predicted_cached_tokens_total", "prefixlb_actual_cached_tokens_total",
          "prefixlb_prompt_tokens_total", "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"), None),
        ("TTFT per tier", ("prefixlb_ttft_seconds_bucket",), "tier"),
        ("TTFT per replica", ("prefixlb_ttft_seconds_bucket",), "replica"),
        ("vLLM's own TTFT", ("vllm:time_to_first_token_seconds_bucket",), None),
        ("requests/s by status", ("prefixlb_requests_total",), "status"),
        ("tier mix", ("prefixlb_requests_total",), "tier"),
        ("in-flight per replica", ("prefixlb_inflight_requests",), "replica"),
        ("cost per tier", ("prefixlb_cost_dollars_total",), "tier"),
        ("retries", ("prefixlb_retries_total",), "reason"),
        ("breaker state", ("prefixlb_breaker_state",), "replica"),
        ("replica health", ("prefixlb_replica_healthy",), "replica"),
        ("index blocks", ("prefixlb_index_blocks",), None),
        ("index evictions", ("prefixlb_index_evictions_total",), None),
        ("route decision latency", ("prefixlb_route_decision_seconds_bucket",), None),
    ],
)
def test_the_dashboard_has_a_panel_for(dashboard, what, metrics, grouping):
    assert _panels_using(dashboard, *metrics, grouping=grouping), f"no panel shows {what}"


def test_breaker_panel_maps_every_state_the_code_exports(dashboard):
    # prefixlb/server/metrics.py: 0 closed, 1 half-open, 2 open
    (panel,) = [p for p in all_panels(dashboard) if _panels_using({"panels": [p]}, "prefixlb_breaker_state")
                and p["type"] == "state-timeline"]
    mapped = set()
    for m in panel["fieldConfig"]["defaults"]["mappings"]:
        mapped |= set(m["options"])
    assert mapped == {"0", "1", "2"}


def test_the_promql_reader_sees_metrics_not_functions_labels_numbers_or_variables():
    q = parse_promql('histogram_quantile(0.99, sum by (le, tier) (rate(prefixlb_ttft_seconds_bucket'
                     '{tier=~"$tier", replica!="a{b"}[$__rate_interval]))) * 1e3 / on(tier) '
                     'count(vllm:num_requests_running) or vector(0)')
    assert q.metrics == {"prefixlb_ttft_seconds_bucket", "vllm:num_requests_running"}
    assert q.matchers["prefixlb_ttft_seconds_bucket"] == {"tier", "replica"}
    assert q.grouping == {"le", "tier"}
    assert label_values_query('label_values(prefixlb_replica_healthy{tier=~"$tier"}, replica)') == (
        'prefixlb_replica_healthy{tier=~"$tier"}', "replica")
