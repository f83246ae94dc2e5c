"""vLLM's KV-cache events, received: decoding both wire eras, ordering, gap repair, restarts.

A vLLM replica started with ``--kv-events-config`` publishes, after each engine step that
changed its prefix cache, one batch ``[ts, [event, ...], dp_rank]`` as msgpack in the frames
``[topic, seq (8 bytes, big-endian, from 0 per process), payload]`` (``vllm/distributed/
kv_events.py``; ../shared/vllm-interfaces.md §1). Events are tagged maps since vLLM 0.24
(``{"type": "BlockStored", "block_hashes": ..., ...}``) and positional arrays before
(``["BlockStored", block_hashes, parent, token_ids, block_size, lora_id, medium, lora_name,
...]``); :func:`decode_batch` reads either, event by event.

:class:`KVEventSubscriber` is the I/O edge: one SUB socket per endpoint, any number of replicas
(topics) per socket. It hands each replica's batches to a callback strictly in sequence order:

* a **gap** (seq jumps) is repaired from the replica's replay socket (vLLM's ROUTER, asked by a
  DEALER with ``[b"", start_seq]``, as real-vllm.md found REQ only gets the first reply);
  live batches that arrive meanwhile wait and are deduplicated. A gap the replay buffer no
  longer covers, or a replica without replay, is reported as a **resync**: the consumer
  forgets what it believed that replica held and rebuilds from what follows;
* a **sequence that goes back** means the replica restarted (vLLM's counter starts at 0 per
  process): resync, then apply;
* the first batch seen from a replica with seq > 0 asks the replay socket for everything it
  still buffers, so a balancer that starts after its replicas learns their caches.

Where the sockets bind: vLLM's PUB *binds* when its endpoint has a wildcard (``tcp://*:5557``)
and *connects* when it names a host. So a source's ``bind`` is True exactly when the replica was
given a concrete host: the subscriber owns that address (one balancer). With several balancer
instances, replicas bind and every instance connects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zmq
import zmq.asyncio

__all__ = [
    "AllCleared",
    "EventDecodeError",
    "EventSource",
    "KVEventSubscriber",
    "Removed",
    "Stored",
    "decode_batch",
    "sources_from_kv_event_sources",
]

log = logging.getLogger("prefixlb.fleet.kv_events")

END_OF_REPLAY = b"\xff" * 8


# -- decoded events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stored:
    """Newly cached full blocks of one request, in chain order (vLLM's ``BlockStored``)."""

    block_hashes: list  # int (vLLM's default, low 64 bits of the digest) or bytes
    parent_block_hash: Any  # the block before the first new one; None at the sequence start
    token_ids: list[int]  # len == len(block_hashes) * block_size
    block_size: int
    lora_name: str | None = None
    medium: str | None = None
    extra_keys: list | None = None


@dataclass(frozen=True, slots=True)
class Removed:
    """Cached blocks evicted (vLLM's ``BlockRemoved``; vLLM sends one hash per event)."""

    block_hashes: list
    medium: str | None = None


@dataclass(frozen=True, slots=True)
class AllCleared:
    """The replica's prefix cache was reset (vLLM's ``AllBlocksCleared``)."""


Event = Stored | Removed | AllCleared


class EventDecodeError(ValueError):
    """A payload that is not a vLLM KV-event batch."""


def decode_batch(payload: bytes) -> tuple[float, list[Event], int | None]:
    """``(ts, events, data_parallel_rank)`` of one msgpack batch; unknown event types are skipped."""
    try:
        batch = msgpack.unpackb(payload, raw=False, strict_map_key=False, use_list=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise EventDecodeError(f"not msgpack: {exc}") from None
    if not isinstance(batch, list) or len(batch) < 2 or not isinstance(batch[1], list):
        raise EventDecodeError("a batch is [ts, [events...], dp_rank]")
    ts = batch[0]
    if not isinstance(ts, (int, float)):
        raise EventDecodeError("batch ts must be a number")
    rank = batch[2] if len(batch) > 2 and isinstance(batch[2], int) else None
    events: list[Event] = []
    for raw in batch[1]:
        ev = _decode_event(raw)
        if ev is not None:
            events.append(ev)
    return float(ts), events, rank


_STORED_FIELDS = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium", "lora_name",
                  "extra_keys")
_REMOVED_FIELDS = ("block_hashes", "medium")


def _decode_event(raw: Any) -> Event | None:
    if isinstance(raw, dict):  # vLLM >= 0.24: a map tagged by "type"
        kind = raw.get("type")
        f = raw
    elif isinstance(raw, list) and raw and isinstance(raw[0], str):  # vLLM <= 0.23: positional
        kind = raw[0]
        names = _STORED_FIELDS if kind == "BlockStored" else _REMOVED_FIELDS if kind == "BlockRemoved" else ()
        f = dict(zip(names, raw[1:]))
    else:
        raise EventDecodeError(f"an event is a tagged map or a tagged array, not {type(raw).__name__}")
    if kind == "BlockStored":
        hashes, tokens, bs = f.get("block_hashes"), f.get("token_ids"), f.get("block_size")
        if not isinstance(hashes, list) or not isinstance(tokens, list) or not isinstance(bs, int) or bs <= 0:
            raise EventDecodeError("BlockStored needs block_hashes, token_ids and block_size")
        if len(tokens) != len(hashes) * bs:
            # partial blocks (hybrid models' cache_partial_block) are not prefix-cache hits: skip
            return None
        extra = f.get("extra_keys")
        return Stored(hashes, f.get("parent_block_hash"), tokens, bs, f.get("lora_name"), f.get("medium"),
                      extra if isinstance(extra, list) else None)
    if kind == "BlockRemoved":
        hashes = f.get("block_hashes")
        if not isinstance(hashes, list):
            raise EventDecodeError("BlockRemoved needs block_hashes")
        return Removed(hashes, f.get("medium"))
    if kind == "AllBlocksCleared":
        return AllCleared()
    return None  # a newer event type: not ours to interpret


# -- the subscriber --------------------------------------------------------------------------------


@dataclass
class EventSource:
    """Where one replica's events come from."""

    replica_id: int
    endpoint: str  # the address the subscriber connects to (replica binds) or binds (replica connects)
    topic: str = ""
    replay_endpoint: str | None = None  # the replica's ROUTER (always bound by the replica)
    bind: bool = False  # True when the replica was given a concrete host: it connects to us


@dataclass
class _State:
    source: EventSource
    last: int | None = None  # last applied seq
    replaying: bool = False
    pending: list[tuple[int, bytes]] = field(default_factory=list)  # live batches held during a replay
    batches: int = 0
    events: int = 0
    gaps: int = 0
    replays: int = 0
    resyncs: int = 0
    decode_errors: int = 0
    last_at: float | None = None


OnEvents = Callable[[int, int, list[Event]], None]  # (replica id, seq, events)
OnResync = Callable[[int, str], None]  # (replica id, why)


class KVEventSubscriber:
    """Receives every configured replica's events and delivers them in order (see module doc).

    ``on_events`` and ``on_resync`` are called from the event loop, synchronously; they must not
    block (the router's updates are microseconds).
    """

    def __init__(self, sources: Iterable[EventSource], on_events: OnEvents, on_resync: OnResync, *,
                 ctx: zmq.asyncio.Context | None = None, replay_timeout: float = 2.0, rcvhwm: int = 100_000) -> None:
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._on_events = on_events
        self._on_resync = on_resync
        self.replay_timeout = replay_timeout
        self._rcvhwm = rcvhwm
        self._states: dict[int, _State] = {}
        self._by_endpoint: dict[tuple[str, bool], dict[bytes, int]] = {}  # -> topic -> replica id
        self._sockets: dict[tuple[str, bool], zmq.asyncio.Socket] = {}
        self._tasks: dict[tuple[str, bool], asyncio.Task] = {}
        self._replay_tasks: set[asyncio.Task] = set()
        self._started = False
        for s in sources:
            self._register(s)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._started = True
        for key in list(self._by_endpoint):
            self._open(key)

    async def close(self) -> None:
        self._started = False
        tasks = [*self._tasks.values(), *self._replay_tasks]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, zmq.ZMQError):
                await t
        for s in self._sockets.values():
            s.close(linger=0)
        self._tasks.clear()
        self._sockets.clear()
        self._replay_tasks.clear()

    def add_source(self, source: EventSource) -> None:
        """Start receiving another replica's events (at run time)."""
        key = self._register(source)
        if self._started:
            if key in self._sockets:
                self._sockets[key].setsockopt(zmq.SUBSCRIBE, source.topic.encode())
            else:
                self._open(key)

    def remove_source(self, replica_id: int) -> None:
        st = self._states.pop(replica_id, None)
        if st is None:
            return
        key = (st.source.endpoint, st.source.bind)
        topics = self._by_endpoint.get(key, {})
        topics.pop(st.source.topic.encode(), None)
        sock = self._sockets.get(key)
        if sock is not None and not any(t == st.source.topic.encode() for t in topics):
            try:
                sock.setsockopt(zmq.UNSUBSCRIBE, st.source.topic.encode())
            except zmq.ZMQError:
                pass

    def reset(self, replica_id: int) -> None:
        """Forget the replica's sequence (it restarted, as health checks or its start time show):
        its next batch is taken as a first one, and its replay socket asked for what it holds."""
        st = self._states.get(replica_id)
        if st is not None and not st.replaying:
            st.last = None

    def stats(self) -> dict[int, dict[str, Any]]:
        return {rid: {"last_seq": s.last, "batches": s.batches, "events": s.events, "gaps": s.gaps,
                      "replays": s.replays, "resyncs": s.resyncs, "decode_errors": s.decode_errors,
                      "last_batch_age_s": None if s.last_at is None else round(time.monotonic() - s.last_at, 3)}
                for rid, s in self._states.items()}

    def _register(self, s: EventSource) -> tuple[str, bool]:
        if s.replica_id in self._states:
            raise ValueError(f"replica {s.replica_id} already has an event source")
        key = (s.endpoint, s.bind)
        topics = self._by_endpoint.setdefault(key, {})
        tb = s.topic.encode()
        if tb in topics:
            raise ValueError(f"replicas {topics[tb]} and {s.replica_id} share topic {s.topic!r} on {s.endpoint}")
        if any(t.startswith(tb) or tb.startswith(t) for t in topics):
            # ZMQ subscriptions are prefix matches; we dispatch on the exact topic, so this is
            # only a cost (frames delivered twice to the filter), but it is almost always a typo
            log.warning("topic %r on %s is a prefix of another topic there", s.topic, s.endpoint)
        topics[tb] = s.replica_id
        self._states[s.replica_id] = _State(s)
        return key

    def _open(self, key: tuple[str, bool]) -> None:
        endpoint, bind = key
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, self._rcvhwm)
        sock.setsockopt(zmq.LINGER, 0)
        for tb in self._by_endpoint[key]:
            sock.setsockopt(zmq.SUBSCRIBE, tb)
        if bind:
            sock.bind(endpoint)
        else:
            sock.connect(endpoint)
        self._sockets[key] = sock
        self._tasks[key] = asyncio.get_running_loop().create_task(self._receive(key, sock),
                                                                   name=f"kv-events {endpoint}")

    # -- receiving --------------------------------------------------------------------------------

    async def _receive(self, key: tuple[str, bool], sock: zmq.asyncio.Socket) -> None:
        topics = self._by_endpoint[key]
        while True:
            try:
                frames = await sock.recv_multipart()
            except asyncio.CancelledError:
                raise
            except zmq.ZMQError as exc:
                if not self._started:
                    return
                log.warning("kv events: receive on %s failed: %s", key[0], exc)
                await asyncio.sleep(0.1)
                continue
            if len(frames) != 3 or len(frames[1]) != 8:
                continue
            rid = topics.get(frames[0])
            if rid is None:
                continue  # a prefix-matched topic that is not exactly ours
            st = self._states.get(rid)
            if st is not None:
                self._live(st, int.from_bytes(frames[1], "big"), frames[2])

    def _live(self, st: _State, seq: int, payload: bytes) -> None:
        if st.replaying:
            st.pending.append((seq, payload))
            return
        last = st.last
        if last is None:
            if seq > 0 and st.source.replay_endpoint:
                self._replay(st, 0, then=(seq, payload), first=True)
            else:
                self._apply(st, seq, payload)
        elif seq == last + 1:
            self._apply(st, seq, payload)
        elif seq <= last:
            # vLLM's sequence starts at 0 in every process: going back means a restart
            self._resync(st, f"event sequence went back from {last} to {seq} (replica restarted)")
            st.last = None
            self._live(st, seq, payload)
        else:
            st.gaps += 1
            if st.source.replay_endpoint:
                self._replay(st, last + 1, then=(seq, payload))
            else:
                self._resync(st, f"missed batches {last + 1}..{seq - 1} and the replica has no replay endpoint")
                self._apply(st, seq, payload)

    def _apply(self, st: _State, seq: int, payload: bytes) -> None:
        st.last = seq
        st.last_at = time.monotonic()
        try:
            _, events, _ = decode_batch(payload)
        except EventDecodeError as exc:
            st.decode_errors += 1
            if st.decode_errors in (1, 10, 100, 1000):
                log.warning("kv events from replica %d: batch %d undecodable (%s); %d so far",
                            st.source.replica_id, seq, exc, st.decode_errors)
            return
        st.batches += 1
        st.events += len(events)
        if events:
            self._on_events(st.source.replica_id, seq, events)

    def _resync(self, st: _State, why: str) -> None:
        st.resyncs += 1
        log.warning("kv events from replica %d: %s; forgetting what it held", st.source.replica_id, why)
        self._on_resync(st.source.replica_id, why)

    # -- replay -------------------------------------------------------------------------------------

    def _replay(self, st: _State, start: int, then: tuple[int, bytes], first: bool = False) -> None:
        st.replaying = True
        st.pending = [then]
        st.replays += 1
        t = asyncio.get_running_loop().create_task(self._do_replay(st, start, first))
        self._replay_tasks.add(t)
        t.add_done_callback(self._replay_tasks.discard)

    async def _do_replay(self, st: _State, start: int, first: bool) -> None:
        got: list[tuple[int, bytes]] = []
        ok = False
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        try:
            dealer.connect(st.source.replay_endpoint)  # type: ignore[arg-type]
            await dealer.send_multipart((b"", start.to_bytes(8, "big")))
            deadline = time.monotonic() + self.replay_timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not await dealer.poll(left * 1000):
                    break
                frames = await dealer.recv_multipart()
                # vLLM >= 0.26: [b"", topic, seq8, payload]; <= 0.25: [b"", seq8, payload]
                if len(frames) == 4:
                    seq_b, payload = frames[2], frames[3]
                elif len(frames) == 3:
                    seq_b, payload = frames[1], frames[2]
                else:
                    continue
                if seq_b == END_OF_REPLAY:
                    ok = True
                    break
                got.append((int.from_bytes(seq_b, "big"), payload))
        except zmq.ZMQError as exc:
            log.warning("kv events: replay from %s failed: %s", st.source.replay_endpoint, exc)
        finally:
            dealer.close(linger=0)
            self._finish_replay(st, start, got, ok, first)

    def _finish_replay(self, st: _State, start: int, got: list[tuple[int, bytes]], ok: bool, first: bool) -> None:
        if self._states.get(st.source.replica_id) is not st:
            return  # removed meanwhile
        batches = sorted({seq: p for seq, p in [*got, *st.pending]}.items())
        st.pending = []
        st.replaying = False
        if not ok:
            self._resync(st, f"replay from {st.source.replay_endpoint} did not finish in {self.replay_timeout:g} s")
        elif not first and (not got or got[0][0] > start):
            self._resync(st, f"replay buffer no longer holds batch {start}")
        elif first and got and got[0][0] > 0:
            log.info("kv events from replica %d: replay starts at batch %d; older cache contents unknown",
                     st.source.replica_id, got[0][0])
        for seq, payload in batches:
            if st.last is not None and seq <= st.last:
                continue
            self._apply(st, seq, payload)


def sources_from_kv_event_sources(replica_id: int, replica_url: str, body: Any) -> list[EventSource]:
    """Event sources from vLLM's ``GET /kv_event_sources`` (``{dp_rank: KVEventsConfig}``).

    The replica reports the endpoints it bound (vLLM 0.33 resolves ``tcp://*:0`` to the port it
    got). Wildcard hosts become the replica's own host; an endpoint on another host is one the
    replica *connects* to (a subscriber elsewhere binds it) and cannot be subscribed to from here.
    """
    from urllib.parse import urlsplit

    host = urlsplit(replica_url).hostname or "127.0.0.1"
    out: list[EventSource] = []
    if not isinstance(body, dict):
        return out
    for _, cfg in sorted(body.items(), key=lambda kv: str(kv[0])):
        if not isinstance(cfg, dict) or not cfg.get("enable_kv_cache_events"):
            continue
        ep = cfg.get("endpoint")
        if not isinstance(ep, str):
            continue
        ep = _reachable(ep, host)
        if ep.startswith("tcp://") and urlsplit(ep.replace("tcp://", "http://", 1)).hostname not in (host, "localhost"):
            continue
        replay = cfg.get("replay_endpoint")
        out.append(EventSource(replica_id, ep, str(cfg.get("topic") or ""),
                               _reachable(replay, host) if isinstance(replay, str) else None, bind=False))
    return out


def _reachable(endpoint: str, host: str) -> str:
    for wild in ("tcp://*:", "tcp://0.0.0.0:", "tcp://[::]:"):
        if endpoint.startswith(wild):
            return f"tcp://{host}:{endpoint[len(wild):]}"
    return endpoint
