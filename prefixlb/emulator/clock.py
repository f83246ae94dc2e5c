"""A scaled wall clock: emulated time runs ``time_scale`` times faster than the event loop's.

Like SimPy's ``RealtimeEnvironment``, the emulator computes when something *should* happen in
emulated time, sleeps until the matching wall time, and measures how late it woke up. The
clock only maps between the two time lines; the replica's driver decides what to do when it
falls behind.
"""

from __future__ import annotations

import asyncio

__all__ = ["ScaledClock"]


class ScaledClock:
    """Emulated time = (loop time - start) x ``time_scale``; starts at 0 when created."""

    __slots__ = ("_loop", "_t0", "time_scale")

    def __init__(self, time_scale: float = 1.0, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if not time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        self._loop = loop or asyncio.get_running_loop()
        self._t0 = self._loop.time()
        self.time_scale = time_scale

    def now(self) -> float:
        """Emulated seconds since the clock started."""
        return (self._loop.time() - self._t0) * self.time_scale

    def wall_at(self, t: float) -> float:
        """The loop time at which emulated time ``t`` is reached."""
        return self._t0 + t / self.time_scale

    def wall(self, duration: float) -> float:
        """Wall seconds that ``duration`` emulated seconds take."""
        return duration / self.time_scale

    async def sleep(self, duration: float) -> None:
        """Sleep ``duration`` emulated seconds."""
        if duration > 0:
            await asyncio.sleep(duration / self.time_scale)
