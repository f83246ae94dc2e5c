"""PeerSync's transport: every message of a burst arrives (more than one wake-up's batch), bad
frames are counted and skipped, an instance ignores its own messages."""

from __future__ import annotations

import asyncio

import msgpack
import zmq

from prefixlb.server.peers import PeerSync


async def _wait(cond, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.01)


async def test_a_burst_larger_than_a_batch_is_applied_whole_and_bad_frames_are_skipped() -> None:
    got_a: list[list] = []
    got_b: list[list] = []
    a = PeerSync("tcp://127.0.0.1:*", [], got_a.append)
    b = PeerSync("tcp://127.0.0.1:*", [], got_b.append)
    await a.start()
    await b.start()
    try:
        a.connect(b.bind_endpoint)
        b.connect(a.bind_endpoint)
        # PUB/SUB drops what is sent before the subscription reaches the publisher: probe first
        loop = asyncio.get_running_loop()
        end = loop.time() + 5
        while not got_b:
            assert loop.time() < end, "peers never connected"
            a.publish("finished", "t", "http://r", 0)
            await asyncio.sleep(0.02)
        got_b.clear()
        await asyncio.sleep(0.1)
        got_b.clear()
        n = PeerSync.BATCH * 3 + 7
        for i in range(n):
            a.publish("first_token", "tier", "http://r", i + 1)
        a.publish("failed", "tier", "http://r", n + 1)
        await _wait(lambda: len(got_b) == n + 1)
        assert [m[2] for m in got_b] == list(range(1, n + 2))  # in order, none lost
        assert {m[0] for m in got_b[:-1]} == {1} and got_b[-1][0] == 3
        assert not got_a  # a never applies its own messages
        assert a.sent >= n + 1 and b.received >= n + 1

        # a foreign publisher sending garbage: counted and skipped, the good message after it applied
        raw = zmq.Context.instance().socket(zmq.PUB)
        raw.setsockopt(zmq.LINGER, 0)
        port = raw.bind_to_random_port("tcp://127.0.0.1")
        b.connect(f"tcp://127.0.0.1:{port}")
        got_b.clear()
        end = loop.time() + 5
        while b.errors == 0:
            assert loop.time() < end, "garbage never arrived"
            raw.send(b"\xc1 not msgpack")
            await asyncio.sleep(0.02)
        raw.send(msgpack.packb([2, 12345, 99, "tier", "http://r"]))
        await _wait(lambda: any(m[2] == 99 for m in got_b))
        raw.close(0)
    finally:
        await a.close()
        await b.close()
