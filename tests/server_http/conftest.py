"""Every test here runs its coroutine on a fresh uvloop loop, bounded in time, and fails if the
loop reported an unhandled exception or the HTTP layer logged an error the test did not expect."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

import pytest
import uvloop


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Aio:
    def __init__(self) -> None:
        self.runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
        self.loop_errors: list[dict[str, Any]] = []
        self.runner.get_loop().set_exception_handler(lambda loop, ctx: self.loop_errors.append(ctx))
        self.log = _Collect()
        self.expect_logged_errors = False

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 20.0) -> Any:
        return self.runner.run(asyncio.wait_for(coro, timeout))

    @property
    def logged_errors(self) -> list[str]:
        return [r.getMessage() for r in self.log.records]


@pytest.fixture
def aio():
    a = Aio()
    logger = logging.getLogger("prefixlb.server.http")
    logger.addHandler(a.log)
    try:
        yield a
    finally:
        a.runner.close()
        logger.removeHandler(a.log)
    assert not a.loop_errors, f"unhandled errors on the loop: {a.loop_errors}"
    if not a.expect_logged_errors:
        assert not a.log.records, f"unexpected errors logged: {a.logged_errors}"
