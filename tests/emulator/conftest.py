"""Run ``async def`` tests in a fresh event loop with a hard timeout (no pytest-asyncio needed).

Every test here uses real sockets on 127.0.0.1 with ephemeral ports; ``@pytest.mark.timeout``
(pytest-timeout) still applies on top, and ``@pytest.mark.async_timeout(s)`` sets the
per-test asyncio bound (default 30 s).
"""

from __future__ import annotations

import asyncio
import inspect

import pytest


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
