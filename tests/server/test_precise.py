"""Precise mode end to end: emulated vLLM replicas publish KV events, the balancer follows them.

The fleet's caches are small (40 blocks of 16 tokens per replica) and the workload's documents
do not fit, so replicas evict continually. In precise mode the balancer's index must agree
with what each replica holds, so its predicted cached tokens equal what the replicas report;
approximate mode, on the same traffic, cannot see the evictions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random

import aiohttp

from prefixlb.config import Config, PreciseConfig, ReplicaConfig, TierConfig
from prefixlb.emulator import EmulatedFleet
from prefixlb.server import Balancer

from .support import metric, post, wait_for

FLEET = dict(profile="cpu-tiny-llama", block_size=16, num_gpu_blocks=40, max_model_len=512, time_scale=20.0,
             kv_events_endpoint="tcp://127.0.0.1:*", kv_replay_endpoint="tcp://127.0.0.1:*")


def documents(n: int = 10, tokens: int = 96) -> list[str]:
    rng = random.Random(7)
    words = "cache block prefix replica token router vllm model serve answer question batch".split()
    return [f"doc{i} " + " ".join(rng.choice(words) for _ in range(tokens)) for i in range(n)]


async def drive(base: str, n: int = 60) -> list[int]:
    docs = documents()
    rng = random.Random(1)
    cached = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as s:
        for i in range(n):
            prompt = rng.choice(docs) + f" question {i}?"
            status, _, body = await post(s, base + "/v1/completions",
                                         {"model": "auto", "prompt": prompt, "max_tokens": 1})
            assert status == 200, body
            import orjson

            cached.append(orjson.loads(body)["usage"]["prompt_tokens_details"]["cached_tokens"])
            await asyncio.sleep(0.03)  # the step's events reach the balancer before the next decision
    return cached


def config(urls: list[str], precise: bool, tokenizer: str = "byte") -> Config:
    tier = TierConfig(name="default", model=None, replicas=tuple(ReplicaConfig(u) for u in urls),
                      precise=PreciseConfig(tokenizer, block_size=16, speculative_grace_s=0.3, discover=True)
                      if precise else None)
    return dataclasses.replace(Config(tiers=(tier,), port=0), health_interval_s=0.1, scrape_interval_s=0.2,
                               admin_token="t")


async def run_mode(precise: bool, tokenizer: str = "byte") -> dict:
    async with EmulatedFleet(2, **FLEET) as fleet:
        b = Balancer(config(fleet.urls, precise, tokenizer))
        await b.start()
        try:
            base = f"http://127.0.0.1:{b.port}"
            actual = await drive(base)
            async with aiohttp.ClientSession() as s:
                pred = await metric(s, base, "prefixlb_predicted_cached_tokens_total")
                act = await metric(s, base, "prefixlb_actual_cached_tokens_total")
                events = await metric(s, base, "prefixlb_kv_events_total")
            out = {"predicted": pred, "actual": act, "events": events, "hits": sum(actual)}
            if precise:
                router = b.tiers["default"].router
                engines = {rid: fleet.replicas[i].engine for i, rid in enumerate(sorted(b.replicas))}

                def agree() -> bool:
                    return all(len(router.index.blocks(rid)) == e.kv.num_cached_hashes for rid, e in engines.items())

                out["agree"] = await wait_for(agree, timeout=3.0)
                out["index"] = {rid: len(router.index.blocks(rid)) for rid in engines}
                out["engine"] = {rid: e.kv.num_cached_hashes for rid, e in engines.items()}
            return out
        finally:
            await b.stop(0.5)


async def test_precise_index_follows_evictions_and_predicts_what_replicas_report() -> None:
    p = await run_mode(precise=True)
    assert p["events"] > 0
    assert p["agree"], (p["index"], p["engine"])
    assert abs(p["predicted"] - p["actual"]) <= 0.02 * max(p["actual"], 1), p
    a = await run_mode(precise=False)
    # approximate mode believes evicted prefixes are still there
    assert abs(a["predicted"] - a["actual"]) > abs(p["predicted"] - p["actual"]), (a, p)


async def test_precise_mode_with_the_replicas_own_tokenizer_endpoint() -> None:
    """No local tokenizer: each prompt's ids come from a replica's /tokenize."""
    p = await run_mode(precise=True, tokenizer="replica")
    assert p["agree"], (p["index"], p["engine"])
    assert abs(p["predicted"] - p["actual"]) <= 0.02 * max(p["actual"], 1), p


async def test_two_instances_agree_and_dry_run_route() -> None:
    """Two balancers (as two pods) in front of the same replicas, both following their events:
    requests alternate between them, and before each one the *other* instance is asked (without
    sending) where it would route it. They agree because they see the same caches and break
    ties by the prompt, not by a private random draw."""
    import orjson

    async with EmulatedFleet(2, **FLEET) as fleet:
        cfg = config(fleet.urls, precise=True)
        a, b = Balancer(cfg), Balancer(cfg)
        await a.start()
        await b.start()
        try:
            bases = [f"http://127.0.0.1:{x.port}" for x in (a, b)]
            auth = {"authorization": "Bearer t"}
            docs = documents()
            rng = random.Random(3)
            same = total = 0
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as s:
                status, _, _ = await post(s, bases[0] + "/admin/route", {"prompt": "x", "chat": False})
                assert status == 401  # admin needs the token
                async with s.get(bases[0] + "/livez") as r:
                    assert r.status == 200
                for i in range(40):
                    prompt = rng.choice(docs) + f" question {i}?"
                    body = {"model": "auto", "prompt": prompt, "max_tokens": 1}
                    here, other = bases[i % 2], bases[1 - i % 2]
                    st1, _, shadow = await post(s, other + "/admin/route", {**body, "chat": False}, headers=auth)
                    assert st1 == 200, shadow
                    st2, hdrs, _ = await post(s, here + "/v1/completions", body)
                    assert st2 == 200
                    total += 1
                    same += orjson.loads(shadow)["url"] == hdrs.get("x-prefixlb-replica", hdrs.get("X-Prefixlb-Replica"))
                    await asyncio.sleep(0.03)
            assert same / total >= 0.9, (same, total)
        finally:
            await a.stop(0.5)
            await b.stop(0.5)


async def test_peer_sync_instances_share_placements_in_approximate_mode() -> None:
    """Without KV events, an instance only learns the caches from its own routing; with peer sync
    it also learns its peers', so a prefix placed through A is found through B."""
    from prefixlb.config import PeersConfig

    async with EmulatedFleet(2, **FLEET) as fleet:
        base_cfg = dataclasses.replace(config(fleet.urls, precise=False),
                                       peers=PeersConfig("tcp://127.0.0.1:*"))
        a, b = Balancer(base_cfg), Balancer(base_cfg)
        await a.start()
        await b.start()
        try:
            a.peers.connect(b.peers.bind_endpoint)
            b.peers.connect(a.peers.bind_endpoint)
            await asyncio.sleep(0.3)  # subscriptions settle (ZMQ slow joiner)
            docs = documents()
            placed = {}
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as s:
                for k, doc in enumerate(docs[:6]):  # first sight through A
                    st, hdrs, _ = await post(s, f"http://127.0.0.1:{a.port}/v1/completions",
                                             {"model": "auto", "prompt": doc + " first", "max_tokens": 1})
                    assert st == 200
                    placed[k] = hdrs["x-prefixlb-replica"]
                await asyncio.sleep(0.2)
                again = 0
                for k, doc in enumerate(docs[:6]):  # then through B
                    st, hdrs, body = await post(s, f"http://127.0.0.1:{b.port}/v1/completions",
                                                {"model": "auto", "prompt": doc + " second", "max_tokens": 1})
                    assert st == 200
                    again += hdrs["x-prefixlb-replica"] == placed[k]
            assert a.peers.sent > 0 and b.peers.received > 0
            assert again >= 5, (again, placed)
            assert len(b._ledger) == 0  # every peer request ended
        finally:
            await a.stop(0.5)
            await b.stop(0.5)
