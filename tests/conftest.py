"""Shared fixtures: every index test runs against both implementations (ids ``py`` / ``c``)."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from prefixlb import index

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("PREFIXLB_HYPOTHESIS_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile("ci")

IMPLS = [pytest.param(index.PrefixIndexPy, id="py")]
if hasattr(index, "PrefixIndexC"):
    IMPLS.append(pytest.param(index.PrefixIndexC, id="c"))
else:
    IMPLS.append(pytest.param(None, id="c", marks=pytest.mark.skip(reason="C extension not built")))


@pytest.fixture(params=IMPLS)
def Index(request):  # noqa: N802 - a class, named as one
    return request.param
