"""Smoke test of the real-vLLM fleet helper (skipped unless .venv-vllm and the tiny model exist)."""
from __future__ import annotations

import json
import os
import time
import urllib.request

import pytest

from .fleet import VllmFleet, free_port, vllm_available

pytestmark = [pytest.mark.realvllm, pytest.mark.slow]
_OK, _WHY = vllm_available()


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)


@pytest.mark.skipif(not _OK, reason=_WHY)
@pytest.mark.timeout(420)
def test_one_replica_prefix_hit_and_kv_events():
    zmq = pytest.importorskip("zmq")
    msgpack = pytest.importorskip("msgpack")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.bind(endpoint)                       # vLLM's PUB connects to a concrete-host endpoint
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVTIMEO, 3000)
    fleet = VllmFleet(1, num_gpu_blocks_override=80, kv_events_endpoint=endpoint)
    try:
        with fleet:
            url = fleet.urls[0]
            # A bound SUB only sends its subscription to a newly connected PUB when the SUB
            # socket processes commands (any recv/poll). Without this, vLLM's PUB drops seq 0.
            sub.poll(100)
            prompt = " ".join(["alpha beta gamma delta"] * 30)
            body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": 1, "temperature": 0}
            first = _post(url + "/v1/completions", body)["usage"]
            second = _post(url + "/v1/completions", body)["usage"]
            n = first["prompt_tokens"]
            assert first["prompt_tokens_details"]["cached_tokens"] == 0
            assert second["prompt_tokens_details"]["cached_tokens"] == (n - 1) // 32 * 32
            topic, seq, payload = sub.recv_multipart()
            assert topic == b"replica-0" and int.from_bytes(seq, "big") == 0
            _ts, events, _rank = msgpack.unpackb(payload)
            assert events[0]["type"] == "BlockStored" and len(events[0]["block_hashes"]) == n // 32
            pgid = fleet.replicas[0].pgid
        # stopped: the whole process group is gone
        time.sleep(0.5)
        with pytest.raises(ProcessLookupError):
            os.killpg(pgid, 0)
    finally:
        fleet.stop()
        sub.close(0)
        ctx.term()
