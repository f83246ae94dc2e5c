"""Tier routing in the balancer: the decision pipeline, the cascade, per-user offsets, the
decision log, feedback and the admin calls. Present only when the config has ``tier_routing``.

How it hooks into the request path (``balancer.py``), narrowly:

- ``_completion`` asks :meth:`TierRouting.decide` for a :class:`Trace` instead of resolving
  the model itself, forwards the request with the balancer's own ``_forward`` (once) or
  through ``cascade.run_cascade`` (once per cascade tier), and hands the trace back to
  :meth:`TierRouting.finish`;
- ``_forward`` passes the trace on to ``_attempt`` and ``_account`` (an argument, None without
  tier routing: a context variable cost a set, a reset and two lookups per request): the trace
  adds its response headers and records each attempt's replica, tokens and cost;
- ``_admin`` passes ``/admin/classifier/*``, ``/admin/feedback`` and ``/admin/tiers`` here.

The decisions themselves are pure (``prefixlb.routing.tiers``, ``prefixlb.routing.cascade``);
this module is their I/O: headers, metrics, the decision log file, the admin JSON.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import itertools
import logging
import logging.handlers
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client.core import GaugeMetricFamily

from prefixlb import errors
from prefixlb.config import TierRoutingConfig
from prefixlb.routing.cascade import Checks
from prefixlb.routing.decision_log import prompt_hash
from prefixlb.routing.drift import ScoreDrift
from prefixlb.routing.tiers import (
    STEPS,
    ClassifierMode,
    TierDecision,
    TierPipeline,
    UserOffsets,
    prompt_text,
    request_view,
)

if TYPE_CHECKING:
    from .balancer import Balancer, Tier

__all__ = ["TierRouting", "Trace"]

log = logging.getLogger("prefixlb.tiers")

_RID_PREFIX = os.urandom(4).hex()
_SUMMED = ("predicted_cached_tokens", "actual_cached_tokens", "prompt_tokens", "completion_tokens")
_rid = itertools.count(1)
# the decision's response headers as written on the wire (``Request.respond(lines=...)``): the
# step's line is one of four, built once; the request id's line is built per request
_STEP_LINES = {step: b"x-prefixlb-step: " + step.encode() + b"\r\n" for step in STEPS}
_RID_NAME = b"x-prefixlb-request-id: "


class Trace:
    """One request through tier routing: the decision, every attempt paid for, the cascade."""

    __slots__ = (
        "attempts",
        "body",
        "cascade",
        "chat",
        "decide_s",
        "decision",
        "lines",
        "model",
        "prompt",
        "request_id",
        "status",
        "ts",
        "user",
    )

    def __init__(self, request_id: str, decision: TierDecision, user: str | None, model: str | None, chat: bool,
                 body: dict, prompt: str | None, lines: bytes, ts: float, decide_s: float) -> None:
        self.request_id = request_id
        self.decision = decision
        self.user = user
        self.model = model
        self.chat = chat
        self.body = body
        self.prompt = prompt
        # (tier, replica url, predicted cached tokens, usage, status) per answered attempt, added
        # by ``Balancer._account``; the decision log's dicts are built from them off the request
        # path (``attempt_rows``)
        self.attempts: list[tuple[Tier, str, int, dict | None, int]] = []
        self.cascade: dict[str, Any] | None = None  # {"tiers", "reasons", "outcome", "features"}
        self.status: int | None = None
        self.ts = ts  # time.time() at the decision (0.0 without a decision log, its only reader)
        self.decide_s = decide_s
        # the headers every answer to this request carries, as written on the wire
        # (``Request.respond(lines=...)``): x-prefixlb-request-id and x-prefixlb-step
        self.lines = lines

    def cascade_lines(self) -> bytes:
        """``lines`` and x-prefixlb-escalations, the escalations so far (a cascade's attempts)."""
        return self.lines + b"x-prefixlb-escalations: %d\r\n" % (len(self.cascade["tiers"]) - 1)  # type: ignore[index]

    def attempt_rows(self) -> list[dict[str, Any]]:
        """The attempts as the decision log writes them (tokens and cost from each usage)."""
        rows = []
        for tier, replica_url, predicted_cached, usage, status in self.attempts:
            p = c = cached = None
            cost = 0.0
            if usage:
                p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
                details = usage.get("prompt_tokens_details")
                cached = details.get("cached_tokens") if isinstance(details, dict) else None
                if isinstance(p, int) and isinstance(c, int):
                    cost = (p * tier.input_per_mtok + c * tier.output_per_mtok) / 1e6
            rows.append({"tier": tier.name, "replica": replica_url, "status": status,
                         "predicted_cached_tokens": predicted_cached,
                         "actual_cached_tokens": cached if isinstance(cached, int) else None,
                         "prompt_tokens": p if isinstance(p, int) else None,
                         "completion_tokens": c if isinstance(c, int) else None, "cost": cost})
        return rows


class TierRouting:
    """The ``tier_routing`` section at work in one balancer (see the module docstring)."""

    def __init__(self, balancer: Balancer, cfg: TierRoutingConfig) -> None:
        self.b = balancer
        self.cfg = cfg
        self.tier_names = list(balancer.tiers)
        self.largest = balancer.tiers[self.tier_names[-1]]
        self.metrics = balancer.metrics
        self.classifier = None
        self.classifier_failures = 0
        self.drift: ScoreDrift | None = None
        mode = ClassifierMode.KILLED
        cc = cfg.classifier
        if cc is not None:
            self.classifier = _load_classifier(cc.model, cc.threshold, cc.cost_budget)
            k = len(getattr(self.classifier, "tiers", self.tier_names))
            if k != len(self.tier_names):
                from prefixlb.config import ConfigError

                raise ConfigError(f"tier_routing.classifier.model: {cc.model} routes among {k} tiers, the config has "
                                  f"{len(self.tier_names)} ({', '.join(self.tier_names)}); retrain it with --tiers")
            ref = getattr(self.classifier, "config", {}).get("score_reference")
            self.drift = ScoreDrift(ref if isinstance(ref, list) else None, warmup=cc.drift_warmup,
                                    window=cc.drift_window)
            mode = (ClassifierMode.KILLED if not cc.enabled
                    else ClassifierMode.SHADOW if cc.shadow else ClassifierMode.ENABLED)
        pu = cfg.per_user
        offsets = (UserOffsets(pu.half_life_s, pu.max_users, pu.step, pu.prior, pu.max_offset)
                   if pu is not None else None)
        self.pipeline = TierPipeline(self.tier_names, cfg.default_tier or balancer.config.default, cfg.rules,
                                     self.classifier, mode, offsets)
        self.user_header = pu.header.encode() if pu is not None and pu.header else None
        self.rule_headers = tuple({name for r in cfg.rules for name, _ in r.header})
        c = cfg.cascade
        self.routes = frozenset(c.routes)
        self.checks = Checks(min_mean_logprob=c.min_mean_logprob, min_token_logprob=c.min_token_logprob,
                             low_token_logprob=c.low_token_logprob, max_low_token_fraction=c.max_low_token_fraction,
                             min_margin=c.min_margin, json=c.json, tool_calls=c.tool_calls)
        self.tier_checks = {t: dataclasses.replace(self.checks, **dict(over)) for t, over in c.per_tier}
        self.verifier: Callable | None = _import_callable(c.verifier_python) if c.verifier_python else None
        self.http_session = None  # aiohttp, for the verifier URL (made on first use, in the loop)
        self.recent: OrderedDict[str, tuple] = OrderedDict()  # request id -> what feedback needs
        self.fb = {"served_judged": 0, "served_right": 0, "clf_judged": 0, "clf_sufficient": 0, "clf_exact": 0}
        self.dlog = DecisionLog(cfg.decision_log) if cfg.decision_log is not None else None
        self.metrics.extra.append(self._gauges)
        # (a classifier's score series exists only with a classifier)
        self._score_hist = self.metrics.classifier_score.child() if self.classifier is not None else None
        self._decide_hist = self.metrics.tier_decision_seconds.child()
        self._explicit: dict[str, TierDecision] = {}  # tier -> its explicit decision, shared (no score)
        # no rules and no per-user offsets: the decision reads the prompt alone, no RequestView
        self._prompt_only = not self.pipeline.rules and self.pipeline.user_offsets is None
        self._auto_route = "auto" in self.routes

    async def close(self) -> None:
        if self.http_session is not None:
            await self.http_session.close()
        if self.dlog is not None:
            self.dlog.close()

    # -- the request path -------------------------------------------------------------------------

    def decide(self, req, body: dict, chat: bool, model: str | None, forward: list[tuple[bytes, bytes]]) -> Trace:
        """The tier decision for one request (explicit names resolved as the balancer does).
        ``forward``: the request's headers the balancer sends upstream (x-request-id among them:
        its first value is the request's id; one is added to both lists when there is none)."""
        t0 = perf_counter()
        for k, v in forward:  # req.header(b"x-request-id"), on the few headers forwarded
            if k == b"x-request-id":
                rid = v.decode("latin-1")
                break
        else:
            rid = f"plb-{_RID_PREFIX}-{next(_rid):x}"
            h = (b"x-request-id", rid.encode())
            forward.append(h)  # sent upstream by _forward
            req.headers.append(h)  # (and by each tier of a cascade)
        user = None
        if self.user_header is not None:
            u = req.header(self.user_header)
            user = u.decode("latin-1") if u else None
        if user is None:
            u = body.get("user")
            user = u if isinstance(u, str) and u else None
        prompt = None
        if model is None:
            cascade: bool | None = False
        elif model == "auto":
            cascade = self._auto_route  # ("auto" in routes, once: hashing the body's string costs)
        else:
            cascade = True if model in self.routes else None  # None: a tier or model named
        if cascade is not None:
            if self._prompt_only:
                d, prompt = self.pipeline.decide_body(body, chat, cascade)
            else:
                headers = {}
                for name in self.rule_headers:
                    v = req.header(name)
                    if v is not None:
                        headers[name] = v.decode("latin-1")
                view = request_view(body, req.path, headers, user, chat)
                d = self.pipeline.decide(view, self.b.clock(), cascade=cascade)
                prompt = view.prompt_if_built  # else built for the decision log, off the request path
            score = d.score
            if score is not None:  # (only a classifier gives one)
                self._score_hist.observe(score)  # type: ignore[union-attr]
                if self.drift is not None:
                    self.drift.observe(score)
            if d.classifier_error is not None:
                self.metrics.classifier_errors.inc(())
                self.classifier_failures += 1
                if self.classifier_failures in (1, 10, 100) or self.classifier_failures % 1000 == 0:
                    log.warning("tier classifier failed %d times, last: %s (request %s went to the default tier)",
                                self.classifier_failures, d.classifier_error, rid)
        else:
            name = self.b._resolve(model).name
            d = self._explicit.get(name)  # type: ignore[assignment]
            if d is None:
                d = self._explicit[name] = TierDecision.explicit(name)
        dt = perf_counter() - t0
        self.metrics.tier_decisions.inc((d.tier, d.step))
        self._decide_hist.observe(dt)
        # (the id came through the HTTP parser, which refuses CR and LF in a header value)
        lines = _RID_NAME + rid.encode() + b"\r\n" + _STEP_LINES[d.step]
        return Trace(rid, d, user, model, chat, body, prompt, lines, time.time() if self.dlog is not None else 0.0,
                     dt)

    def finish(self, trace: Trace, started: float) -> None:
        """The request is answered (or failed): learn, remember it for feedback, log it."""
        at = trace.attempts
        d = trace.decision
        if at:
            last = at[-1]
            final = last[0].name
            if trace.status is None:
                trace.status = last[4]
        else:
            final = d.tier
            if trace.status is None:
                trace.status = 0
        base = d.base_tier or d.tier
        uo = self.pipeline.user_offsets
        if uo is not None and trace.user is not None and trace.cascade is not None and trace.status == 200:
            climbed = self.pipeline.rank(final) - self.pipeline.rank(base)
            # an answer accepted where an offset put it says nothing about the tiers below: learn
            # only from escalations and from answers accepted without an offset
            if trace.cascade["reasons"] or d.user_offset == 0:
                uo.observe(trace.user, climbed, self.b.clock())
        keep = self.cfg.feedback_memory
        if keep:
            recent = self.recent
            recent[trace.request_id] = (trace.user, final, base, d.tier if d.step == "classifier" else d.shadow_tier)
            if len(recent) > keep:
                recent.popitem(last=False)
        if self.dlog is not None:  # the line is built and written later, off the request path
            self.dlog.add((self._log_line, trace, final, perf_counter() - started))

    def _log_line(self, trace: Trace, final: str, duration: float) -> dict[str, Any]:
        d = trace.decision
        at = trace.attempt_rows()
        answer = at[-1] if at else {}
        prompt = trace.prompt if trace.prompt is not None else prompt_text(trace.body, trace.chat)

        sums: dict[str, int | None] = dict.fromkeys(_SUMMED)
        for a in at:
            for k in _SUMMED:
                v = a[k]
                if v is not None:
                    sums[k] = (sums[k] or 0) + v

        p, c = answer.get("prompt_tokens"), answer.get("completion_tokens")
        lg = self.largest
        line: dict[str, Any] = {
            "type": "request", "ts": round(trace.ts, 3), "request_id": trace.request_id, "user": trace.user,
            "model": trace.model, "tier": final, "tier_rank": self.pipeline.rank(final), "step": d.step,
            "rule": d.rule,
            "score": None if d.score is None else round(d.score, 5), "shadow_tier": d.shadow_tier,
            "base_tier": d.base_tier, "user_offset": d.user_offset, "replica": answer.get("replica"),
            "predicted_cached_tokens": sums["predicted_cached_tokens"],
            "actual_cached_tokens": sums["actual_cached_tokens"],
            "prompt_tokens": sums["prompt_tokens"], "completion_tokens": sums["completion_tokens"],
            "prompt_tokens_answer": p, "completion_tokens_answer": c,
            "cost": sum(a["cost"] for a in at),
            "cost_if_largest": ((p * lg.input_per_mtok + c * lg.output_per_mtok) / 1e6
                                if isinstance(p, int) and isinstance(c, int) else None),
            "escalations": len(trace.cascade["tiers"]) - 1 if trace.cascade else 0,
            "cascade": trace.cascade, "attempts": at, "status": trace.status,
            "duration_s": round(duration, 6), "decide_us": round(trace.decide_s * 1e6, 1),
            "prompt_hash": prompt_hash(prompt),
        }
        if self.cfg.decision_log is not None and self.cfg.decision_log.prompts:
            line["prompt"] = prompt
        return line

    # -- feedback ---------------------------------------------------------------------------------

    def feedback(self, request_id: str, correct: bool | None, tier_needed: str | None) -> bool:
        """Apply a label to a remembered request; False when it is not (or no longer) remembered.
        The label goes to the decision log either way."""
        if tier_needed is not None and tier_needed not in self.tier_names:
            raise errors.BadRequest(f"tier_needed: {tier_needed!r} is not a tier ({', '.join(self.tier_names)})")
        if self.dlog is not None:
            self.dlog.add({"type": "feedback", "ts": round(time.time(), 3), "request_id": request_id,
                           "correct": correct, "tier_needed": tier_needed,
                           "needed_rank": None if tier_needed is None else self.pipeline.rank(tier_needed)})
        rec = self.recent.get(request_id)
        kind = "tier_needed" if tier_needed is not None else "correct"
        self.metrics.feedback_labels.inc((kind, "yes" if rec is not None else "no"))
        if rec is None:
            return False
        user, served, base, pick = rec
        rank = self.pipeline.rank
        f = self.fb
        if tier_needed is not None:
            needed = rank(tier_needed)
            f["served_judged"] += 1
            f["served_right"] += rank(served) >= needed
            if pick is not None:
                f["clf_judged"] += 1
                f["clf_sufficient"] += rank(pick) >= needed
                f["clf_exact"] += rank(pick) == needed
            delta = needed - rank(base)
        else:
            f["served_judged"] += 1
            f["served_right"] += bool(correct)
            if pick is not None and pick == served:
                f["clf_judged"] += 1
                f["clf_sufficient"] += bool(correct)
            delta = (rank(served) - rank(base)) + (0 if correct else 1)
            if correct and served != base:
                delta = None  # right where an offset put it: nothing learned about the tiers below
        uo = self.pipeline.user_offsets
        if uo is not None and user is not None and delta is not None:
            uo.observe(user, delta, self.b.clock())
        return True

    # -- admin ------------------------------------------------------------------------------------

    def admin(self, req, parts: list[str]) -> bool:
        """Handle ``/admin/classifier/{kill,revive}``, ``/admin/feedback``, ``/admin/tiers``;
        False for any other path (the caller answers 404)."""
        if parts == ["admin", "tiers"]:
            self.b._need(req, "GET")
            req.respond_json(200, orjson.dumps(self.describe()))
            return True
        if parts[:2] == ["admin", "classifier"] and len(parts) == 3 and parts[2] in ("kill", "revive"):
            if req.method != "POST":
                raise errors.MethodNotAllowed(f"{req.path} takes POST")
            if self.classifier is None:
                raise errors.NotFound("no classifier is configured (tier_routing.classifier)")
            if parts[2] == "kill":
                self.pipeline.kill()
                log.warning("tier classifier killed through the admin API: rules and the default tier decide")
            else:
                spec = errors.json_object(req.body)
                shadow = spec.get("shadow", False)
                if not isinstance(shadow, bool):
                    raise errors.BadRequest("shadow: must be true or false")
                self.pipeline.revive(shadow=shadow)
                log.warning("tier classifier revived (%s)", self.pipeline.mode)
            req.respond_json(200, orjson.dumps({"classifier": self.pipeline.mode}))
            return True
        if parts == ["admin", "feedback"]:
            if req.method != "POST":
                raise errors.MethodNotAllowed("/admin/feedback takes POST")
            spec = errors.json_object(req.body)
            rid = spec.get("request_id")
            if not isinstance(rid, str) or not rid:
                raise errors.BadRequest("request_id: required, the x-prefixlb-request-id of the answer")
            correct, needed = spec.get("correct"), spec.get("tier_needed")
            if (correct is None) == (needed is None):
                raise errors.BadRequest('give one of "correct": true|false or "tier_needed": TIER')
            if correct is not None and not isinstance(correct, bool):
                raise errors.BadRequest("correct: must be true or false")
            if needed is not None and not isinstance(needed, str):
                raise errors.BadRequest("tier_needed: must be a tier name")
            known = self.feedback(rid, correct, needed)
            req.respond_json(200 if known else 202, orjson.dumps({"applied": known, "logged": self.dlog is not None}))
            return True
        return False

    def describe(self) -> dict[str, Any]:
        cfg = self.cfg
        now = self.b.clock()
        uo = self.pipeline.user_offsets
        c = cfg.cascade
        return {
            "tiers": self.tier_names, "default_tier": self.pipeline.default_tier,
            "rules": [{"name": r.name, "tier": r.tier, "cascade": r.cascade} for r in cfg.rules],
            "classifier": None if cfg.classifier is None else {
                "model": cfg.classifier.model, "mode": self.pipeline.mode,
                "threshold": getattr(self.classifier, "threshold", None),
                "drift": self.drift.describe() if self.drift else None,
            },
            "cascade": {"routes": sorted(self.routes), "max_tiers": c.max_tiers, "deadline_s": c.deadline_s,
                        "checks": {k: v for k, v in vars(self.checks).items() if v is not None},
                        "per_tier": {t: dict(over) for t, over in c.per_tier},
                        "verifier": c.verifier_url or c.verifier_python},
            "per_user": None if uo is None else {"users": len(uo), "max_users": uo.max_users,
                                                 "top": uo.snapshot(now)},
            "feedback": dict(self.fb, accuracy_served=_ratio(self.fb["served_right"], self.fb["served_judged"]),
                             accuracy_classifier=_ratio(self.fb["clf_sufficient"], self.fb["clf_judged"])),
            "decision_log": self.dlog.path if self.dlog else None,
        }

    def _gauges(self) -> list:
        out = []
        if self.classifier is not None:
            g = GaugeMetricFamily("prefixlb_classifier_mode", "Tier classifier mode (1 for the current one)",
                                  labels=["mode"])
            for m in (ClassifierMode.ENABLED, ClassifierMode.SHADOW, ClassifierMode.KILLED):
                g.add_metric([m], 1.0 if self.pipeline.mode == m else 0.0)
            out.append(g)
        if self.drift is not None:
            psi, ks = self.drift.psi(), self.drift.ks()
            g = GaugeMetricFamily("prefixlb_classifier_drift", "Recent classifier scores against the reference "
                                  "distribution (psi: population stability index, ks: largest CDF gap)",
                                  labels=["statistic", "reference"])
            if psi is not None:
                g.add_metric(["psi", self.drift.reference_source], psi)
                g.add_metric(["ks", self.drift.reference_source], ks)  # type: ignore[arg-type]
            out.append(g)
        f = self.fb
        g = GaugeMetricFamily("prefixlb_feedback_accuracy", "Share of labelled requests answered right (served) and "
                              "of labels where the classifier's pick sufficed (classifier)", labels=["of"])
        for name, num, den in (("served", f["served_right"], f["served_judged"]),
                               ("classifier", f["clf_sufficient"], f["clf_judged"])):
            if den:
                g.add_metric([name], num / den)
        out.append(g)
        uo = self.pipeline.user_offsets
        if uo is not None:
            out.append(GaugeMetricFamily("prefixlb_user_offsets_tracked", "Users with a learned tier offset",
                                         value=len(uo)))
        return out


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def _load_classifier(directory: str, threshold: float | None, budget: float | None):
    from prefixlb.config import ConfigError

    try:
        from prefixlb.routing.classifier import TierClassifier
    except ImportError as exc:
        raise ConfigError(f"tier_routing.classifier: cannot import the classifier ({exc}); "
                          "pip install 'prefixlb[classifier]'") from exc
    try:
        return TierClassifier.load(directory, threshold=threshold, budget=budget)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"tier_routing.classifier.model: {exc}") from exc


def _import_callable(spec: str) -> Callable:
    from prefixlb.config import ConfigError

    mod, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"tier_routing.cascade.verifier_python: cannot import {spec!r} ({exc})") from exc
    if not callable(fn):
        raise ConfigError(f"tier_routing.cascade.verifier_python: {spec!r} is not callable")
    return fn


class DecisionLog:
    """The decision log: JSON lines appended to a file rotated by size (``RotatingFileHandler``'s
    rotation: ``path.1`` ... ``path.N``).

    Requests only queue an entry (a dict, or a ``(build, *args)`` tuple whose line is built
    later); the lines are built, encoded and written from the event loop shortly after
    (``DELAY_S``), ``CHUNK`` lines per loop iteration, so a request pays neither the encoding nor
    the write and one chunk holds the loop for ~0.1 ms. ``close()`` writes whatever is left.
    """

    CHUNK = 16  # measured ~6 us a line to build, encode and write here: ~0.1 ms of the loop per chunk
    DELAY_S = 0.05

    def __init__(self, cfg) -> None:
        # "{pid}" in the path: one file per process (prefixlb serve --workers N; rotation is per file)
        self.path = cfg.path.replace("{pid}", str(os.getpid()))
        self.max_bytes = cfg.max_bytes
        self.handler = logging.handlers.RotatingFileHandler(self.path, maxBytes=cfg.max_bytes,
                                                            backupCount=cfg.backups, encoding="utf-8")
        self.size = os.path.getsize(self.path) if os.path.exists(self.path) else 0
        self.pending: list = []
        self._timer = None
        self.written = 0
        self.errors = 0

    def add(self, entry) -> None:
        self.pending.append(entry)
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # outside the loop (shutdown, tests): write now
                self.flush(all_=True)
                return
            self._timer = loop.call_later(self.DELAY_S, self._flush_soon)

    def _flush_soon(self) -> None:
        self._timer = None
        self.flush()
        if self.pending:
            self._timer = asyncio.get_running_loop().call_soon(self._flush_soon)  # type: ignore[assignment]

    def flush(self, all_: bool = False) -> None:
        h = self.handler
        while self.pending:
            chunk, self.pending = self.pending[: self.CHUNK], self.pending[self.CHUNK :]
            lines = []
            for e in chunk:
                try:
                    row = e if isinstance(e, dict) else e[0](*e[1:])
                    lines.append(orjson.dumps(row))
                except Exception as exc:  # noqa: BLE001 - one bad line must not lose the others
                    self.errors += 1
                    log.error("decision log: cannot encode a line (%s)", exc)
            if lines:
                text = (b"\n".join(lines) + b"\n").decode()
                try:
                    if self.size and self.size + len(text) > self.max_bytes:
                        h.doRollover()  # the handler's own rotation (rename path -> path.1 ...)
                        self.size = 0
                    if h.stream is None:
                        h.stream = h._open()
                    h.stream.write(text)
                    h.stream.flush()
                except OSError as exc:  # a full disk must not fail requests
                    self.errors += len(lines)
                    log.error("decision log: cannot write %s (%s)", self.path, exc)
                else:
                    self.size += len(text)
                    self.written += len(lines)
            if not all_:
                return

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush(all_=True)
        self.handler.close()
