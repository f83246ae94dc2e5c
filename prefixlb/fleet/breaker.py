"""Per-replica circuit breaker: stop sending to a replica that keeps failing, probe it later.

States: ``closed`` (normal) -> ``open`` after ``failure_threshold`` consecutive failures, or when
at least ``min_requests`` outcomes in the last ``window_s`` seconds failed at ``failure_rate``
or more -> ``half_open`` once ``open_s`` has passed (a limited number of probe requests may go
through) -> ``closed`` after ``success_threshold`` consecutive successes, or back to ``open`` on
any failure (with the open time doubled, up to ``max_open_s``). Pure: the clock is passed in.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

__all__ = ["BreakerConfig", "CircuitBreaker"]


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    failure_threshold: int = 5
    failure_rate: float = 0.5
    min_requests: int = 20
    window_s: float = 30.0
    open_s: float = 5.0
    max_open_s: float = 60.0
    success_threshold: int = 2
    half_open_probes: int = 1


class CircuitBreaker:
    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

    def __init__(self, config: BreakerConfig | None = None) -> None:
        self.config = config or BreakerConfig()
        self.state = self.CLOSED
        self._consecutive_failures = 0
        self._consecutive_successes = 0
        self._opened_at = 0.0
        self._open_for = self.config.open_s
        self._probes = 0
        self._outcomes: deque[tuple[float, bool]] = deque()
        self.transitions = 0

    def allows(self, now: float) -> bool:
        """May a request be sent now? (In half-open, reserves a probe slot.)"""
        if self.state == self.CLOSED:
            return True
        if self.state == self.OPEN:
            if now - self._opened_at < self._open_for:
                return False
            self._set(self.HALF_OPEN)
            self._probes = 0
        if self._probes < self.config.half_open_probes:
            self._probes += 1
            return True
        return False

    def available(self, now: float) -> bool:
        """Would a request be allowed now (without reserving a probe)?"""
        if self.state == self.CLOSED:
            return True
        if self.state == self.OPEN:
            return now - self._opened_at >= self._open_for
        return self._probes < self.config.half_open_probes

    def record(self, ok: bool, now: float) -> None:
        c = self.config
        self._outcomes.append((now, ok))
        while self._outcomes and now - self._outcomes[0][0] > c.window_s:
            self._outcomes.popleft()
        if ok:
            self._consecutive_failures = 0
            self._consecutive_successes += 1
            if self.state == self.HALF_OPEN:
                self._probes = max(0, self._probes - 1)
                if self._consecutive_successes >= c.success_threshold:
                    self._set(self.CLOSED)
                    self._open_for = c.open_s
                    self._outcomes.clear()
            return
        self._consecutive_successes = 0
        self._consecutive_failures += 1
        if self.state == self.HALF_OPEN:
            self._open_for = min(c.max_open_s, self._open_for * 2)
            self._trip(now)
            return
        if self.state == self.CLOSED:
            n = len(self._outcomes)
            failed = sum(1 for _, o in self._outcomes if not o)
            if self._consecutive_failures >= c.failure_threshold or (
                n >= c.min_requests and failed / n >= c.failure_rate
            ):
                self._trip(now)

    def force_open(self, now: float) -> None:
        self._trip(now)

    def reset(self) -> None:
        self._set(self.CLOSED)
        self._consecutive_failures = self._consecutive_successes = 0
        self._open_for = self.config.open_s
        self._outcomes.clear()

    def _trip(self, now: float) -> None:
        self._set(self.OPEN)
        self._opened_at = now
        self._probes = 0

    def _set(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self.transitions += 1
