"""Confidence checks of a cascade: is a cheap tier's buffered answer good enough to return?

Pure functions over a parsed (non-streaming) OpenAI response; the I/O of the cascade lives in
``prefixlb.server.cascade``. Checks, in order, each naming the reason it fails:

* ``json`` - the answer must parse as JSON (configured, or the request's ``response_format``
  asks for ``json_object``/``json_schema``);
* ``tool_call`` - with tools in the request: every tool call names a given tool and carries JSON
  object arguments; ``tool_choice: required`` (or a named function) needs at least one call;
* token logprob features (over every generated token of every choice, not just the mean):
  ``low_mean_logprob`` (mean below ``min_mean_logprob``), ``low_min_logprob`` (some token below
  ``min_token_logprob``), ``low_token_fraction`` (more than ``max_low_token_fraction`` of the
  tokens below ``low_token_logprob``), ``low_margin`` (mean top-1 minus top-2 logprob below
  ``min_margin``). An answer without logprobs passes these (nothing to judge on).

The verifier (an HTTP endpoint or a callable) runs after these, in the server.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

__all__ = ["Answer", "Checks", "LogprobFeatures", "check_answer", "logprob_features", "parse_answer",
           "wants_json"]


@dataclass(frozen=True)
class Checks:
    """Thresholds of the confidence check (None: that check is off)."""

    min_mean_logprob: float | None = None
    min_token_logprob: float | None = None
    low_token_logprob: float = -2.3
    max_low_token_fraction: float | None = None
    min_margin: float | None = None
    json: bool = False
    tool_calls: bool = True

    @property
    def uses_logprobs(self) -> bool:
        return (self.min_mean_logprob is not None or self.min_token_logprob is not None
                or self.max_low_token_fraction is not None or self.min_margin is not None)


@dataclass(frozen=True, slots=True)
class LogprobFeatures:
    tokens: int
    mean: float
    min: float
    low_fraction: float
    margin: float | None  # mean top-1 minus top-2 logprob; None without top-2 alternatives

    def as_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "mean": round(self.mean, 4), "min": round(self.min, 4),
                "low_fraction": round(self.low_fraction, 4),
                "margin": None if self.margin is None else round(self.margin, 4)}


@dataclass
class Answer:
    """What the checks read from a response: per choice text and tool calls; all token logprobs."""

    texts: list[str] = field(default_factory=list)
    tool_calls: list[list[Any]] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    margins: list[float] = field(default_factory=list)
    has_logprobs: bool = False


def logprob_features(logprobs: Sequence[float], margins: Sequence[float] = (),
                     low: float = -2.3) -> LogprobFeatures | None:
    """Mean, minimum, share of tokens below ``low`` and mean margin; None for no tokens."""
    n = len(logprobs)
    if n == 0:
        return None
    total = 0.0
    lo = math.inf
    below = 0
    for x in logprobs:
        total += x
        lo = min(lo, x)
        if x < low:
            below += 1
    margin = sum(margins) / len(margins) if margins else None
    return LogprobFeatures(n, total / n, lo, below / n, margin)


def _margin(values: list[float]) -> float | None:
    if len(values) < 2:
        return None
    values.sort(reverse=True)
    return values[0] - values[1]


def parse_answer(resp: Mapping[str, Any], chat: bool) -> Answer:
    """The texts, tool calls and token logprobs of a chat or completion response (vLLM's shapes)."""
    a = Answer()
    choices = resp.get("choices")
    if not isinstance(choices, list):
        return a
    for ch in choices:
        if not isinstance(ch, dict):
            continue
        lp = ch.get("logprobs")
        if chat:
            msg = ch.get("message") if isinstance(ch.get("message"), dict) else {}
            content = msg.get("content")
            a.texts.append(content if isinstance(content, str) else "")
            tc = msg.get("tool_calls")
            a.tool_calls.append(tc if isinstance(tc, list) else [])
            content_lps = lp.get("content") if isinstance(lp, dict) else None
            if isinstance(content_lps, list):
                a.has_logprobs = True
                for t in content_lps:
                    if not isinstance(t, dict) or not isinstance(t.get("logprob"), (int, float)):
                        continue
                    a.logprobs.append(float(t["logprob"]))
                    top = t.get("top_logprobs")
                    if isinstance(top, list):
                        m = _margin([float(x["logprob"]) for x in top
                                     if isinstance(x, dict) and isinstance(x.get("logprob"), (int, float))])
                        if m is not None:
                            a.margins.append(m)
        else:
            text = ch.get("text")
            a.texts.append(text if isinstance(text, str) else "")
            a.tool_calls.append([])
            if isinstance(lp, dict) and isinstance(lp.get("token_logprobs"), list):
                a.has_logprobs = True
                a.logprobs.extend(float(x) for x in lp["token_logprobs"] if isinstance(x, (int, float)))
                tops = lp.get("top_logprobs")
                if isinstance(tops, list):
                    for top in tops:
                        if isinstance(top, dict):
                            m = _margin([float(v) for v in top.values() if isinstance(v, (int, float))])
                            if m is not None:
                                a.margins.append(m)
    return a


def wants_json(body: Mapping[str, Any]) -> bool:
    """The request asks for a JSON answer (``response_format`` json_object / json_schema)."""
    rf = body.get("response_format")
    return isinstance(rf, dict) and rf.get("type") in ("json_object", "json_schema")


def _json_ok(text: str) -> bool:
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return True


def _tool_calls_ok(body: Mapping[str, Any], calls_per_choice: list[list[Any]]) -> bool:
    tools = body.get("tools")
    names = {t["function"].get("name") for t in tools
             if isinstance(t, dict) and isinstance(t.get("function"), dict)} if isinstance(tools, list) else set()
    choice = body.get("tool_choice")
    required = choice == "required" or isinstance(choice, dict)
    for calls in calls_per_choice:
        if required and not calls:
            return False
        for c in calls:
            fn = c.get("function") if isinstance(c, dict) else None
            if not isinstance(fn, dict) or fn.get("name") not in names:
                return False
            args = fn.get("arguments")
            if not isinstance(args, str):
                return False
            try:
                parsed = orjson.loads(args)
            except orjson.JSONDecodeError:
                return False
            if not isinstance(parsed, dict):
                return False
    return True


def check_answer(answer: Answer, body: Mapping[str, Any], checks: Checks) -> tuple[str | None, LogprobFeatures | None]:
    """(the reason the answer fails, or None; its logprob features, if it had logprobs)."""
    feats = logprob_features(answer.logprobs, answer.margins, checks.low_token_logprob) if answer.has_logprobs else None
    if checks.json or wants_json(body):
        for t, calls in zip(answer.texts, answer.tool_calls):
            if not calls and not _json_ok(t):
                return "json", feats
    if checks.tool_calls and body.get("tools") and not _tool_calls_ok(body, answer.tool_calls):
        return "tool_call", feats
    if feats is not None:
        if checks.min_mean_logprob is not None and feats.mean < checks.min_mean_logprob:
            return "low_mean_logprob", feats
        if checks.min_token_logprob is not None and feats.min < checks.min_token_logprob:
            return "low_min_logprob", feats
        if checks.max_low_token_fraction is not None and feats.low_fraction > checks.max_low_token_fraction:
            return "low_token_fraction", feats
        if checks.min_margin is not None and feats.margin is not None and feats.margin < checks.min_margin:
            return "low_margin", feats
    return None, feats
