"""Fault injection for one replica: applied by the HTTP layer before a request is handled.

Which routes are affected: ``hang`` holds every route except ``/admin/*`` (a hung process
answers nothing, health checks included); ``error_rate``, ``latency`` and ``crash_after`` apply
to inference routes (``/v1/completions``, ``/v1/chat/completions``) only, so a load balancer
sees a replica that is healthy but fails or slows down requests; ``slow_stream`` is applied by
the streaming writer; ``flap_period`` takes the whole port up and down. Durations are emulated
seconds (divided by the time scale like everything else).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .config import Faults
from .protocol import APIError

if TYPE_CHECKING:
    from .replica import EmulatedReplica

__all__ = ["FaultState"]

log = logging.getLogger("prefixlb.emulator.faults")

_FIELDS = {f.name for f in dataclasses.fields(Faults)}


class FaultState:
    """The faults of one replica and the bookkeeping they need (request count, flap task)."""

    def __init__(self, replica: EmulatedReplica, faults: Faults, seed: int = 0) -> None:
        self._replica = replica
        self.faults = dataclasses.replace(faults)
        self._rng = random.Random(f"faults-{seed}-{replica.index}")
        self.inference_requests = 0  # counted since crash_after was last set
        self._flap_task: asyncio.Task[None] | None = None
        self.errors_injected = 0

    def start(self) -> None:
        self._restart_flap()

    async def stop(self) -> None:
        await self._cancel_flap()

    async def before(self, kind: str) -> None:
        """Apply the faults to a request of ``kind`` (``inference``, ``other`` or ``admin``)."""
        if kind == "admin":
            return
        f = self.faults
        if f.hang:
            await asyncio.Event().wait()  # until the client gives up (the handler is cancelled)
        if kind != "inference":
            return
        self.inference_requests += 1
        if f.crash_after is not None and self.inference_requests > f.crash_after:
            log.warning("replica %d: crashing after %d requests (injected fault)", self._replica.index, f.crash_after)
            self._replica.go_down()
            await asyncio.sleep(3600)  # the connection is gone; the handler is cancelled
        if f.latency > 0:
            await self._replica.clock.sleep(f.latency)
        if f.error_rate > 0 and self._rng.random() < f.error_rate:
            self.errors_injected += 1
            raise APIError(
                500, "InternalServerError", "Injected fault: the replica failed this request (prefixlb emulator)."
            )

    async def update(self, changes: Mapping[str, Any]) -> Faults:
        """Apply ``changes`` (Faults fields, plus ``reset: true`` to clear everything first).

        Raises ValueError naming a bad key or value; nothing changes then.
        """
        unknown = set(changes) - _FIELDS - {"reset"}
        if unknown:
            raise ValueError(
                f"unknown fault field(s): {', '.join(sorted(unknown))}; known: reset, {', '.join(sorted(_FIELDS))}"
            )
        base = Faults() if changes.get("reset") else dataclasses.replace(self.faults)
        kw = {k: v for k, v in changes.items() if k != "reset"}
        try:
            new = dataclasses.replace(base, **kw)
            _check_types(new)
            new.validate()
        except (TypeError, ValueError) as exc:
            raise ValueError(str(exc)) from None
        old = self.faults
        self.faults = new
        if changes.get("reset") or "crash_after" in kw:
            self.inference_requests = 0
        if changes.get("reset") or new.flap_period != old.flap_period:
            await self._cancel_flap()
            self._restart_flap()
        if not new.flap_period and (changes.get("reset") or new.crash_after is None or "crash_after" in kw):
            await self._replica.go_up()
        return new

    def _restart_flap(self) -> None:
        if self.faults.flap_period and self._flap_task is None:
            self._flap_task = asyncio.get_running_loop().create_task(self._flap(self.faults.flap_period))

    async def _cancel_flap(self) -> None:
        t, self._flap_task = self._flap_task, None
        if t is not None:
            t.cancel()
            try:
                await t
            except asyncio.CancelledError:
                pass

    async def _flap(self, period: float) -> None:
        clock = self._replica.clock
        while True:
            await clock.sleep(period)
            self._replica.go_down()
            await clock.sleep(period)
            await self._replica.go_up()


def _check_types(f: Faults) -> None:
    for name, typ in (("error_rate", (int, float)), ("latency", (int, float)), ("slow_stream", (int, float))):
        v = getattr(f, name)
        if isinstance(v, bool) or not isinstance(v, typ):
            raise ValueError(f"faults.{name} must be a number, got {v!r}")
    if not isinstance(f.hang, bool):
        raise ValueError(f"faults.hang must be true or false, got {f.hang!r}")
    for name in ("crash_after",):
        v = getattr(f, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise ValueError(f"faults.{name} must be an integer or null, got {v!r}")
    v = f.flap_period
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
        raise ValueError(f"faults.flap_period must be a number or null, got {v!r}")
