"""A simple, documented model of answer quality, for tier routing and cascades.

The model
---------
* Every prompt has a hidden **difficulty** ``d`` in [0, 1], a deterministic function of its
  text: ``d = 0.7 u + 0.2 f_len + 0.1 f_digits`` where ``u`` is uniform from a hash of the text,
  ``f_len = log(1 + chars) / log(1 + 20000)`` (capped at 1) and ``f_digits`` is 4x the share of
  digits (capped at 1). Longer, number-heavy prompts look harder, but the hash dominates, so
  difficulty is only partly predictable from surface features, as in real data.
* Every profile has a **skill** ``s`` in [0, 1].
* The answer's latent margin is ``z = k (s - d) + e1`` with ``e1`` standard logistic noise and
  ``k = 8``; the answer **is correct** iff ``z > 0``, so ``P(correct) = sigmoid(k (s - d))``.
  With ``d`` uniform, the mean of that is about ``s`` (so skill reads like a benchmark accuracy).
* The model's **confidence** is ``c = sigmoid(0.6 z + e2)``, ``e2 ~ N(0, 1)``: it tracks the
  realised margin, so wrong answers tend to have lower confidence, but ``e2`` blurs it and a
  cascade reading it can detect wrong answers only partly.
* Each generated token's **logprobs** come from ``c``: the top candidate's probability is
  ``sigmoid(logit(c) + N(0, 0.75))`` per token, the next candidates share the rest (each takes
  30-80% of what remains). Low confidence gives lower token logprobs and small, often negative,
  top-1/top-2 margins.

Everything is deterministic given (prompt, profile, seed): the random draws come from
``random.Random`` seeded by a digest of those.
"""

from __future__ import annotations

import hashlib
import math
import random
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

from .outputs import TokenLogprob

__all__ = [
    "QualityOutcome",
    "assess",
    "difficulty_from_digest",
    "prompt_difficulty",
    "token_difficulty",
    "token_logprob",
]

SLOPE = 8.0  # k: how sharply P(correct) falls as difficulty passes skill
CONFIDENCE_GAIN = 0.6  # how strongly confidence follows the realised margin
CONFIDENCE_NOISE = 1.0  # calibration noise (std of e2)
TOKEN_NOISE = 0.75  # per-token jitter of the top-1 logit
_LEN_SCALE = math.log1p(20000)  # ~20k characters count as "as long as it gets"
_DIGITS = str.maketrans("", "", "0123456789")


@dataclass(frozen=True, slots=True)
class QualityOutcome:
    """How one profile does on one prompt."""

    difficulty: float
    skill: float
    p_correct: float
    correct: bool
    confidence: float


def _unit(digest: bytes) -> float:
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _mix(u: float, f_len: float, f_digits: float) -> float:
    return min(1.0, max(0.0, 0.7 * u + 0.2 * min(1.0, f_len) + 0.1 * min(1.0, f_digits)))


def prompt_difficulty(text: str) -> float:
    """Hidden difficulty of a prompt text, in [0, 1] (see the module docstring)."""
    data = text.encode("utf-8")
    u = _unit(hashlib.blake2b(data, digest_size=8, person=b"prefixlb-diff").digest())
    n = len(text)
    digits = n - len(text.translate(_DIGITS))
    return _mix(u, math.log1p(n) / _LEN_SCALE, 4.0 * digits / n if n else 0.0)


def difficulty_from_digest(digest: bytes, num_tokens: int) -> float:
    """Difficulty of a prompt known only as token ids, from their digest and count.

    ~4 characters per token stand in for the length; digits are unknown.
    """
    u = _unit(hashlib.blake2b(digest, digest_size=8, person=b"prefixlb-diff").digest())
    return _mix(u, math.log1p(4 * num_tokens) / _LEN_SCALE, 0.0)


def token_difficulty(token_ids: Sequence[int]) -> float:
    """Difficulty of a prompt given as token ids (prefer :func:`prompt_difficulty` on its text)."""
    digest = hashlib.blake2b(array("I", token_ids).tobytes(), digest_size=16).digest()
    return difficulty_from_digest(digest, len(token_ids))


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def assess(difficulty: float, skill: float, rng: random.Random) -> QualityOutcome:
    """Grade one answer: draws the latent margin and confidence from ``rng``."""
    p = _sigmoid(SLOPE * (skill - difficulty))
    u = min(max(rng.random(), 1e-12), 1.0 - 1e-12)
    z = SLOPE * (skill - difficulty) + math.log(u / (1.0 - u))  # + standard logistic noise
    confidence = _sigmoid(CONFIDENCE_GAIN * z + rng.gauss(0.0, CONFIDENCE_NOISE))
    return QualityOutcome(difficulty=difficulty, skill=skill, p_correct=p, correct=z > 0.0, confidence=confidence)


def token_logprob(
    token_id: int, confidence: float, num_top: int, rng: random.Random, pool: Sequence[int]
) -> TokenLogprob:
    """Logprobs for one generated token of an answer with this confidence.

    ``num_top`` candidates (0: none) are returned, alternatives drawn from ``pool``.
    """
    c = min(max(confidence, 1e-6), 1.0 - 1e-6)
    p1 = _sigmoid(math.log(c / (1.0 - c)) + rng.gauss(0.0, TOKEN_NOISE))
    p1 = min(max(p1, 1e-4), 0.9999)
    lp = math.log(p1)
    if num_top <= 0:
        return TokenLogprob(token_id, lp)
    cands = [(token_id, lp)]
    seen = {token_id}
    rest = 1.0 - p1
    while len(cands) < num_top + 1:
        alt = pool[rng.randrange(len(pool))]
        if alt in seen:
            if len(seen) >= len(pool):
                break
            continue
        seen.add(alt)
        share = rest * rng.uniform(0.3, 0.8)
        rest -= share
        cands.append((alt, math.log(max(share, 1e-300))))
    cands.sort(key=lambda t: -t[1])
    return TokenLogprob(token_id, lp, tuple(cands[:num_top]))
