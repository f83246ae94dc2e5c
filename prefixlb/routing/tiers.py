"""Tier decision: which model tier answers a ``model: auto`` request. Pure and synchronous.

The pipeline runs its steps in order; each step decides or passes:

1. **explicit** - the request named a tier or a served model (decided by the server, which knows
   the served names; :meth:`TierDecision.explicit` records it);
2. **rules** - the first configured rule whose conditions all hold (regex and keyword lists on
   the last user message, headers, path, ``user``, tools present, ``max_tokens``, prompt size);
3. **classifier** - a trained scorer (:class:`TierScorer`) picks the tier; in *shadow* mode it
   only records what it would have picked, and a *killed* classifier is not consulted at all;
4. **default** - the configured default tier.

A per-user offset (:class:`UserOffsets`, learned from that user's escalations) then moves the
tier up or down, except for explicit requests. Every decision records the step that made it.

Rules are compiled once (regexes, lower-cased keywords); a request builds one
:class:`RequestView` with just the features the rules and the classifier need. Nothing here does
I/O or reads a clock: ``now`` is passed in.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "ClassifierMode",
    "RequestView",
    "Rule",
    "TierDecision",
    "TierPipeline",
    "TierScorer",
    "UserOffsets",
    "last_user_text",
    "prompt_text",
    "request_view",
]

EXPLICIT, RULES, CLASSIFIER, DEFAULT = "explicit", "rules", "classifier", "default"
STEPS = (EXPLICIT, RULES, CLASSIFIER, DEFAULT)


# -- what a request looks like to the pipeline -------------------------------------------------------


def _text(content: Any) -> str:
    """The text of a chat message's ``content`` (a string, or a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content
                         if isinstance(p, dict) and p.get("type", "text") == "text" and isinstance(p.get("text"), str))
    return ""


def prompt_text(body: Mapping[str, Any], chat: bool) -> str:
    """The whole prompt as one string: the messages' texts joined by newlines (chat), or the
    prompt string (completions; a list of strings is joined; token ids give "").

    The classifier is trained and queried on this string (``decision_log`` rows hold it too);
    it is the text the emulator's quality model reads as well.
    """
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list):
            return ""
        return "\n".join([_text(m.get("content")) for m in msgs if isinstance(m, dict)])
    p = body.get("prompt")
    if isinstance(p, str):
        return p
    if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        return "\n".join(p)
    return ""


def last_user_text(body: Mapping[str, Any], chat: bool) -> str:
    """The last user message's text (chat), or the prompt string (completions)."""
    if not chat:
        return prompt_text(body, False)
    msgs = body.get("messages")
    if isinstance(msgs, list):
        for m in reversed(msgs):
            if isinstance(m, dict) and m.get("role") == "user":
                return _text(m.get("content"))
    return ""


class RequestView:
    """The features of one request the rules and the classifier look at, built from its parsed
    body (``headers`` with lower-cased names). The last user message and the whole prompt
    (:func:`prompt_text`) are built on first use: a classifier alone never reads the former,
    rules on the last message never pay for the latter."""

    __slots__ = ("_body", "_chat", "_last", "_low", "_prompt", "headers", "path", "user")

    def __init__(self, body: Mapping[str, Any], path: str, headers: Mapping[str, str], user: str | None,
                 chat: bool = True) -> None:
        self.path = path
        self.headers = headers
        self.user = user
        self._body = body
        self._chat = chat
        self._last: str | None = None
        self._low: str | None = None
        self._prompt: str | None = None

    @property
    def max_tokens(self) -> int | None:
        mt = self._body.get("max_tokens", self._body.get("max_completion_tokens"))
        return mt if mt.__class__ is int else None  # (not a bool)

    @property
    def tools(self) -> bool:
        return bool(self._body.get("tools"))

    @property
    def last_user(self) -> str:
        if self._last is None:
            self._last = last_user_text(self._body, self._chat)
        return self._last

    @property
    def last_user_lower(self) -> str:
        """``last_user`` lower-cased (built once, for every keyword rule)."""
        if self._low is None:
            self._low = self.last_user.lower()
        return self._low

    @property
    def prompt(self) -> str:
        if self._prompt is None:
            self._prompt = prompt_text(self._body, self._chat)
        return self._prompt

    @property
    def prompt_if_built(self) -> str | None:
        return self._prompt


#: ``request_view(body, path, headers, user, chat=True)``
request_view = RequestView


# -- rules -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One rule: when every given condition holds, send the request to ``tier``.

    Conditions (all optional, ANDed): ``last_user_regex`` (``re.search`` on the last user
    message), ``keywords_any`` (case-insensitive substrings of the last user message),
    ``header`` (``{name: value}``, value ``"*"`` = present), ``path`` (one of), ``user_in``,
    ``tools`` (tools present or not), ``max_tokens_gt``/``_lt`` (a request without
    ``max_tokens`` matches neither), ``prompt_chars_gt``/``_lt`` (the whole prompt's length).
    ``cascade``: the request goes through the confidence cascade starting at ``tier``.
    """

    name: str
    tier: str
    last_user_regex: str | None = None
    keywords_any: tuple[str, ...] = ()
    header: tuple[tuple[str, str], ...] = ()
    path: tuple[str, ...] = ()
    user_in: frozenset[str] = frozenset()
    tools: bool | None = None
    max_tokens_gt: int | None = None
    max_tokens_lt: int | None = None
    prompt_chars_gt: int | None = None
    prompt_chars_lt: int | None = None
    cascade: bool = False
    _regex: re.Pattern | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.last_user_regex is not None:
            object.__setattr__(self, "_regex", re.compile(self.last_user_regex))
        object.__setattr__(self, "keywords_any", tuple(k.lower() for k in self.keywords_any))
        object.__setattr__(self, "header", tuple((k.lower(), v) for k, v in self.header))

    def matches(self, v: RequestView) -> bool:
        """True when every condition holds (cheap checks first, the regex last)."""
        if self.path and v.path not in self.path:
            return False
        if self.user_in and v.user not in self.user_in:
            return False
        if self.tools is not None and v.tools != self.tools:
            return False
        if self.max_tokens_gt is not None and (v.max_tokens is None or v.max_tokens <= self.max_tokens_gt):
            return False
        if self.max_tokens_lt is not None and (v.max_tokens is None or v.max_tokens >= self.max_tokens_lt):
            return False
        if self.prompt_chars_gt is not None and len(v.prompt) <= self.prompt_chars_gt:
            return False
        if self.prompt_chars_lt is not None and len(v.prompt) >= self.prompt_chars_lt:
            return False
        for name, want in self.header:
            got = v.headers.get(name)
            if got is None or (want != "*" and got != want):
                return False
        if self.keywords_any:
            low = v.last_user_lower
            for k in self.keywords_any:
                if k in low:
                    break
            else:
                return False
        if self._regex is not None and self._regex.search(v.last_user) is None:
            return False
        return True


# -- the classifier seam -----------------------------------------------------------------------------


class TierScorer(Protocol):
    """What the pipeline needs from a trained tier classifier (``prefixlb.routing.classifier``)."""

    def choose(self, prompt: str, tiers: Sequence[str]) -> tuple[str, float]:
        """The tier for ``prompt`` (one of ``tiers``, cheapest first) and the score behind it
        (probability that a tier stronger than the cheapest is needed)."""
        ...


class ClassifierMode:
    """``enabled``: the classifier decides; ``shadow``: it predicts and the prediction is only
    recorded; ``killed``: not consulted (admin kill switch or ``enabled: false``)."""

    ENABLED, SHADOW, KILLED = "enabled", "shadow", "killed"


# (a module global is one lookup; ClassifierMode.X is a class attribute read, unspecialised in
# CPython 3.11, on every decision)
_ENABLED, _KILLED = ClassifierMode.ENABLED, ClassifierMode.KILLED


# -- decisions --------------------------------------------------------------------------------------


@dataclass(slots=True)
class TierDecision:
    """Which tier, which step decided, and what the classifier said (if it was asked).

    Read-only by convention: the decisions that carry no score are built once and shared by
    every request they decide. (Not ``frozen``: a frozen dataclass costs ~1 us to construct,
    four times this, and the classifier builds one per request.)
    """

    tier: str
    step: str  # explicit | rules | classifier | default
    score: float | None = None  # classifier score (also in shadow mode)
    shadow_tier: str | None = None  # the classifier's pick in shadow mode
    rule: str | None = None  # the rule that matched (step "rules")
    cascade: bool = False  # start a confidence cascade at ``tier``
    base_tier: str | None = None  # the tier before the per-user offset (None: no offset applied)
    user_offset: int = 0
    classifier_error: str | None = None  # the classifier raised; the pipeline went on without it

    @staticmethod
    def explicit(tier: str) -> TierDecision:
        return TierDecision(tier, EXPLICIT)


class TierPipeline:
    """rules -> classifier -> default, then the per-user offset. See the module docstring.

    ``tiers`` are the tier names cheapest first. ``classifier`` may be None. ``cascade_all``
    makes every decision start a cascade (the request came through a cascade route).
    """

    def __init__(self, tiers: Sequence[str], default_tier: str, rules: Sequence[Rule] = (),
                 classifier: TierScorer | None = None, classifier_mode: str = ClassifierMode.ENABLED,
                 user_offsets: UserOffsets | None = None) -> None:
        self.tiers = tuple(tiers)
        if default_tier not in self.tiers:
            raise ValueError(f"default tier {default_tier!r} is not one of {self.tiers}")
        for r in rules:
            if r.tier not in self.tiers:
                raise ValueError(f"rule {r.name!r}: tier {r.tier!r} is not one of {self.tiers}")
        self.default_tier = default_tier
        self.rules = tuple(rules)
        self.classifier = classifier
        self.mode = classifier_mode if classifier is not None else ClassifierMode.KILLED
        self.user_offsets = user_offsets
        self._rank = {t: i for i, t in enumerate(self.tiers)}
        # the decisions that carry no score are the same every time: built once, indexed by the
        # cascade flag
        self._rule_decisions = [(TierDecision(r.tier, RULES, rule=r.name, cascade=r.cascade),
                                 TierDecision(r.tier, RULES, rule=r.name, cascade=True)) for r in self.rules]
        self._default_decisions = (TierDecision(default_tier, DEFAULT), TierDecision(default_tier, DEFAULT,
                                                                                     cascade=True))

    # the kill switch: immediate, no request in flight is affected
    def kill(self) -> None:
        self.mode = ClassifierMode.KILLED

    def revive(self, shadow: bool = False) -> None:
        if self.classifier is None:
            raise ValueError("no classifier is loaded")
        self.mode = ClassifierMode.SHADOW if shadow else ClassifierMode.ENABLED

    def rank(self, tier: str) -> int:
        return self._rank[tier]

    def decide(self, view: RequestView, now: float = 0.0, *, cascade: bool = False) -> TierDecision:
        """The tier for a request that asked for ``auto`` (or a cascade route)."""
        for i, r in enumerate(self.rules):
            if r.matches(view):
                return self._offset(self._rule_decisions[i][cascade], view, now)
        if self.mode == _KILLED:
            return self._offset(self._default_decisions[cascade], view, now)
        return self._offset(self._classify(view.prompt, cascade), view, now)

    def decide_body(self, body: Mapping[str, Any], chat: bool, cascade: bool = False) -> tuple[TierDecision, str | None]:
        """``decide`` for a pipeline with no rules and no per-user offsets, which reads nothing
        but the prompt: no :class:`RequestView` to build. Also returns the prompt, if built."""
        if self.mode == _KILLED:
            return self._default_decisions[cascade], None
        prompt = prompt_text(body, chat)
        return self._classify(prompt, cascade), prompt

    def _classify(self, prompt: str, cascade: bool) -> TierDecision:
        """The classifier's step (enabled or shadow), the default tier when it does not decide."""
        score = shadow = err = None
        try:
            tier, score = self.classifier.choose(prompt, self.tiers)  # type: ignore[union-attr]
        except Exception as exc:  # noqa: BLE001 - a broken model must not take requests down
            err = f"{type(exc).__name__}: {exc}"
        else:
            if tier not in self._rank:
                err = f"classifier chose unknown tier {tier!r}"
            elif self.mode == _ENABLED:
                return TierDecision(tier, CLASSIFIER, score, None, None, cascade)
            else:
                shadow = tier
        return TierDecision(self.default_tier, DEFAULT, score=score, shadow_tier=shadow, cascade=cascade,
                            classifier_error=err)

    def _offset(self, d: TierDecision, view: RequestView, now: float) -> TierDecision:
        uo = self.user_offsets
        if uo is None or view.user is None:
            return d
        k = uo.offset(view.user, now)
        if k == 0:
            return d
        i = min(max(self._rank[d.tier] + k, 0), len(self.tiers) - 1)
        if self.tiers[i] == d.tier:
            return d
        return TierDecision(self.tiers[i], d.step, d.score, d.shadow_tier, d.rule, d.cascade, d.tier, k,
                            d.classifier_error)


# -- per-user offsets ---------------------------------------------------------------------------------


class UserOffsets:
    """A tier offset per user, learned from how far that user's requests had to climb.

    Each observation is ``delta`` = (the tier that answered acceptably) - (the tier the pipeline
    chose before any offset), in tier steps: a cascade that escalated twice gives +2, feedback
    naming the tier needed gives that tier's distance. The user's value is an exponentially
    decayed mean with ``prior`` pseudo-observations of 0::

        value = sum(w_i * delta_i) / (prior + sum(w_i)),   w_i = 0.5 ** (age_i / half_life_s)

    so it needs evidence to move and returns to 0 when the user stops escalating. The offset is
    ``sign(value) * floor(|value| + 1 - step)`` capped at ``max_offset``: with ``step`` 0.5 it is
    the value rounded; a larger ``step`` asks for more escalation before moving a user.
    At most ``max_users`` users are kept (least recently seen dropped first).
    """

    __slots__ = ("_users", "half_life_s", "max_offset", "max_users", "prior", "step")

    def __init__(self, half_life_s: float = 3600.0, max_users: int = 10_000, step: float = 0.5,
                 prior: float = 2.0, max_offset: int = 2) -> None:
        if half_life_s <= 0 or max_users < 1 or not 0 < step <= 1 or prior < 0 or max_offset < 0:
            raise ValueError("half_life_s > 0, max_users >= 1, 0 < step <= 1, prior >= 0, max_offset >= 0")
        self.half_life_s = half_life_s
        self.max_users = max_users
        self.step = step
        self.prior = prior
        self.max_offset = max_offset
        # user -> [decayed sum of deltas, decayed sum of weights, time of last update]
        self._users: OrderedDict[str, list[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._users)

    def _decayed(self, u: list[float], now: float) -> tuple[float, float]:
        f = 0.5 ** (max(0.0, now - u[2]) / self.half_life_s)
        return u[0] * f, u[1] * f

    def value(self, user: str, now: float) -> float:
        """The user's decayed mean escalation (0 for an unknown user)."""
        u = self._users.get(user)
        if u is None:
            return 0.0
        s, w = self._decayed(u, now)
        return s / (self.prior + w) if self.prior + w > 0 else 0.0

    def offset(self, user: str, now: float) -> int:
        """The whole-tier offset to apply to this user's requests."""
        u = self._users.get(user)
        if u is None:
            return 0
        v = self.value(user, now)
        k = math.floor(abs(v) + 1.0 - self.step)
        if k <= 0:
            return 0
        return int(math.copysign(min(k, self.max_offset), v))

    def observe(self, user: str, delta: float, now: float) -> None:
        """Record that one of ``user``'s requests needed ``delta`` tiers above the pipeline's pick."""
        users = self._users
        u = users.get(user)
        if u is None:
            u = users[user] = [0.0, 0.0, now]
            if len(users) > self.max_users:
                users.popitem(last=False)
        else:
            users.move_to_end(user)
        s, w = self._decayed(u, now)
        u[0], u[1], u[2] = s + delta, w + 1.0, now

    def snapshot(self, now: float, limit: int = 20) -> list[dict[str, Any]]:
        """The users with the largest offsets (for ``GET /admin/tiers``)."""
        rows = [(u, self.value(u, now)) for u in self._users]
        rows.sort(key=lambda r: -abs(r[1]))
        return [{"user": u, "value": round(v, 3), "offset": self.offset(u, now)} for u, v in rows[:limit]]
