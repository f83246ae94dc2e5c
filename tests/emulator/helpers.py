"""Shared helpers for the emulator tests: small fleets, HTTP calls, /metrics, a KV subscriber."""

from __future__ import annotations

import asyncio
import hashlib
import pickle
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import zmq
import zmq.asyncio
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
TINY_TOKENIZER = str(REPO / "tests" / "data" / "tiny-llama-tokenizer")
TIMEOUT = aiohttp.ClientTimeout(total=15)

#: A small, fast replica: the CPU tiny-Llama profile with a cache small enough to evict.
SMALL = dict(profile="cpu-tiny-llama", block_size=16, num_gpu_blocks=40, max_model_len=512, time_scale=20.0)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def post(
    session: aiohttp.ClientSession, url: str, body: Any, **kw: Any
) -> tuple[int, Any, aiohttp.ClientResponse]:
    async with session.post(url, json=body, **kw) as r:
        data = await r.read()
        try:
            parsed = await r.json(content_type=None) if data else None
        except ValueError:
            parsed = data.decode(errors="replace")
        return r.status, parsed, r


async def metrics(session: aiohttp.ClientSession, base: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """``{sample name: {sorted label items: value}}`` from ``GET /metrics``."""
    async with session.get(base + "/metrics") as r:
        assert r.status == 200
        text = await r.text()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def one(series: dict[tuple[tuple[str, str], ...], float], **labels: str) -> float:
    """The value of the series whose labels include ``labels``."""
    hits = [v for k, v in series.items() if all((n, val) in k for n, val in labels.items())]
    assert len(hits) == 1, (labels, series)
    return hits[0]


async def wait_for(predicate: Any, timeout: float = 5.0, interval: float = 0.02) -> Any:
    """Poll an async or sync predicate until truthy; fail after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        v = predicate()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return v
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


# -- vLLM's hash chain, written out independently of prefixlb.engine --------------------------------


def _sha(x: Any) -> bytes:
    return hashlib.sha256(pickle.dumps(x, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def vllm_block_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """sha256 chain with NONE_HASH = sha256(pickle("vllm-none-hash")), low 64 bits per block."""
    parent, out = _sha("vllm-none-hash"), []
    for i in range(0, len(token_ids) - len(token_ids) % block_size, block_size):
        parent = _sha((parent, tuple(token_ids[i : i + block_size]), None))
        out.append(int.from_bytes(parent, "big") & (2**64 - 1))
    return out


# -- KV-event subscriber ----------------------------------------------------------------------------


class Subscriber:
    """A SUB socket collecting ``(topic, seq, payload)`` frames in a background task."""

    def __init__(self, ctx: zmq.asyncio.Context) -> None:
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.setsockopt(zmq.LINGER, 0)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.frames: list[tuple[bytes, bytes, bytes]] = []
        self._task: asyncio.Task[None] | None = None
        self._handshakes = 0

    def bind(self, endpoint: str) -> str:
        self.sock.bind(endpoint)
        return self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def connect(self, endpoint: str) -> None:
        self.sock.connect(endpoint)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            assert len(frames) == 3, frames
            self.frames.append((frames[0], frames[1], frames[2]))

    async def ready(self, publishers: int = 1, timeout: float = 5.0) -> None:
        """Wait until ``publishers`` peers completed the handshake, then let subscriptions flow."""
        while self._handshakes < publishers:
            await asyncio.wait_for(self.monitor.recv_multipart(), timeout)
            self._handshakes += 1
        await asyncio.sleep(0.15)  # the subscription reaches the PUB after the handshake

    def batches(self, topic: bytes | None = None) -> list[tuple[int, float, list[dict[str, Any]], Any]]:
        """Decoded ``(seq, ts, events, dp_rank)`` per frame (optionally of one topic)."""
        out = []
        for t, seq, payload in self.frames:
            if topic is not None and t != topic:
                continue
            ts, events, rank = msgpack.unpackb(payload)
            out.append((int.from_bytes(seq, "big"), ts, events, rank))
        return out

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, zmq.ZMQError):
                pass
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(0)


def events_of(batches: Iterable[tuple[int, float, list[dict[str, Any]], Any]]) -> list[dict[str, Any]]:
    return [e for _, _, evs, _ in batches for e in evs]
