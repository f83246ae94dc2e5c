"""The decision log: one JSON line per request (and per feedback label), read back for
``prefixlb report`` and as training data for the tier classifier.

The balancer writes it (``prefixlb.server.tiering``; ``tier_routing.decision_log`` in the
config, rotated by size). Line kinds:

``{"type": "request", "ts", "request_id", "user", "model", "tier", "tier_rank", "step", "rule", "score",
"shadow_tier", "base_tier", "user_offset", "replica", "predicted_cached_tokens",
"actual_cached_tokens", "prompt_tokens", "completion_tokens", "prompt_tokens_answer",
"completion_tokens_answer", "cost", "cost_if_largest", "escalations", "cascade", "attempts", "status",
"duration_s", "decide_us", "prompt_hash"[, "prompt"]}``

- ``tier``/``replica``: what answered (``tier_rank``: its place, cheapest 0); tokens and ``cost``
  are summed over every attempt paid for (a cascade pays for the answers it threw away);
  ``*_answer`` are the answer's own tokens and ``cost_if_largest`` what they would have cost on
  the largest (last) tier.
- ``cascade`` (null unless a cascade ran): ``{"tiers": tried, "reasons": why each rejected
  answer failed, "outcome": accepted | top | deadline | error_passed, "features": the logprob
  features of each checked answer}``.
- ``prompt`` only with ``decision_log.prompts: true``; ``prompt_hash`` always (the same 16 hex
  digits as ``prefixlb.routing.classifier.data.prompt_hash``).

``{"type": "feedback", "ts", "request_id", "correct": bool | null, "tier_needed": str | null,
"needed_rank": int | null}``
is appended by ``POST /admin/feedback``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["decision_log_to_training", "format_report", "log_files", "prompt_hash", "read_log", "summarise",
           "write_training_jsonl"]


def prompt_hash(prompt: str) -> str:
    """SHA-256 of the prompt's UTF-8 bytes, 16 hex digits (the classifier's data uses the same)."""
    return hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def log_files(path: str | os.PathLike) -> list[Path]:
    """``path`` and its rotated backups (``path.1`` ... ``path.N``), oldest first."""
    p = Path(path)
    backups = []
    i = 1
    while True:
        b = p.with_name(f"{p.name}.{i}")
        if not b.exists():
            break
        backups.append(b)
        i += 1
    files = list(reversed(backups))
    if p.exists():
        files.append(p)
    return files


def read_log(paths: str | os.PathLike | Sequence[str | os.PathLike], *, rotated: bool = True) -> Iterator[dict]:
    """Every JSON object in the given log files (with their rotated backups, oldest first);
    a line that does not parse (a torn last line) is skipped."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    for path in paths:
        files = log_files(path) if rotated else [Path(path)]
        if not files:
            raise FileNotFoundError(f"{path}: no such decision log")
        for f in files:
            with open(f, encoding="utf-8") as fh:
                for line in fh:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(row, dict):
                        yield row


# -- labels -------------------------------------------------------------------------------------------


def _evidence(row: Mapping[str, Any], feedback: Sequence[Mapping[str, Any]], rank: Mapping[str, int],
              assume_final_correct: bool) -> list[tuple[int, bool]] | None:
    """(tier rank, answered correctly) facts about one request; None if a tier is unknown."""
    ev: list[tuple[int, bool]] = []
    served = rank.get(row.get("tier"))  # type: ignore[arg-type]
    if served is None:
        return None
    c = row.get("cascade")
    checked_final = False
    if isinstance(c, dict):
        tried = c.get("tiers") or []
        reasons = c.get("reasons") or []
        for t, why in zip(tried, reasons):
            if t not in rank:
                return None
            ev.append((rank[t], False))  # the check failed there: counted as a wrong answer
        checked_final = c.get("outcome") == "accepted"
    if checked_final:
        ev.append((served, True))
    labelled = False
    for fb in feedback:
        if isinstance(fb.get("correct"), bool):
            ev.append((served, fb["correct"]))
            labelled = True
        tn = fb.get("tier_needed")
        if isinstance(tn, str) and tn in rank:
            ev.append((rank[tn], True))
            if rank[tn] > 0:
                ev.append((rank[tn] - 1, False))
            labelled = True
    if not labelled and not checked_final and assume_final_correct and isinstance(c, dict):
        ev.append((served, True))  # the cascade returned the last tier's answer as good
    return ev


def _labels(ev: list[tuple[int, bool]], n: int) -> list[bool] | None:
    """Per-tier correctness implied by ``ev`` under monotonicity (a stronger tier answers what a
    weaker one does); None when the facts contradict or leave a tier undetermined."""
    lowest_true = min((k for k, ok in ev if ok), default=None)
    highest_false = max((k for k, ok in ev if not ok), default=None)
    if lowest_true is not None and highest_false is not None and highest_false >= lowest_true:
        return None
    if lowest_true is None:
        if highest_false == n - 1:
            return [False] * n
        return None
    floor = -1 if highest_false is None else highest_false
    if lowest_true != floor + 1:
        return None  # the tiers between the last failure and the first success are unknown
    return [k >= lowest_true for k in range(n)]


def decision_log_to_training(paths: str | os.PathLike | Sequence[str | os.PathLike], tiers: Sequence[str], *,
                             assume_final_correct: bool = True) -> list[dict[str, Any]]:
    """Training rows ``{"prompt", "correct": {tier: bool}, "source"}`` from decision logs.

    Labels come from cascade outcomes (a rejected answer counts as wrong, an answer that passed
    the check as right) and from feedback lines (``correct`` for the tier that answered,
    ``tier_needed``), extended to every tier by monotonicity. ``assume_final_correct``: an
    answer the cascade returned from its last tier without a check counts as right unless
    feedback says otherwise. Requests whose labels are not fully determined, and lines without
    a ``prompt`` (log with ``decision_log.prompts: true``), are skipped. ``tiers`` are the tier
    names cheapest first, as ``prefixlb train-router --tiers`` takes them.
    """
    rank = {t: i for i, t in enumerate(tiers)}
    requests: list[dict] = []
    feedback: dict[str, list[dict]] = defaultdict(list)
    for row in read_log(paths):
        kind = row.get("type")
        if kind == "request" and isinstance(row.get("prompt"), str) and row.get("status") == 200:
            requests.append(row)
        elif kind == "feedback" and isinstance(row.get("request_id"), str):
            feedback[row["request_id"]].append(row)
    out = []
    for row in requests:
        ev = _evidence(row, feedback.get(row.get("request_id") or "", ()), rank, assume_final_correct)
        if not ev:
            continue
        labels = _labels(ev, len(tiers))
        if labels is None:
            continue
        out.append({"prompt": row["prompt"], "correct": dict(zip(tiers, labels)), "source": "decision_log"})
    return out


def write_training_jsonl(paths: str | os.PathLike | Sequence[str | os.PathLike], tiers: Sequence[str],
                         out: str | os.PathLike, **kw: Any) -> int:
    """Write :func:`decision_log_to_training` rows to ``out`` (JSONL); returns the row count."""
    rows = decision_log_to_training(paths, tiers, **kw)
    with open(out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return len(rows)


# -- the report -----------------------------------------------------------------------------------------


def _price_cost(attempts: Iterable[Mapping[str, Any]], prices: Mapping[str, tuple[float, float]]) -> float | None:
    total = 0.0
    for a in attempts:
        pr = prices.get(a.get("tier"))  # type: ignore[arg-type]
        p, c = a.get("prompt_tokens"), a.get("completion_tokens")
        if pr is None or not isinstance(p, int) or not isinstance(c, int):
            return None
        total += (p * pr[0] + c * pr[1]) / 1e6
    return total


def summarise(rows: Iterable[Mapping[str, Any]], prices: Mapping[str, tuple[float, float]] | None = None,
              tiers: Sequence[str] | None = None) -> dict[str, Any]:
    """Cost per 1K requests against all-on-the-largest-tier, tier mix, steps, escalations and,
    when feedback labels exist, quality. ``prices``: ``{tier: ($/Mtok in, $/Mtok out)}`` to
    recompute costs (the largest tier is the last of ``tiers``, or of ``prices``)."""
    reqs: list[Mapping[str, Any]] = []
    labels: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        if r.get("type") == "request":
            reqs.append(r)
        elif r.get("type") == "feedback" and isinstance(r.get("request_id"), str):
            labels[r["request_id"]].append(r)
    order = list(tiers or (prices.keys() if prices else []))
    if not order:  # the order the balancer logged (tier_rank), cheapest first
        ranks = {r["tier"]: r["tier_rank"] for r in reqs if isinstance(r.get("tier_rank"), int)}
        order = sorted(ranks, key=ranks.__getitem__)
    largest = order[-1] if order else None
    n = len(reqs)
    cost = all_large = 0.0
    mix: Counter = Counter()
    steps: Counter = Counter()
    outcomes: Counter = Counter()
    reasons: Counter = Counter()
    escalated = errors = 0
    for r in reqs:
        mix[r.get("tier")] += 1
        steps[r.get("step")] += 1
        if r.get("status") != 200:
            errors += 1
        esc = r.get("escalations") or 0
        escalated += esc > 0
        c = r.get("cascade")
        if isinstance(c, dict):
            outcomes[c.get("outcome")] += 1
            reasons.update(x for x in (c.get("reasons") or []) if x)
        attempts = r.get("attempts") or []
        if prices:
            rc = _price_cost(attempts, prices)
            cost += rc if rc is not None else float(r.get("cost") or 0.0)
            lp = prices.get(largest) if largest else None  # type: ignore[arg-type]
            p, o = r.get("prompt_tokens_answer"), r.get("completion_tokens_answer")
            if lp is not None and isinstance(p, int) and isinstance(o, int):
                all_large += (p * lp[0] + o * lp[1]) / 1e6
            else:
                all_large += float(r.get("cost_if_largest") or 0.0)
        else:
            cost += float(r.get("cost") or 0.0)
            all_large += float(r.get("cost_if_largest") or 0.0)
    rank = {t: i for i, t in enumerate(order)}
    judged = right = 0
    for r in reqs:
        for fb in labels.get(r.get("request_id") or "", ()):
            if isinstance(fb.get("correct"), bool):
                judged += 1
                right += fb["correct"]
            elif isinstance(fb.get("tier_needed"), str) and fb["tier_needed"] in rank and r.get("tier") in rank:
                judged += 1
                right += rank[r["tier"]] >= rank[fb["tier_needed"]]
            elif isinstance(fb.get("needed_rank"), int) and isinstance(r.get("tier_rank"), int):
                judged += 1
                right += r["tier_rank"] >= fb["needed_rank"]
    tier_names = order + sorted(t for t in mix if t not in rank and t is not None)
    return {
        "requests": n,
        "tiers": order,
        "errors": errors,
        "cost_total": cost,
        "cost_per_1k": 1000 * cost / n if n else 0.0,
        "all_largest_per_1k": 1000 * all_large / n if n else 0.0,
        "largest_tier": largest,
        "cost_cut": 1 - cost / all_large if all_large > 0 else None,
        "tier_mix": {t: mix[t] / n for t in tier_names if mix[t]} if n else {},
        "steps": {s: steps[s] / n for s in steps} if n else {},
        "escalated_share": escalated / n if n else 0.0,
        "cascade_outcomes": dict(outcomes),
        "escalation_reasons": dict(reasons),
        "labelled": judged,
        "quality": right / judged if judged else None,
    }


def format_report(s: Mapping[str, Any]) -> str:
    """The summary as a short Markdown report."""
    lines = [f"requests: {s['requests']} ({s['errors']} not 200)",
             f"cost per 1K requests: ${s['cost_per_1k']:.4f}"]
    if s["cost_cut"] is not None:
        lines.append(f"all on the largest tier{' (' + s['largest_tier'] + ')' if s['largest_tier'] else ''}: "
                     f"${s['all_largest_per_1k']:.4f} per 1K -> cost cut {100 * s['cost_cut']:.1f}%")
    lines.append("")
    lines += ["| tier | share |", "|---|---|"]
    lines += [f"| {t} | {100 * v:.1f}% |" for t, v in s["tier_mix"].items()]
    lines.append("")
    lines.append("decided by: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in sorted(s["steps"].items(),
                                                                                      key=lambda kv: -kv[1])))
    if s["cascade_outcomes"]:
        lines.append(f"escalated: {100 * s['escalated_share']:.1f}% of requests; outcomes: "
                     + ", ".join(f"{k} {v}" for k, v in s["cascade_outcomes"].items())
                     + "; reasons: " + (", ".join(f"{k} {v}" for k, v in s["escalation_reasons"].items()) or "-"))
    if s["quality"] is not None:
        lines.append(f"quality (feedback labels): {100 * s['quality']:.1f}% correct of {s['labelled']} labelled")
    return "\n".join(lines) + "\n"
