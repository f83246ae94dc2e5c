"""prefixlb serve in front of real vLLM (CPU build, tiny Llama): the balancer learns the served
model from /v1/models and the KV capacity from vllm:cache_config_info, keeps each shared prefix
on one replica, and vLLM's own cached_tokens confirm the hits. Skipped without the vLLM venv."""

from __future__ import annotations

import asyncio
import collections
import dataclasses

import aiohttp
import pytest

from prefixlb.config import config_from_flags
from prefixlb.server import Balancer

from .fleet import VllmFleet, vllm_available

pytestmark = [pytest.mark.realvllm, pytest.mark.slow]
_OK, _WHY = vllm_available()

WORDS = "alpha beta gamma delta epsilon cache prefix router replica token block".split()


def system_prompt(k: int) -> str:
    return f"Tenant {k} house rules. " + " ".join(WORDS[(k * 7 + i) % len(WORDS)] for i in range(300))


@pytest.mark.skipif(not _OK, reason=_WHY)
@pytest.mark.timeout(600)
def test_prefixlb_in_front_of_two_real_vllm_replicas():
    fleet = VllmFleet(2, num_gpu_blocks_override=400)
    with fleet:
        asyncio.run(asyncio.wait_for(_exercise(fleet.urls), 240))


async def _exercise(urls: list[str]) -> None:
    cfg = dataclasses.replace(config_from_flags(urls, port=0), health_interval_s=0.5, scrape_interval_s=0.3)
    b = Balancer(cfg)
    await b.start()
    base = f"http://127.0.0.1:{b.port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
            async with s.get(base + "/v1/models") as r:
                ids = {m["id"] for m in (await r.json())["data"]}
            assert {"tiny-llama", "auto", "default"} <= ids

            placed = collections.defaultdict(list)
            cached = []
            for round_ in range(4):
                for k in range(4):  # tenants interleaved, each turn after the previous finished
                    body = {"model": "auto", "max_tokens": 4, "ignore_eos": True, "temperature": 0,
                            "messages": [{"role": "system", "content": system_prompt(k)},
                                         {"role": "user", "content": f"question {round_} for tenant {k}"}]}
                    async with s.post(base + "/v1/chat/completions", json=body) as r:
                        assert r.status == 200, await r.text()
                        j = await r.json()
                        placed[k].append(r.headers["x-prefixlb-replica"])
                        if round_:
                            cached.append(j["usage"]["prompt_tokens_details"]["cached_tokens"])
            for k, where in placed.items():
                assert collections.Counter(where).most_common(1)[0][1] >= 3, (k, where)  # stays on its cache
            assert len({collections.Counter(w).most_common(1)[0][0] for w in placed.values()}) == 2  # spread
            assert sum(c > 0 for c in cached) >= 0.75 * len(cached), cached  # vLLM's own counters agree

            body = {"model": "tiny-llama", "prompt": system_prompt(1), "max_tokens": 5, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}
            async with s.post(base + "/v1/completions", json=body) as r:
                assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
                text = await r.text()
            assert text.rstrip().endswith("data: [DONE]") and '"usage"' in text

            async with s.get(base + "/metrics") as r:
                metrics = await r.text()
            assert "prefixlb_actual_cached_tokens_total" in metrics

        router = b.tiers["default"].router
        # learned from vllm:cache_config_info: 400 blocks x 32 tokens
        assert all(st.capacity_tokens == 400 * 32 for st in router.replicas.values())
    finally:
        await b.stop()
