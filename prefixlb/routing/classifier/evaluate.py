"""Scoring a labelled set with a trained model: metrics (``metrics.py``), per-source
breakdown, in-process latency, and the report files (JSON, Markdown, PNG)."""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Sequence
from pathlib import Path

from . import metrics
from .data import Dataset

__all__ = ["evaluate_model", "measure_latency", "write_report"]


def measure_latency(clf, prompts: Sequence[str], warmup: int = 50, limit: int = 5000) -> dict:
    """In-process ``score()`` time per prompt (ms): p50 / p90 / p99 over up to ``limit`` prompts."""
    sample = list(prompts[:limit])
    for p in sample[:warmup]:
        clf.score(p)
    times = []
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for p in sample:
            t0 = time.perf_counter_ns()
            clf.score(p)
            times.append(time.perf_counter_ns() - t0)
    finally:
        if gc_was:
            gc.enable()
    times.sort()

    def q(x: float) -> float:
        return round(times[min(len(times) - 1, int(x * len(times)))] / 1e6, 4)

    return {"latency_ms_p50": q(0.5), "latency_ms_p90": q(0.9), "latency_ms_p99": q(0.99), "latency_prompts": len(times)}


def _tier_columns(model_tiers: list[str], data_tiers: list[str]) -> tuple[list[int], str | None]:
    if data_tiers == model_tiers:
        return list(range(len(model_tiers))), None
    if set(data_tiers) == set(model_tiers):
        return [data_tiers.index(t) for t in model_tiers], None
    if len(data_tiers) == len(model_tiers):
        return list(range(len(model_tiers))), (
            f"data tiers {data_tiers} matched to model tiers {model_tiers} by position (cheapest first)"
        )
    raise ValueError(f"the model routes among tiers {model_tiers}; the data has {data_tiers}")


def evaluate_model(clf, ds: Dataset, prices: Sequence[float] | None = None, latency: bool = True) -> dict:
    """Metrics of ``clf`` on every row of ``ds`` (as a dict; ``_curve`` holds the full curve)."""
    cols, note = _tier_columns(clf.tiers, ds.tiers)
    prices = list(prices or clf.prices)
    probs = [clf.probs(ex.prompt).tolist() for ex in ds.examples]
    correct = [[float(ex.correct[c]) for c in cols] for ex in ds.examples]
    rep = metrics.report(probs, correct, clf.tiers, prices)
    out = rep.as_dict(curve=True)
    if note:
        out["note"] = note
    sources = sorted({ex.source for ex in ds.examples if ex.source})
    if len(sources) > 1:
        out["by_source"] = {}
        for s in sources:
            idx = [i for i, ex in enumerate(ds.examples) if ex.source == s]
            try:
                r = metrics.report([probs[i] for i in idx], [correct[i] for i in idx], clf.tiers, prices)
                out["by_source"][s] = r.as_dict()
            except ValueError as exc:
                out["by_source"][s] = {"n": len(idx), "error": str(exc)}
    if latency:
        out.update(measure_latency(clf, [ex.prompt for ex in ds.examples]))
    out["_curve"] = rep.curve
    return out


def public(d: dict) -> dict:
    """The report without internal keys (for JSON)."""
    return {k: (public(v) if isinstance(v, dict) else v) for k, v in d.items() if not k.startswith("_")}


def _fmt(x) -> str:
    return "—" if x is None else f"{x:.3f}"


def markdown(report: dict, title: str) -> str:
    lines = [f"## Tier classifier: {title}", ""]
    if report.get("command"):
        lines += [f"`{report['command']}`", ""]
    rows = []
    for name, key in (("held-out", "heldout"), ("validation", "validation"), ("evaluation", "evaluation")):
        r = report.get(key)
        if not r:
            continue
        rows.append((name, r))
        for s, rs in (r.get("by_source") or {}).items():
            if "apgr" in rs:
                rows.append((f"{name}: {s}", rs))
    lines.append("| set | n | AUC | APGR | CPT(50%) | CPT(80%) | cost saved at 95% | quality by tier |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        q = ", ".join(f"{t} {v:.3f}" for t, v in r["quality_by_tier"].items())
        lines.append(
            f"| {name} | {r['n']} | {_fmt(r['auc'])} | {_fmt(r['apgr'])} | {_fmt(r['cpt50'])} | {_fmt(r['cpt80'])} "
            f"| {_fmt(r['cost_saved_at_95'])} | {q} |"
        )
    for name, key in (("held-out", "heldout"), ("evaluation", "evaluation")):
        r = report.get(key)
        if r and "latency_ms_p50" in r:
            lines += ["", f"Inference ({name} prompts, in-process, numpy): p50 {r['latency_ms_p50']} ms, "
                          f"p99 {r['latency_ms_p99']} ms"]
    lines += ["", "AUC: ROC AUC of the score for 'a dearer tier is needed'. APGR, CPT: RouteLLM's definitions over "
                  "the cost-normalised call fraction (see prefixlb/routing/classifier/metrics.py). Fractions, not percents."]
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict, title: str, plot: bool = True) -> None:
    out = Path(out)
    (out / "report.json").write_text(json.dumps(public(report), indent=2) + "\n")
    (out / "report.md").write_text(markdown(report, title))
    key = "heldout" if "heldout" in report else "evaluation"
    if plot and report.get(key) and "_curve" in report[key]:
        from .plot import plot_curve

        plot_curve(report[key], out / "curve.png", title=title)
