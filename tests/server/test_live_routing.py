"""Routing against the emulated vLLM fleet: what users of cache-aware routers ask for."""

from __future__ import annotations

import asyncio
import collections
import dataclasses

import aiohttp
import pytest

from prefixlb.config import config_from_flags
from prefixlb.emulator.fleet import EmulatedFleet
from prefixlb.server import Balancer

from .support import metric, run, wait_for

SYSTEMS = [f"You are assistant number {k}. Follow the house style guide section {k}. " * 30 for k in range(8)]


async def start(urls, **changes):
    cfg = dataclasses.replace(config_from_flags(urls, port=0), health_interval_s=0.2, scrape_interval_s=0.1,
                              admin_token="secret-token", **changes)
    b = Balancer(cfg)
    await b.start()
    return b


async def chat(s, base, system, user, **extra):
    body = {"model": "auto", "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "max_tokens": 4} | extra
    async with s.post(base + "/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        j = await r.json()
        return r.headers["x-prefixlb-replica"], j["usage"]


def test_shared_prefixes_stick_and_unrelated_prompts_spread():
    async def main():
        async with EmulatedFleet(replicas=4, profile="cpu-tiny-llama", time_scale=5) as fleet:
            b = await start(fleet.urls)
            base = f"http://127.0.0.1:{b.port}"
            try:
                placed = collections.defaultdict(list)
                cached = []
                async with aiohttp.ClientSession() as s:
                    for round_ in range(5):  # tenants interleaved, 8 at a time
                        res = await asyncio.gather(*(chat(s, base, SYSTEMS[k], f"question {round_}-{k}")
                                                     for k in range(8)))
                        for k, (url, usage) in enumerate(res):
                            placed[k].append(url)
                            if round_ > 0:
                                cached.append(usage["prompt_tokens_details"]["cached_tokens"])
                modal = [collections.Counter(v).most_common(1)[0][1] / len(v) for v in placed.values()]
                owners = {collections.Counter(v).most_common(1)[0][0] for v in placed.values()}
                assert sum(modal) / len(modal) >= 0.8, placed  # each tenant stays on its replica
                assert len(owners) >= 3, placed  # and tenants spread over the fleet
                assert sum(c > 0 for c in cached) >= 0.8 * len(cached)  # the replicas' own counters agree
            finally:
                await b.stop()

    run(main(), timeout=120)


def test_a_replica_made_hot_by_other_traffic_gets_no_new_cold_work():
    """Load the balancer did not send (another balancer, direct clients) shows up in the
    replica's /metrics; fresh scrapes steer cold work away from it."""

    async def main():
        async with EmulatedFleet(replicas=3, profile="a10g-llama3-8b", time_scale=1) as fleet:
            b = await start(fleet.urls)
            base = f"http://127.0.0.1:{b.port}"
            hot = fleet.urls[0]
            try:
                async with aiohttp.ClientSession() as s:
                    async def direct(i):
                        body = {"model": "llama-3.1-8b", "prompt": f"bulk {i} " * 3000, "max_tokens": 64,
                                "ignore_eos": True}
                        async with s.post(hot + "/v1/completions", json=body) as r:
                            await r.read()

                    flood = [asyncio.create_task(direct(i)) for i in range(12)]
                    rep = b.tiers["default"].router.replicas[0]
                    assert await wait_for(lambda: rep.scraped_waiting + rep.scraped_running >= 6, timeout=10)
                    chosen = [ (await chat(s, base, f"cold tenant {k} " * 40, "hi"))[0] for k in range(6)]
                    assert hot not in chosen, chosen
                    for t in flood:
                        t.cancel()
                    await asyncio.gather(*flood, return_exceptions=True)
            finally:
                await b.stop()

    run(main(), timeout=120)


def test_the_openai_client_works_through_the_balancer():
    openai = pytest.importorskip("openai")

    async def main():
        async with EmulatedFleet(replicas=2, profile="cpu-tiny-llama", time_scale=10) as fleet:
            b = await start(fleet.urls)
            try:
                client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{b.port}/v1", api_key="unused", max_retries=0)
                models = await client.models.list()
                assert {"auto", "default"} <= {m.id for m in models.data}
                msgs = [{"role": "system", "content": SYSTEMS[0]}, {"role": "user", "content": "hi"}]
                r = await client.chat.completions.create(model="auto", messages=msgs, max_tokens=5)
                assert r.choices[0].message.content and r.usage.completion_tokens == 5
                r2 = await client.chat.completions.create(model="auto", messages=msgs, max_tokens=5)
                assert r2.usage.prompt_tokens_details.cached_tokens > 0
                chunks = [c async for c in await client.chat.completions.create(
                    model="auto", messages=msgs, max_tokens=6, stream=True, stream_options={"include_usage": True})]
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                assert text and chunks[-1].usage.completion_tokens == 6
                c = await client.completions.create(model="default", prompt="Once upon a time", max_tokens=3)
                assert c.choices[0].text and c.usage.completion_tokens == 3
                stream = await client.completions.create(model="auto", prompt="abc " * 50, max_tokens=4, stream=True)
                assert len([x async for x in stream]) >= 4
                with pytest.raises(openai.NotFoundError):
                    await client.completions.create(model="missing", prompt="x", max_tokens=1)
                await client.close()
            finally:
                await b.stop()

    run(main(), timeout=120)


async def _stream(s, base, text, timeout=None):
    body = {"model": "auto", "messages": [{"role": "user", "content": text}], "max_tokens": 4, "stream": True}
    async with s.post(base + "/v1/chat/completions", json=body,
                      timeout=aiohttp.ClientTimeout(total=timeout)) as r:
        assert r.status == 200, await r.text()
        return await r.read()


async def _waits(s, base, outcome):
    async with s.get(base + "/metrics") as r:
        text = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("prefixlb_admission_waits_total{") and f'outcome="{outcome}"' in line)


def _admission_config(urls, share, max_wait):
    cfg = config_from_flags(urls, port=0)
    t = cfg.tiers[0]
    t = dataclasses.replace(t, cost=dataclasses.replace(t.cost, admit_share=share, admit_max_wait_s=max_wait))
    return dataclasses.replace(cfg, tiers=(t,), health_interval_s=0.2, scrape_interval_s=0.1,
                               admin_token="secret-token")


def test_admission_holds_requests_at_the_balancer_and_releases_them_as_prefills_come_back():
    """Streamed requests beyond the replica's budget of outstanding prefill wait at the balancer
    and go as first bytes come back; every one is answered, a client that leaves while held
    takes nothing with it, a wait past admit_max_wait_s goes anyway, and the gauges return to 0."""
    async def main():
        async with EmulatedFleet(replicas=1, profile="h100-llama3-8b", time_scale=1) as fleet:
            b = Balancer(_admission_config(fleet.urls, 0.1, 30.0))  # 819 tokens outstanding at most
            await b.start()
            base = f"http://127.0.0.1:{b.port}"
            try:
                async with aiohttp.ClientSession() as s:
                    texts = [f"<{k}> " + "lorem ipsum dolor sit amet " * 90 for k in range(8)]  # ~600 tokens
                    await asyncio.gather(*(_stream(s, base, t) for t in texts))
                    assert await _waits(s, base, "admitted") >= 3
                    # one long prefill outstanding; a second long one is held, and its client leaves
                    long = asyncio.ensure_future(_stream(s, base, "<L> " + "lorem ipsum " * 3000))
                    await asyncio.sleep(0.02)
                    with pytest.raises(asyncio.TimeoutError):
                        await _stream(s, base, "<M> " + "lorem ipsum " * 3000, timeout=0.05)
                    await long
                    assert await wait_for(lambda: not b.tiers["default"].held)
                    assert await _waits(s, base, "cancelled") >= 1
                    state = b.tiers["default"].router.replicas
                    assert await wait_for(lambda: all(r.inflight == 0 and r.pending_prefill == 0
                                                      for r in state.values()))
                    assert await metric(s, base, "prefixlb_pending_prefill_tokens") == 0
                    assert await metric(s, base, "prefixlb_admission_held_requests") == 0
            finally:
                await b.stop()
            # a wait longer than admit_max_wait_s: the request goes anyway
            b = Balancer(_admission_config(fleet.urls, 0.01, 0.01))
            await b.start()
            base = f"http://127.0.0.1:{b.port}"
            try:
                async with aiohttp.ClientSession() as s:
                    await asyncio.gather(*(_stream(s, base, f"<T{k}> " + "lorem ipsum " * 2000) for k in range(3)))
                    assert await _waits(s, base, "timeout") >= 1
            finally:
                await b.stop()

    run(main(), timeout=60)
