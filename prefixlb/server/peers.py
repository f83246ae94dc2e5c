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
Both are plain (not asyncio) sockets: a send never blocks (``NOBLOCK``; a full queue drops the
message), and the SUB socket's file descriptor is watched by the event loop, which drains every
queued message per wake-up -- no future per message. Messages published in one turn of the
event loop leave as one frame (a msgpack array of messages), flushed at the end of the turn:
under load a frame carries several hooks, so a hook costs a fraction of a send and a receive.
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

__all__ = ["PeerSync", "RemoteLedger"]

log = logging.getLogger("prefixlb.server.peers")

_KINDS = {"dispatched": 0, "first_token": 1, "finished": 2, "failed": 3}


class PeerSync:
    """Publishes this instance's routing hooks and applies its peers'."""

    #: messages applied per event-loop wake-up before yielding to other work
    BATCH = 512

    def __init__(self, bind: str, connect: Iterable[str], apply: Callable[[list], None], *,
                 ctx: zmq.Context | None = None) -> None:
        self._ctx = ctx or zmq.Context.instance()
        self.bind_endpoint = bind
        self.peers = [p for p in connect if p != bind]
        self._apply = apply
        self.instance = int.from_bytes(os.urandom(6), "big")
        self._tags = itertools.count(1)
        self._pub: zmq.Socket | None = None
        self._sub: zmq.Socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd: int | None = None
        self._again: asyncio.Handle | None = None
        self._outbox: list[tuple] = []
        self._flush_at: asyncio.Handle | None = None
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
        self._loop = asyncio.get_running_loop()
        self._fd = sub.getsockopt(zmq.FD)
        self._loop.add_reader(self._fd, self._drain)
        self._drain()  # the descriptor is edge-triggered: take what is already queued

    def connect(self, endpoint: str) -> None:
        if endpoint not in self.peers and endpoint != self.bind_endpoint:
            self.peers.append(endpoint)
            if self._sub is not None:
                self._sub.connect(endpoint)

    async def close(self) -> None:
        if self._loop is not None and self._fd is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self._fd)
            self._fd = None
        if self._again is not None:
            self._again.cancel()
            self._again = None
        if self._flush_at is not None:
            self._flush_at.cancel()
            self.flush()
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
        self._outbox.append(msg)
        if self._flush_at is None:
            if self._loop is None:
                self.flush()
            else:
                self._flush_at = self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Send what this turn published, as one frame (called at the end of the turn)."""
        self._flush_at = None
        out, self._outbox = self._outbox, []
        if not out or self._pub is None or self._pub.closed:
            return
        try:
            self._pub.send(msgpack.packb(out if len(out) > 1 else out[0]), flags=zmq.NOBLOCK)
            self.sent += len(out)
        except zmq.Again:
            self.errors += len(out)

    def _drain(self) -> None:
        """Apply every queued message (at most :attr:`BATCH`, then again on the next turn)."""
        self._again = None
        sub = self._sub
        if sub is None or sub.closed:
            return
        recv, unpack, apply, me = sub.recv, msgpack.unpackb, self._apply, self.instance
        for _ in range(self.BATCH):
            try:
                data = recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                self.errors += 1
                log.debug("peer sync: receive failed (%s)", exc)
                return
            try:
                frame = unpack(data, use_list=True)
            except (ValueError, msgpack.ExtraData, msgpack.FormatError) as exc:
                self.errors += 1
                log.debug("peer sync: bad message (%s)", exc)
                continue
            if not isinstance(frame, list) or not frame:
                self.errors += 1
                continue
            # one message, or a turn's messages (a list of them)
            for msg in (frame,) if not isinstance(frame[0], list) else frame:
                if not isinstance(msg, list) or len(msg) < 5:
                    self.errors += 1
                    continue
                if msg[1] == me:
                    continue
                self.received += 1
                try:
                    apply(msg)
                except Exception:  # a malformed message must not stop the others
                    self.errors += 1
                    log.debug("peer sync: message not applied", exc_info=True)
        # more may be queued and the descriptor will not fire again for them
        if self._loop is not None:
            self._again = self._loop.call_soon(self._drain)


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
