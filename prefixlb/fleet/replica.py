"""A replica as the balancer sees it: address, health, breaker, what its /metrics said."""

from __future__ import annotations

from dataclasses import dataclass, field

from .breaker import BreakerConfig, CircuitBreaker
from .scrape import ScrapedLoad

__all__ = ["Replica"]


@dataclass(eq=False)
class Replica:
    id: int
    url: str
    tier: str
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    healthy: bool = True  # optimistic until checks say otherwise (a dead one fails fast)
    draining: bool = False
    models: set[str] = field(default_factory=set)
    scraped: ScrapedLoad | None = None
    scraped_at: float = float("-inf")
    last_error: str = ""
    block_size_warned: bool = False
    was_down: bool = False  # failed health checks since it was last seen healthy
    _fails: int = 0
    _passes: int = 0
    checks: int = 0

    @classmethod
    def make(cls, id: int, url: str, tier: str, breaker: BreakerConfig | None = None) -> Replica:
        return cls(id=id, url=url, tier=tier, breaker=CircuitBreaker(breaker))

    def available(self, now: float) -> bool:
        """May new work be routed here now?"""
        return self.healthy and not self.draining and self.breaker.available(now)

    def health_result(self, ok: bool, fail_threshold: int, pass_threshold: int, error: str = "",
                      now: float | None = None) -> bool:
        """Fold one health-check result in; returns True when routability may have changed.

        A passing check after the breaker's cool-down counts as a successful probe: recovery
        must not depend on the router choosing to send real traffic to a replica it has learned
        to avoid.
        """
        self.checks += 1
        if ok:
            self._fails = 0
            self._passes += 1
            if not self.healthy and self._passes >= pass_threshold:
                self.healthy = True
                self.breaker.reset()  # a replica that came back starts with a clean record
                return True
            if now is not None and self.breaker.state != "closed" and self.breaker.available(now):
                before = self.breaker.state
                if self.breaker.allows(now):
                    self.breaker.record(True, now)
                return self.breaker.state != before
            return False
        self._passes = 0
        self._fails += 1
        self.last_error = error
        if self.healthy and self._fails >= fail_threshold:
            self.healthy = False
            return True
        return False

    def describe(self, now: float) -> dict:
        s = self.scraped
        return {
            "id": self.id,
            "url": self.url,
            "tier": self.tier,
            "healthy": self.healthy,
            "draining": self.draining,
            "breaker": self.breaker.state,
            "available": self.available(now),
            "models": sorted(self.models),
            "last_error": self.last_error,
            "scraped": None if s is None else {
                "waiting": s.waiting, "running": s.running, "kv_usage": s.kv_usage,
                "kv_capacity_tokens": s.kv_capacity_tokens, "age_s": round(now - self.scraped_at, 3),
            },
        }
