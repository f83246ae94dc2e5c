"""The trained tier classifier on the request path: no torch; the forward pass in C
(``native/tiernet.c``) when the extension is built, else numpy; microseconds per prompt.

A model directory holds:

* ``config.json`` — tiers (cheapest first), prices, feature names, group names, calibrated
  thresholds, training settings and data provenance;
* ``weights.npz`` — plain float arrays (loaded with ``allow_pickle=False``);
* ``vocab.txt`` — the WordPiece vocabulary;
* ``split.json`` — the prompt hashes of the held-out and validation splits;
* ``report.json`` / ``report.md`` / ``curve.png`` — what ``train-router`` measured.

Inference, for one prompt:

1. WordPiece ids of the prompt's first characters; their rows of ``group_table`` averaged plus
   ``group_bias`` give group logits. The table is MiniLM's distilled static embedding already
   multiplied by the group head's weights, so the average is taken over G columns, not 384.
2. softmax → P(group); ``P @ rates`` = the expected per-level "needs a dearer tier" rate of
   the prompt's (soft) group.
3. Those K−1 rates and the request features, standardised, go through a one-hidden-layer MLP
   to K−1 sigmoid outputs: ``p[k]`` = P(a tier above k is needed), made non-increasing in k.

``choose`` climbs from the cheapest tier while ``p[k] >= threshold``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from prefixlb.index import NATIVE_FORCED_OFF

from .features import FEATURE_NAMES, Featurizer
from .tokenize import WordPiece

try:  # the forward pass in C (native/tiernet.c); the numpy one below is its reference
    from ._tiernet import TierNet as _TierNet
except ImportError:
    _TierNet = None
if NATIVE_FORCED_OFF:
    _TierNet = None

__all__ = ["FORMAT", "ModelError", "TierClassifier", "save_model"]

FORMAT = "prefixlb-tier-classifier"
VERSION = 1
_ARRAYS = ("group_table", "group_bias", "rates", "feat_mean", "feat_std", "w1", "b1", "w2", "b2")


class ModelError(ValueError):
    """A model directory that cannot be loaded; the message names the file."""


def save_model(directory: str | Path, config: dict, arrays: dict[str, np.ndarray], vocab: Sequence[str]) -> Path:
    """Write config.json, weights.npz and vocab.txt into ``directory`` (created if needed)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    missing = [k for k in _ARRAYS if k not in arrays]
    if missing:
        raise ValueError(f"missing arrays: {missing}")
    cfg = {"format": FORMAT, "version": VERSION, **config}
    (d / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=False) + "\n")
    np.savez(d / "weights.npz", **{k: np.ascontiguousarray(arrays[k], dtype=np.float32) for k in _ARRAYS})
    (d / "vocab.txt").write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
    return d


class TierClassifier:
    """Scores a prompt and picks its tier; see the module docstring for the model."""

    def __init__(self, config: dict, arrays: dict[str, np.ndarray], vocab: Sequence[str],
                 threshold: float | None = None, budget: float | None = None):
        self.config = config
        self.tiers: list[str] = list(config["tiers"])
        self.prices: list[float] = [float(p) for p in config["prices"]]
        K = len(self.tiers)
        a = {k: np.asarray(arrays[k], dtype=np.float64) for k in _ARRAYS}
        G = a["group_bias"].shape[0]
        F = len(config.get("feature_names", FEATURE_NAMES))
        shapes = {
            "group_table": (len(vocab), G), "rates": (G, K - 1), "feat_mean": (K - 1 + F,),
            "feat_std": (K - 1 + F,), "b2": (K - 1,),
        }
        for k, shape in shapes.items():
            if a[k].shape != shape:
                raise ModelError(f"weights.npz: {k} has shape {a[k].shape}, expected {shape}")
        if tuple(config.get("feature_names", FEATURE_NAMES)) != FEATURE_NAMES:
            raise ModelError("config.json: feature_names differ from this prefixlb's features; retrain the model")
        # float64 where it is cheap; the table stays float32 (it is the only large array).
        self._table = np.asarray(arrays["group_table"], dtype=np.float32)
        self._gbias = a["group_bias"]
        self._rates = a["rates"]
        self._mu = a["feat_mean"]
        self._inv_sd = 1.0 / a["feat_std"]
        self._w1, self._b1, self._w2, self._b2 = a["w1"], a["b1"], a["w2"], a["b2"]
        self._feat = Featurizer(WordPiece(vocab), int(config.get("text_cap", 2000)))
        self._net = None if _TierNet is None else _TierNet(
            self._table, self._gbias, self._rates, self._mu, a["feat_std"], self._w1, self._b1, self._w2, self._b2)
        if self._net is not None:
            self._net.set_vocab(self._feat.tokenizer.vocab, self._feat.tokenizer.unk_id)
        self.threshold = self._pick_threshold(threshold, budget)

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    def load(cls, directory: str | Path, threshold: float | None = None, budget: float | None = None) -> TierClassifier:
        """Load a model directory. ``threshold`` overrides the calibrated one; ``budget`` picks
        the calibrated threshold whose validation call fraction is closest to it."""
        d = Path(directory)
        try:
            config = json.loads((d / "config.json").read_text())
        except FileNotFoundError as exc:
            raise ModelError(f"{d}: not a tier-classifier model directory (no config.json)") from exc
        except json.JSONDecodeError as exc:
            raise ModelError(f"{d / 'config.json'}: not JSON ({exc.msg})") from exc
        if config.get("format") != FORMAT:
            raise ModelError(f"{d / 'config.json'}: format is {config.get('format')!r}, expected {FORMAT!r}")
        if int(config.get("version", 0)) > VERSION:
            raise ModelError(f"{d / 'config.json'}: version {config.get('version')} is newer than this prefixlb reads")
        try:
            with np.load(d / "weights.npz", allow_pickle=False) as z:
                arrays = {k: z[k] for k in _ARRAYS}
        except (OSError, KeyError, ValueError) as exc:
            raise ModelError(f"{d / 'weights.npz'}: {exc}") from exc
        vocab = (d / "vocab.txt").read_text(encoding="utf-8").split("\n")
        if vocab and vocab[-1] == "":
            vocab.pop()
        return cls(config, arrays, vocab, threshold=threshold, budget=budget)

    def _pick_threshold(self, threshold: float | None, budget: float | None) -> float:
        if threshold is not None:
            return float(threshold)
        cal = self.config.get("calibration", {})
        if budget is not None:
            table = cal.get("budgets") or {}
            if not table:
                raise ModelError("config.json: no calibrated budgets; pass a threshold instead")
            best = min(table, key=lambda b: abs(float(b) - budget))
            return float(table[best])
        return float(cal.get("default_threshold", 0.5))

    # -- inference ---------------------------------------------------------------------------

    @property
    def native(self) -> bool:
        """Whether the forward pass runs in C (``_tiernet``) rather than numpy."""
        return self._net is not None

    def probs(self, prompt: str) -> np.ndarray:
        """``p[k]`` = P(a tier above tier k is needed), k = 0..K-2, non-increasing."""
        return np.asarray(self._forward(prompt))

    def _forward(self, prompt: str) -> Sequence[float]:
        if self._net is not None:
            # an ASCII prompt is featurised in C as well (tokenize.py and features.py are its
            # specification); anything else takes the Python featuriser
            p = self._net.probs_text(prompt, self._feat.text_cap)
            if p is not None:
                return p
            return self._net.probs(*self._feat(prompt))
        return self._probs_reference(*self._feat(prompt))

    def _probs_reference(self, ids: list[int], feats: list[float]) -> np.ndarray:
        """The forward pass in numpy: the specification native/tiernet.c must match."""
        if ids:
            g = self._table[ids].sum(axis=0) * (1.0 / len(ids)) + self._gbias
        else:
            g = self._gbias.copy()
        g = np.exp(g - g.max())
        P = g * (1.0 / g.sum())
        z = np.concatenate((P @ self._rates, feats))
        z = (z - self._mu) * self._inv_sd
        h = self._w1 @ z + self._b1
        np.maximum(h, 0.0, out=h)
        o = self._w2 @ h + self._b2
        p = 1.0 / (1.0 + np.exp(-o))
        return np.minimum.accumulate(p)

    def score(self, prompt: str) -> float:
        """P(the next tier above the cheapest is needed) — with two tiers, the strong one."""
        return float(self._forward(prompt)[0])

    def choose(self, prompt: str, tiers: Sequence[str] | None = None) -> tuple[str, float]:
        """(tier, score): climb from the cheapest tier while P(a dearer tier is needed) >= threshold.

        ``tiers`` names the caller's tiers cheapest first, one per model tier (default: the
        model's own names).
        """
        names = self.tiers if tiers is None else tiers
        if len(names) != len(self.tiers):
            raise ValueError(f"model routes among {len(self.tiers)} tiers {self.tiers}, got {len(names)}: "
                             f"{list(names)}")
        p = self._forward(prompt)
        k, n, t = 0, len(p), self.threshold
        while k < n and p[k] >= t:
            k += 1
        return names[k], float(p[0])

    def __repr__(self) -> str:
        return f"TierClassifier(tiers={self.tiers}, threshold={self.threshold:.4f})"
