"""Shared fixtures: every index test runs against both implementations (ids ``py`` / ``c``); ``async
def`` tests run in a fresh event loop with a hard timeout (no pytest-asyncio needed:
``@pytest.mark.async_timeout(s)`` sets the bound, default 30 s)."""

from __future__ import annotations

import asyncio
import inspect
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


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "async_timeout(seconds): bound an async emulator test (default 30 s)")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    fn = pyfuncitem.obj
    if not inspect.iscoroutinefunction(fn):
        return None
    marker = pyfuncitem.get_closest_marker("async_timeout")
    timeout = float(marker.args[0]) if marker else 30.0
    kwargs = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    asyncio.run(asyncio.wait_for(fn(**kwargs), timeout))
    return True
