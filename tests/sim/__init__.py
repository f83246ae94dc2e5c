"""Simulator tests. ``benchmark_modules`` imports programs from benchmarks/ (not a package)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def benchmark_modules(*names: str) -> tuple:
    """Import ``benchmarks/<name>.py`` for each name (they import each other by bare name, so the
    directory is on sys.path while they load)."""
    sys.path.insert(0, str(BENCH))
    try:
        return tuple(importlib.import_module(n) for n in names)
    finally:
        sys.path.remove(str(BENCH))
