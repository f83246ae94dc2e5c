"""KV-cache events over ZMQ, received with pyzmq and decoded with plain msgpack, checked field by
field against vLLM's wire format (../shared/vllm-interfaces.md section 1)."""

from __future__ import annotations

import aiohttp
import msgpack
import zmq
import zmq.asyncio

from prefixlb.emulator import EmulatedFleet

from .helpers import SMALL, TIMEOUT, Subscriber, events_of, free_port, post, vllm_block_hashes, wait_for

STORED_KEYS = [
    "type", "block_hashes", "parent_block_hash", "token_ids", "block_size",
    "lora_id", "medium", "lora_name", "extra_keys", "group_idx", "kv_cache_spec_kind",
]  # fmt: skip
REMOVED_KEYS = ["type", "block_hashes", "medium", "group_idx"]


def words(tag: str, n: int) -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


async def test_connect_mode_stream_is_vllms_wire_format() -> None:
    """A concrete-host endpoint: the subscriber binds, every replica's PUB connects, one topic each."""
    ctx = zmq.asyncio.Context()
    sub = Subscriber(ctx)
    endpoint = sub.bind(f"tcp://127.0.0.1:{free_port()}")
    sub.start()
    try:
        async with (
            EmulatedFleet(2, **{**SMALL, "kv_events_endpoint": endpoint}) as fleet,
            aiohttp.ClientSession(timeout=TIMEOUT) as s,
        ):
            await sub.ready(publishers=2)
            url = fleet.urls[0]
            prompt = words("alpha", 40)  # ~70 tokens: 4 full blocks of 16
            _, tok, _ = await post(s, url + "/tokenize", {"prompt": prompt})
            ids = tok["tokens"]
            _, r1, _ = await post(s, url + "/v1/completions", {"prompt": prompt, "max_tokens": 1})
            # prompt + output: 20 + 30 tokens, so decode fills blocks 1 and 2 later
            _, r2, _ = await post(
                s,
                url + "/v1/completions",
                {"prompt": words("beta", 12), "max_tokens": 30, "ignore_eos": True, "return_token_ids": True},
            )
            await post(s, fleet.urls[1] + "/v1/completions", {"prompt": prompt, "max_tokens": 1})
            await wait_for(
                lambda: len(sub.batches(b"replica-1")) >= 1 and len(events_of(sub.batches(b"replica-0"))) >= 4
            )
    finally:
        await sub.close()
        ctx.term()
    topics = {t for t, _, _ in sub.frames}
    assert topics == {b"replica-0", b"replica-1"}
    for topic in topics:
        seqs = [int.from_bytes(seq, "big") for t, seq, _ in sub.frames if t == topic]
        assert seqs == list(range(len(seqs)))  # 8-byte big-endian, from 0 per replica
        assert all(len(seq) == 8 for t, seq, _ in sub.frames if t == topic)
    for _, _, payload in sub.frames:
        batch = msgpack.unpackb(payload)
        assert isinstance(batch, list) and len(batch) == 3
        ts, events, rank = batch
        assert isinstance(ts, float) and isinstance(events, list) and rank == 0
        for ev in events:
            assert isinstance(ev, dict) and next(iter(ev)) == "type"  # tagged map, "type" first
    b0 = sub.batches(b"replica-0")
    first = b0[0][2][0]
    assert list(first) == STORED_KEYS and first["type"] == "BlockStored"
    n = len(ids) // 16
    assert first["block_hashes"] == vllm_block_hashes(ids, 16)  # sha256 + "vllm-none-hash", low 64 bits
    assert all(0 <= h < 2**64 for h in first["block_hashes"])
    assert first["parent_block_hash"] is None and first["token_ids"] == ids[: n * 16]
    assert first["block_size"] == 16 and first["medium"] == "GPU" and first["group_idx"] == 0
    assert first["lora_id"] is None and first["lora_name"] is None
    assert first["extra_keys"] == [None] * n and first["kv_cache_spec_kind"] == "full_attention"
    assert r1["usage"]["prompt_tokens"] == len(ids)
    # the decode-filled blocks of the second request come in later batches, chained by parent
    ids2 = r2["choices"][0]["prompt_token_ids"] + r2["choices"][0]["token_ids"]
    stored2 = [e for e in events_of(b0[1:]) if e["type"] == "BlockStored"]
    assert len(stored2) >= 2
    chain = vllm_block_hashes(ids2[:-1], 16)  # the last sampled token never gets KV
    assert [h for e in stored2 for h in e["block_hashes"]] == chain
    for prev, ev in zip(stored2, stored2[1:]):
        assert ev["parent_block_hash"] == prev["block_hashes"][-1]
    # replica 1 computed the same prompt: same hashes under its own topic
    assert sub.batches(b"replica-1")[0][2][0]["block_hashes"] == first["block_hashes"]


async def test_bind_mode_and_block_removed_after_eviction() -> None:
    """``tcp://127.0.0.1:*`` contains a wildcard: the replica binds (an ephemeral loopback port)."""
    ctx = zmq.asyncio.Context()
    sub = Subscriber(ctx)
    cfg = {**SMALL, "num_gpu_blocks": 12, "max_model_len": 128, "kv_events_endpoint": "tcp://127.0.0.1:*"}
    try:
        async with EmulatedFleet(1, **cfg) as fleet, aiohttp.ClientSession(timeout=TIMEOUT) as s:
            url = fleet.urls[0]
            async with s.get(url + "/kv_event_sources") as r:
                sources = await r.json()
            endpoint = sources["0"]["endpoint"]
            assert endpoint.startswith("tcp://127.0.0.1:") and not endpoint.endswith("*")
            sub.connect(endpoint)
            sub.start()
            await sub.ready()
            # 11 usable blocks; 5 distinct 3-block prompts force evictions
            for k in range(5):
                status, _, _ = await post(s, url + "/v1/completions", {"prompt": words(f"p{k}x", 40), "max_tokens": 1})
                assert status == 200
            await wait_for(lambda: any(e["type"] == "BlockRemoved" for e in events_of(sub.batches())))
    finally:
        await sub.close()
        ctx.term()
    events = events_of(sub.batches())
    removed = [e for e in events if e["type"] == "BlockRemoved"]
    stored = {h for e in events if e["type"] == "BlockStored" for h in e["block_hashes"]}
    assert removed
    for e in removed:
        assert list(e) == REMOVED_KEYS and len(e["block_hashes"]) == 1 and e["medium"] == "GPU"
        assert e["block_hashes"][0] in stored  # only blocks announced before are removed
    assert sub.batches()[0][0] == 0


async def test_replay_after_a_gap_returns_the_missing_batches() -> None:
    ctx = zmq.asyncio.Context()
    sub = Subscriber(ctx)
    endpoint = sub.bind(f"tcp://127.0.0.1:{free_port()}")
    sub.start()
    replay_port = free_port()
    cfg = {**SMALL, "kv_events_endpoint": endpoint, "kv_replay_endpoint": f"tcp://127.0.0.1:{replay_port}"}
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        async with EmulatedFleet(1, **cfg) as fleet, aiohttp.ClientSession(timeout=TIMEOUT) as s:
            await sub.ready()
            for k in range(6):
                await post(s, fleet.urls[0] + "/v1/completions", {"prompt": words(f"r{k}y", 20), "max_tokens": 1})
            await wait_for(lambda: len(sub.frames) >= 6)
            # drop seq 2..4 on purpose, notice the gap at 5, replay from 2
            kept = [f for f in sub.frames if int.from_bytes(f[1], "big") not in (2, 3, 4)]
            seqs = [int.from_bytes(f[1], "big") for f in kept]
            gap_from = next(a + 1 for a, b in zip(seqs, seqs[1:]) if b != a + 1)
            assert gap_from == 2
            dealer.connect(f"tcp://127.0.0.1:{replay_port}")
            await dealer.send_multipart([b"", gap_from.to_bytes(8, "big")])
            replayed = []
            while True:
                frames = await __import__("asyncio").wait_for(dealer.recv_multipart(), 5)
                assert len(frames) == 4 and frames[0] == b""
                if frames[2] == b"\xff" * 8:
                    assert frames[1] == b"" and frames[3] == b""  # vLLM >= 0.26 end marker
                    break
                replayed.append((frames[1], frames[2], frames[3]))
    finally:
        dealer.close(0)
        await sub.close()
        ctx.term()
    live = {int.from_bytes(f[1], "big"): f for f in sub.frames}
    assert [int.from_bytes(seq, "big") for _, seq, _ in replayed] == list(range(2, len(live)))
    for topic, seq, payload in replayed:
        assert topic == b"replica-0" and live[int.from_bytes(seq, "big")] == (topic, seq, payload)


async def test_reset_prefix_cache_sends_all_blocks_cleared() -> None:
    ctx = zmq.asyncio.Context()
    sub = Subscriber(ctx)
    endpoint = sub.bind(f"tcp://127.0.0.1:{free_port()}")
    sub.start()
    try:
        async with (
            EmulatedFleet(1, **{**SMALL, "kv_events_endpoint": endpoint}) as fleet,
            aiohttp.ClientSession(timeout=TIMEOUT) as s,
        ):
            await sub.ready()
            url = fleet.urls[0]
            body = {"prompt": words("gamma", 30), "max_tokens": 1}
            await post(s, url + "/v1/completions", body)
            _, warm, _ = await post(s, url + "/v1/completions", body)
            async with s.post(url + "/reset_prefix_cache") as r:
                assert r.status == 200
            _, cold, _ = await post(s, url + "/v1/completions", body)
            await wait_for(lambda: any(e["type"] == "AllBlocksCleared" for e in events_of(sub.batches())))
    finally:
        await sub.close()
        ctx.term()
    assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    cleared = [e for e in events_of(sub.batches()) if e["type"] == "AllBlocksCleared"]
    assert cleared == [{"type": "AllBlocksCleared"}]


def test_endpoint_rule_and_per_replica_offsets() -> None:
    from prefixlb.emulator import endpoint_binds, replica_endpoint

    assert not endpoint_binds("tcp://127.0.0.1:5557")  # concrete host: the PUB connects
    assert endpoint_binds("tcp://*:5557") and endpoint_binds("tcp://127.0.0.1:*")
    assert endpoint_binds("ipc:///tmp/kv") and endpoint_binds("inproc://kv") and endpoint_binds("tcp://[::]:5557")
    assert replica_endpoint("tcp://127.0.0.1:5557", 3, binds=False) == "tcp://127.0.0.1:5557"  # one shared SUB
    assert replica_endpoint("tcp://*:5557", 3, binds=True) == "tcp://*:5560"
    assert replica_endpoint("tcp://127.0.0.1:*", 3, binds=True) == "tcp://127.0.0.1:*"
    assert replica_endpoint("ipc:///tmp/kv", 0, binds=True) == "ipc:///tmp/kv"
    assert replica_endpoint("ipc:///tmp/kv", 2, binds=True) == "ipc:///tmp/kv-2"
