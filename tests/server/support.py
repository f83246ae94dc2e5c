"""Helpers for balancer tests: deterministic fake replicas and a balancer on 127.0.0.1.

Every wait is bounded; every server is closed in ``finally``.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable

import aiohttp
import orjson
from aiohttp import web

from prefixlb.config import Config, ReplicaConfig, TierConfig, config_from_flags
from prefixlb.server import Balancer


def run(coro: Awaitable, timeout: float = 60.0):
    async def bounded():
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


class FakeReplica:
    """An OpenAI-ish upstream with scripted behaviour, counting what it saw.

    ``mode``: "ok" (JSON completion), "sse" (fixed SSE events, ``delay`` apart), "error"
    (500), "hang" (never answers), "cut" (sends ``cut_after`` events then drops the
    connection).
    """

    EVENTS = [b'data: {"id":"x","choices":[{"index":0,"text":"tok%d"}]}\n\n' % i for i in range(8)] + [
        b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":10,"completion_tokens":8,'
        b'"prompt_tokens_details":{"cached_tokens":0}}}\n\n',
        b"data: [DONE]\n\n",
    ]

    def __init__(self, mode: str = "ok", delay: float = 0.0, cut_after: int = 2, model: str = "fake-model") -> None:
        self.mode = mode
        self.delay = delay
        self.cut_after = cut_after
        self.model = model
        self.hits = 0
        self.bodies: list[dict] = []
        self.disconnects = 0
        self.health_ok: bool | None = None  # None: healthy unless mode == "error"
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> FakeReplica:
        app = web.Application()
        app.router.add_post("/v1/completions", self._completion)
        app.router.add_post("/v1/chat/completions", self._completion)
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/metrics", self._metrics)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()

    async def _health(self, request):
        ok = self.mode != "error" if self.health_ok is None else self.health_ok
        return web.Response(status=200 if ok else 500)

    async def _metrics(self, request):
        return web.Response(text="")

    async def _models(self, request):
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def _completion(self, request: web.Request):
        self.hits += 1
        self.bodies.append(await request.json())
        if self.mode == "error":
            return web.json_response({"error": {"message": "boom", "type": "InternalServerError", "code": 500}},
                                     status=500)
        if self.mode == "hang":
            await asyncio.sleep(3600)
        if self.mode in ("sse", "cut"):
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            try:
                for i, ev in enumerate(self.EVENTS):
                    if self.mode == "cut" and i == self.cut_after:
                        request.transport.close()
                        return resp
                    await resp.write(ev)
                    if self.delay:
                        await asyncio.sleep(self.delay)
                await resp.write_eof()
            except (ConnectionResetError, asyncio.CancelledError):
                self.disconnects += 1
                raise
            return resp
        if self.delay:
            await asyncio.sleep(self.delay)
        return web.json_response({"id": "cmpl-1", "object": "text_completion", "model": self.model,
                                  "choices": [{"index": 0, "text": "ok", "finish_reason": "length"}],
                                  "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}})


async def balancer_for(urls: list[str], **changes) -> Balancer:
    cfg = config_from_flags(urls, port=0)
    defaults = dict(health_interval_s=0.1, health_timeout_s=0.5, scrape_interval_s=0.2, breaker_open_s=0.5,
                    first_byte_timeout_s=5.0, admin_token="secret-token")
    defaults.update(changes)
    b = Balancer(dataclasses.replace(cfg, **defaults))
    await b.start()
    return b


def tiered_config(tiers: dict[str, list[str]], model: dict[str, str] | None = None, **changes) -> Config:
    ts = tuple(TierConfig(name=n, model=(model or {}).get(n), replicas=tuple(ReplicaConfig(u) for u in urls))
               for n, urls in tiers.items())
    return dataclasses.replace(Config(tiers=ts, port=0, health_interval_s=0.1, scrape_interval_s=0.2,
                                      admin_token="secret-token"), **changes)


async def post(session: aiohttp.ClientSession, url: str, body, headers=None, raw: bytes | None = None):
    hdrs = {"content-type": "application/json", **(headers or {})}
    data = raw if raw is not None else orjson.dumps(body)
    async with session.post(url, data=data, headers=hdrs) as r:
        return r.status, dict(r.headers), await r.read()


async def metric(session: aiohttp.ClientSession, base: str, name: str) -> float:
    async with session.get(base + "/metrics") as r:
        text = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


async def wait_for(pred: Callable[[], Awaitable[bool] | bool], timeout: float = 5.0, step: float = 0.05) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        v = pred()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return True
        await asyncio.sleep(step)
    return False
