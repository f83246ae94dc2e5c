"""KV-event ingestion: both wire eras, in-order delivery, gap repair by replay, restarts.

Publishers are the emulator's (vLLM's wire format, checked byte for byte against real vLLM in
tests/emulator and tests/realvllm); every socket is on 127.0.0.1 and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import socket

import msgpack
import pytest
import zmq
import zmq.asyncio

from prefixlb.emulator.kv_events import KVEventPublisher
from prefixlb.engine import AllBlocksCleared, BlockRemoved, BlockStored
from prefixlb.fleet.kv_events import (
    AllCleared,
    EventDecodeError,
    EventSource,
    KVEventSubscriber,
    Removed,
    Stored,
    decode_batch,
    sources_from_kv_event_sources,
)


def test_decodes_vllm_033_bytes_from_the_interface_notes() -> None:
    """vllm-interfaces.md §1: the 157-byte BlockStored frame and the BlockRemoved frame."""
    stored = bytes.fromhex(
        "93cb3ff8000000000000" "91" "de0009"
        "a474797065" "ab426c6f636b53746f726564"
        "ac626c6f636b5f686173686573" "91cf137bb037547f4caf"
        "b1706172656e745f626c6f636b5f68617368" "c0"
        "a9746f6b656e5f696473" "dc0010" + "".join(f"{i:02x}" for i in range(1, 17))
        + "aa626c6f636b5f73697a65" "10"
        "a76c6f72615f6964" "c0"
        "a66d656469756d" "a3475055"
        "a96c6f72615f6e616d65" "c0"
        "a967726f75705f696478" "00"
        "00")
    assert len(stored) == 157
    ts, events, rank = decode_batch(stored)
    assert ts == 1.5 and rank == 0
    assert events == [Stored([0x137BB037547F4CAF], None, list(range(1, 17)), 16, None, "GPU", None)]
    removed = bytes.fromhex("93cb3ff8000000000000" "91" "84" "a474797065" "ac426c6f636b52656d6f766564"
                            "ac626c6f636b5f686173686573" "91cf137bb037547f4caf" "a66d656469756d" "a3475055"
                            "a967726f75705f696478" "00" "00")
    assert decode_batch(removed)[1] == [Removed([0x137BB037547F4CAF], "GPU")]
    old = bytes.fromhex("93cb3ff8000000000000" "91" "94" "ac426c6f636b52656d6f766564" "91cf137bb037547f4caf"
                        "a3475055" "00" "00")  # vLLM <= 0.23: positional arrays
    assert decode_batch(old)[1] == [Removed([0x137BB037547F4CAF], "GPU")]


def test_positional_block_stored_and_cleared_and_unknown_types() -> None:
    batch = [2.0, [["BlockStored", [1, 2], None, list(range(8)), 4, None, "GPU", None, None, None],
                   ["AllBlocksCleared"], {"type": "SomethingNew", "x": 1}], 0]
    _, events, _ = decode_batch(msgpack.packb(batch))
    assert events == [Stored([1, 2], None, list(range(8)), 4, None, "GPU", None), AllCleared()]


@pytest.mark.parametrize("payload", [b"\xc1", msgpack.packb({"a": 1}), msgpack.packb([1.0, "x", 0]),
                                     msgpack.packb([1.0, [{"type": "BlockStored", "block_hashes": 3}], 0]),
                                     msgpack.packb([1.0, [7], 0])])
def test_garbage_is_a_decode_error(payload: bytes) -> None:
    with pytest.raises(EventDecodeError):
        decode_batch(payload)


def test_partial_blocks_are_skipped() -> None:
    batch = [1.0, [{"type": "BlockStored", "block_hashes": [1], "parent_block_hash": None,
                    "token_ids": [1, 2, 3], "block_size": 16}], 0]
    assert decode_batch(msgpack.packb(batch))[1] == []


def test_sources_from_kv_event_sources() -> None:
    body = {"0": {"enable_kv_cache_events": True, "endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558",
                  "topic": "kv"},
            "1": {"enable_kv_cache_events": True, "endpoint": "tcp://10.9.9.9:6000", "topic": "x"}}
    got = sources_from_kv_event_sources(3, "http://10.0.0.7:8000", body)
    assert got == [EventSource(3, "tcp://10.0.0.7:5557", "kv", "tcp://10.0.0.7:5558", bind=False)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stored(h: int) -> BlockStored:
    return BlockStored([h], None, [h] * 4, 4)


class Sink:
    def __init__(self) -> None:
        self.seqs: dict[int, list[int]] = {}
        self.hashes: dict[int, list[int]] = {}
        self.resyncs: list[tuple[int, str]] = []

    def events(self, rid: int, seq: int, events: list) -> None:
        self.seqs.setdefault(rid, []).append(seq)
        for e in events:
            self.hashes.setdefault(rid, []).extend(getattr(e, "block_hashes", [-1]))

    def resync(self, rid: int, why: str) -> None:
        self.resyncs.append((rid, why))


async def until(pred, timeout: float = 5.0) -> None:
    end = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > end:
            raise AssertionError("timed out")
        await asyncio.sleep(0.01)


async def publisher(ctx, topic: str, replay: bool = True, port: int | None = None) -> KVEventPublisher:
    p = KVEventPublisher(ctx, f"tcp://127.0.0.1:{port or free_port()}".replace("127.0.0.1", "*", 0), topic,
                         replay_endpoint=f"tcp://127.0.0.1:{free_port()}" if replay else None)
    # a concrete-host endpoint would make the PUB connect; bind it explicitly, as vLLM does for tcp://*:P
    p.binds = True
    p.start()
    return p


async def joined(sub_sink: Sink, pub: KVEventPublisher, rid: int) -> None:
    """Publish probes until the slow-joiner SUB sees one (PUB drops until the subscription lands)."""
    for _ in range(200):
        pub.publish([stored(10_000 + pub.next_seq)])
        await asyncio.sleep(0.02)
        if sub_sink.seqs.get(rid):
            return
    raise AssertionError("subscriber never joined")


async def test_in_order_delivery_gap_replay_and_restart() -> None:
    ctx = zmq.asyncio.Context()
    sink = Sink()
    pa = await publisher(ctx, "replica-a")
    pb = await publisher(ctx, "replica-b", replay=False)
    sub = KVEventSubscriber([EventSource(0, pa.endpoint, "replica-a", pa.replay_endpoint),
                             EventSource(1, pb.endpoint, "replica-b")], sink.events, sink.resync, ctx=ctx)
    await sub.start()
    try:
        await joined(sink, pa, 0)
        await joined(sink, pb, 1)
        start_a = len(sink.seqs[0])
        # a gap on replica a: two batches published while the wire drops them (buffered for replay)
        live = pa._pub  # noqa: SLF001 - the emulator's own switch for "sent but lost"
        pa._pub = None  # noqa: SLF001
        pa.publish([stored(1)])
        pa.publish([BlockRemoved([1])])
        pa._pub = live  # noqa: SLF001
        pa.publish([stored(2)])
        await until(lambda: 2 in sink.hashes.get(0, []))
        seqs = sink.seqs[0]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # gap repaired: every seq, in order
        assert sink.hashes[0][-3:] == [1, 1, 2]
        assert len(sink.seqs[0]) == start_a + 3
        assert sub.stats()[0]["replays"] >= 1 and sub.stats()[0]["gaps"] == 1
        assert not [r for r in sink.resyncs if r[0] == 0]
        # replica b has no replay endpoint: a gap there is a resync
        live = pb._pub  # noqa: SLF001
        pb._pub = None  # noqa: SLF001
        pb.publish([stored(5)])
        pb._pub = live  # noqa: SLF001
        pb.publish([stored(6)])
        await until(lambda: 6 in sink.hashes.get(1, []))
        assert sink.resyncs == [(1, sink.resyncs[0][1])] and "no replay" in sink.resyncs[0][1]
        assert 5 not in sink.hashes[1]
        # replica a restarts: a new process, the sequence starts at 0 again, same endpoint
        for h in range(30):
            pa.publish([stored(30_000 + h)])
        await until(lambda: 30_029 in sink.hashes.get(0, []))
        ep = pa.endpoint
        await pa.close()
        pa2 = KVEventPublisher(ctx, ep, "replica-a")
        pa2.binds = True
        for _ in range(100):  # the old socket's port is released asynchronously
            try:
                pa2.start()
                break
            except zmq.ZMQError:
                await asyncio.sleep(0.05)
        try:
            for _ in range(200):
                pa2.publish([AllBlocksCleared()] if pa2.next_seq == 0 else [stored(20_000 + pa2.next_seq)])
                await asyncio.sleep(0.02)
                if any(r[0] == 0 for r in sink.resyncs):
                    break
            await until(lambda: any(r[0] == 0 for r in sink.resyncs))
            assert "restarted" in [r for r in sink.resyncs if r[0] == 0][0][1]
        finally:
            await pa2.close()
    finally:
        await sub.close()
        await pb.close()
        ctx.destroy(linger=0)


async def test_a_late_subscriber_replays_what_the_replica_buffered() -> None:
    ctx = zmq.asyncio.Context()
    sink = Sink()
    pa = await publisher(ctx, "r")
    try:
        for h in range(5):  # published before any balancer listened
            pa.publish([stored(h)])
        sub = KVEventSubscriber([EventSource(4, pa.endpoint, "r", pa.replay_endpoint)], sink.events, sink.resync,
                                ctx=ctx)
        await sub.start()
        try:
            await joined(sink, pa, 4)
            await until(lambda: len(sink.seqs[4]) >= 6)
            assert sink.seqs[4][:6] == [0, 1, 2, 3, 4, 5]
            assert sink.hashes[4][:5] == [0, 1, 2, 3, 4]
            assert sink.resyncs == []
        finally:
            await sub.close()
    finally:
        await pa.close()
        ctx.destroy(linger=0)


async def test_duplicate_topics_are_refused() -> None:
    with pytest.raises(ValueError, match="share topic"):
        KVEventSubscriber([EventSource(0, "tcp://127.0.0.1:1", "t"), EventSource(1, "tcp://127.0.0.1:1", "t")],
                          lambda *a: None, lambda *a: None)
