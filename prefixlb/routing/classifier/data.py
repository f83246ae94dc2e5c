"""Labelled routing data: reading both JSONL formats, prompt hashes, and the seeded stratified
split that keeps a held-out set out of training.

Formats (one JSON object per line; one format per file):

* two tiers: ``{"prompt": str, "weak_correct": bool, "strong_correct": bool}`` → tiers
  ``weak, strong``;
* N tiers: ``{"prompt": str, "correct": {"<tier>": bool, ...}}`` → tiers in the order given by
  the caller (``--tiers small,medium,large``) or else the key order of the first row, cheapest
  first.

Optional ``source`` / ``subject`` fields are kept for per-source reports and for stratifying the
split; the classifier never sees them (it routes from the prompt alone).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DataError",
    "Dataset",
    "Example",
    "load_jsonl",
    "needed_tier",
    "prompt_hash",
    "stratified_split",
]


class DataError(ValueError):
    """A labelled file that cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    prompt: str
    correct: tuple[bool, ...]  # per tier, cheapest first
    source: str | None = None
    subject: str | None = None  # optional topic label: a training target only, never a feature

    @property
    def hash(self) -> str:
        return prompt_hash(self.prompt)


@dataclass
class Dataset:
    tiers: list[str]
    examples: list[Example]
    path: str | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def subset(self, keep: Iterable[int]) -> Dataset:
        return Dataset(self.tiers, [self.examples[i] for i in keep], self.path)


def prompt_hash(prompt: str) -> str:
    """Stable id of a prompt (SHA-256 of its UTF-8 bytes, 16 hex digits): the split is recorded by it."""
    return hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def needed_tier(correct: Sequence[bool]) -> int:
    """The cheapest tier that answers correctly; 0 when none does (a dearer tier would not help)."""
    for k, ok in enumerate(correct):
        if ok:
            return k
    return 0


def _bool(v: object, where: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    raise DataError(f"{where}: expected true/false, got {v!r}")


def load_jsonl(path: str | Path, tiers: Sequence[str] | None = None) -> Dataset:
    """Read a labelled JSONL file in either format; ``tiers`` orders the N-tier format's tiers."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    examples: list[Example] = []
    fmt: str | None = None
    order: list[str] | None = list(tiers) if tiers else None
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit inside a string
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not JSON ({exc.msg})") from exc
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise DataError(f'{where}: expected an object with a string "prompt"')
        this = "n" if "correct" in row else "two" if "weak_correct" in row or "strong_correct" in row else None
        if this is None:
            raise DataError(f'{where}: needs "weak_correct" and "strong_correct", or "correct": {{tier: bool}}')
        if fmt is None:
            fmt = this
        elif this != fmt:
            raise DataError(f"{where}: mixes the two-tier and N-tier formats in one file")
        src = row.get("source")
        src = str(src) if src is not None else None
        subj = row.get("subject")
        subj = str(subj) if subj not in (None, "") else None
        if fmt == "two":
            for k in ("weak_correct", "strong_correct"):
                if k not in row:
                    raise DataError(f'{where}: missing "{k}"')
            c = (_bool(row["weak_correct"], where + ": weak_correct"), _bool(row["strong_correct"], where + ": strong_correct"))
        else:
            corr = row["correct"]
            if not isinstance(corr, dict) or not corr:
                raise DataError(f'{where}: "correct" must be an object {{tier: bool}}')
            if order is None:
                order = [str(k) for k in corr]
            missing = [t for t in order if t not in corr]
            extra = [t for t in corr if t not in order]
            if missing or extra:
                raise DataError(
                    f'{where}: "correct" has tiers {list(corr)}, expected {order}'
                    + (" (give --tiers to name and order them)" if not tiers else "")
                )
            c = tuple(_bool(corr[t], f"{where}: correct.{t}") for t in order)
        examples.append(Example(row["prompt"], c, src, subj))
    if not examples:
        raise DataError(f"{path}: no examples")
    names = ["weak", "strong"] if fmt == "two" else list(order or [])
    if len(names) < 2:
        raise DataError(f"{path}: need at least two tiers, got {names}")
    return Dataset(names, examples, str(path))


def stratified_split(ds: Dataset, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (rest, held) with about ``fraction`` of the distinct prompts held out.

    Stratified by (source, needed tier) so both sides keep the mix; rows with the same prompt
    text always land on the same side (no leakage through duplicates). Deterministic in ``seed``.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError("holdout fraction must be in (0, 1)")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(ds.examples):
        groups[ex.hash].append(i)
    strata: dict[tuple, list[str]] = defaultdict(list)
    for h, idx in groups.items():
        ex = ds.examples[idx[0]]
        strata[(ex.source or "", needed_tier(ex.correct), ex.correct[-1])].append(h)
    rng = random.Random(seed)
    held_hashes: set[str] = set()
    for key in sorted(strata):
        hs = sorted(strata[key])
        rng.shuffle(hs)
        held_hashes.update(hs[: round(fraction * len(hs))])
    rest = [i for i, ex in enumerate(ds.examples) if ex.hash not in held_hashes]
    held = [i for i, ex in enumerate(ds.examples) if ex.hash in held_hashes]
    return rest, held
