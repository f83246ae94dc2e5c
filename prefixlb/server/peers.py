"""Peer sync: several balancer instances share what they send, so they route alike.

Each instance sees only the requests it receives. Two instances behind one Service, or the
``--workers`` of one machine, would otherwise each model a fraction of every replica's queue
and, in approximate mode, each learn a fraction of every replica's cache. With peer sync every
instance publishes its routing hooks -- dispatched (replica, prompt and cached tokens, output
budget, the prompt's block chain), first token, finished, failed -- and applies its peers' as
if they were its own (:meth:`TierRouter.remote_dispatched`): their load models and indexes stay
equal, up to the messages in flight (~0.1 ms on a LAN), so the same request gets the same
decision wherever it lands.

Transport: ZMQ PUB (bound by each instance) / SUB (connected to every peer), msgpack frames.
Replicas are named by URL (ids are per instance). A peer that dies mid-request leaves entries
that expire after ``ttl`` seconds. Messages are fire-and-forget: a lost one costs accuracy, not
correctness (the replicas' scraped queues and KV events still correct each instance).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from array import array
from collections.abc import Callable, Iterable
from typing import Any

import msgpack
import zmq
import zmq.asyncio

__all__ = ["PeerSync", "RemoteLedger"]

log = logging.getLogger("prefixlb.server.peers")

_KINDS = {"dispatched": 0, "first_token": 1, "finished": 2, "failed": 3}


class PeerSync:
    """Publishes this instance's routing hooks and applies its peers'."""

    def __init__(self, bind: str, connect: Iterable[str], apply: Callable[[list], None], *,
                 ctx: zmq.asyncio.Context | None = None) -> None:
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self.bind_endpoint = bind
        self.peers = [p for p in connect if p != bind]
        self._apply = apply
        self.instance = int.from_bytes(os.urandom(6), "big")
        self._tags = itertools.count(1)
        self._pub: zmq.asyncio.Socket | None = None
        self._sub: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task | None = None
        self.sent = 0
        self.received = 0
        self.errors = 0

    async def start(self) -> None:
        pub = self._ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.SNDHWM, 100_000)
        pub.setsockopt(zmq.LINGER, 0)
        pub.bind(self.bind_endpoint)
        self.bind_endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, 100_000)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        for p in self.peers:
            sub.connect(p)
        self._pub, self._sub = pub, sub
        self._task = asyncio.get_running_loop().create_task(self._receive(), name="prefixlb-peers")

    def connect(self, endpoint: str) -> None:
        if endpoint not in self.peers and endpoint != self.bind_endpoint:
            self.peers.append(endpoint)
            if self._sub is not None:
                self._sub.connect(endpoint)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for s in (self._sub, self._pub):
            if s is not None:
                s.close(linger=0)

    def tag(self) -> int:
        return next(self._tags)

    def publish(self, kind: str, tier: str, url: str, tag: int, d: Any = None) -> None:
        if self._pub is None:
            return
        if kind == "dispatched":
            chain = d.chain
            raw = chain.tobytes() if isinstance(chain, array) else bytes(memoryview(chain))
            msg = (0, self.instance, tag, tier, url, d.prompt_tokens, d.cached_tokens, d.out_tokens,
                   d.matched_blocks, raw)
        else:
            msg = (_KINDS[kind], self.instance, tag, tier, url)
        try:
            self._pub.send(msgpack.packb(msg), flags=zmq.NOBLOCK)
            self.sent += 1
        except zmq.Again:
            self.errors += 1

    async def _receive(self) -> None:
        assert self._sub is not None
        while True:
            try:
                data = await self._sub.recv()
                msg = msgpack.unpackb(data, use_list=True)
            except asyncio.CancelledError:
                raise
            except (zmq.ZMQError, ValueError, msgpack.ExtraData, msgpack.FormatError) as exc:
                self.errors += 1
                log.debug("peer sync: bad message (%s)", exc)
                continue
            if not isinstance(msg, list) or len(msg) < 5 or msg[1] == self.instance:
                continue
            self.received += 1
            self._apply(msg)


class RemoteLedger:
    """Peers' requests in flight, as local Decisions, until they end or expire."""

    def __init__(self, ttl: float = 900.0) -> None:
        self.ttl = ttl
        self._open: dict[tuple[int, int], tuple[Any, Any, float]] = {}  # (instance, tag) -> (router, d, t)

    def __len__(self) -> int:
        return len(self._open)

    def apply(self, msg: list, resolve: Callable[[str, str], tuple[Any, int] | None], now: float) -> None:
        kind, inst, tag, tier, url = msg[:5]
        key = (inst, tag)
        if kind == 0:
            found = resolve(tier, url)
            if found is None:
                return
            router, rid = found
            chain = array("Q")
            chain.frombytes(msg[9])
            d = router.remote_dispatched(rid, chain, float(msg[5]), float(msg[6]), float(msg[7]), now)
            if d is not None:
                d.matched_blocks = int(msg[8])
                self._open[key] = (router, d, now)
            return
        entry = self._open.get(key)
        if entry is None:
            return
        router, d, _ = entry
        if kind == 1:
            router.first_token(d, now)
        elif kind == 2:
            del self._open[key]
            router.finished(d, now)
        elif kind == 3:
            del self._open[key]
            router.failed(d, now)

    def expire(self, now: float) -> int:
        dead = [k for k, (_, _, t) in self._open.items() if now - t > self.ttl]
        for k in dead:
            router, d, _ = self._open.pop(k)
            router.finished(d, now)
        return len(dead)
