"""Active health checks, ``/metrics`` scrapes and model discovery, on the control plane.

Runs on aiohttp (microseconds don't matter here, correctness and bounded waits do). Each loop
checks every replica concurrently with a per-request timeout, never lets one slow replica
delay the others, and reports changes through callbacks so this module knows nothing about
routing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

import aiohttp

from .replica import Replica
from .scrape import parse_vllm_metrics

__all__ = ["FleetMonitor", "fetch_json", "fetch_models"]

log = logging.getLogger("prefixlb.fleet")


async def fetch_models(session: aiohttp.ClientSession, url: str, timeout: float) -> set[str]:
    """Served model names from a replica's ``/v1/models`` (empty set on any failure)."""
    try:
        async with session.get(url + "/v1/models", timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            if r.status != 200:
                return set()
            body = await r.json(content_type=None)
        return {m["id"] for m in body.get("data", []) if isinstance(m, dict) and isinstance(m.get("id"), str)}
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, TypeError, AttributeError):
        return set()


async def fetch_json(session: aiohttp.ClientSession, url: str, timeout: float, body: dict | None = None):
    """The JSON body of ``GET url`` (``POST`` with ``body``); None on any failure or non-200."""
    try:
        req = session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) if body is None else \
            session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout))
        async with req as r:
            if r.status != 200:
                return None
            return await r.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return None


class FleetMonitor:
    def __init__(
        self,
        replicas: Callable[[], Iterable[Replica]],
        *,
        health_interval: float = 2.0,
        health_timeout: float = 1.0,
        fail_threshold: int = 2,
        pass_threshold: int = 1,
        scrape_interval: float = 1.0,
        scrape_timeout: float = 1.0,
        on_health: Callable[[Replica], None] = lambda r: None,
        on_scrape: Callable[[Replica], None] = lambda r: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._replicas = replicas
        self.health_interval = health_interval
        self.health_timeout = health_timeout
        self.fail_threshold = fail_threshold
        self.pass_threshold = pass_threshold
        self.scrape_interval = scrape_interval
        self.scrape_timeout = scrape_timeout
        self.on_health = on_health
        self.on_scrape = on_scrape
        self.clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256, ttl_dns_cache=30), raise_for_status=False
        )
        self._tasks = [
            asyncio.create_task(self._loop(self.check_all, self.health_interval), name="prefixlb-health"),
            asyncio.create_task(self._loop(self.scrape_all, self.scrape_interval), name="prefixlb-scrape"),
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "FleetMonitor.start() first"
        return self._session

    async def _loop(self, fn, interval: float) -> None:
        while True:
            started = time.monotonic()
            try:
                await fn()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in one round must not stop monitoring
                log.exception("fleet monitor round failed")
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(r) for r in list(self._replicas())))

    async def check(self, r: Replica) -> None:
        ok, err = False, ""
        try:
            async with self.session.get(
                r.url + "/health", timeout=aiohttp.ClientTimeout(total=self.health_timeout)
            ) as resp:
                await resp.read()
                ok = resp.status == 200
                err = "" if ok else f"/health answered {resp.status}"
        except asyncio.TimeoutError:
            err = f"/health timed out after {self.health_timeout}s"
        except aiohttp.ClientError as exc:
            err = f"/health failed: {type(exc).__name__}: {exc}"
        was = r.healthy
        if r.health_result(ok, self.fail_threshold, self.pass_threshold, err, now=self.clock()):
            if r.healthy != was:
                log.warning("replica %s (%s) is now %s%s", r.id, r.url, "healthy" if r.healthy else "unhealthy",
                            "" if r.healthy else f": {err}")
            self.on_health(r)

    async def scrape_all(self) -> None:
        await asyncio.gather(*(self.scrape(r) for r in list(self._replicas()) if r.healthy))

    async def scrape(self, r: Replica) -> None:
        try:
            async with self.session.get(
                r.url + "/metrics", timeout=aiohttp.ClientTimeout(total=self.scrape_timeout)
            ) as resp:
                if resp.status != 200:
                    return
                text = await resp.text(errors="replace")
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return
        r.scraped = parse_vllm_metrics(text)
        r.scraped_at = self.clock()
        if r.scraped.models:
            r.models |= r.scraped.models
        self.on_scrape(r)
