"""The quality model in the loop: only with ``expose_quality`` do responses carry its outcome."""

from __future__ import annotations

import aiohttp

from prefixlb.emulator import EmulatedFleet

from .helpers import SMALL, TIMEOUT, post


def parse(header: str) -> dict[str, float]:
    return {k: float(v) for k, v in (part.split("=") for part in header.split("; "))}


async def test_quality_header_only_when_asked_and_deterministic() -> None:
    body = {"messages": [{"role": "user", "content": "What is 17 * 23?"}], "max_tokens": 3}
    async with (
        EmulatedFleet(
            1,
            **{**SMALL, "profile": "h100-llama3-8b", "block_size": 16, "num_gpu_blocks": 2048, "max_model_len": 4096},
            expose_quality=True,
        ) as fleet,
        aiohttp.ClientSession(timeout=TIMEOUT) as s,
    ):
        url = fleet.urls[0] + "/v1/chat/completions"
        _, _, r1 = await post(s, url, body)
        _, _, r2 = await post(s, url, body)
        _, streamed, r3 = await post(s, url, {**body, "stream": True})
    q = parse(r1.headers["x-emulator-quality"])
    assert set(q) == {"correct", "difficulty", "skill", "p_correct", "confidence"}
    assert q["correct"] in (0.0, 1.0) and 0 <= q["difficulty"] <= 1 and 0 < q["confidence"] < 1
    assert q["skill"] == 0.694  # the profile's skill
    assert r2.headers["x-emulator-quality"] == r1.headers["x-emulator-quality"]  # same prompt, same outcome
    # streams: a comment line before [DONE] (headers leave before the answer exists)
    assert "x-emulator-quality" not in r3.headers
    assert f": x-emulator-quality: {r1.headers['x-emulator-quality']}\n\ndata: [DONE]" in streamed


async def test_no_quality_header_by_default() -> None:
    async with EmulatedFleet(1, **SMALL) as fleet, aiohttp.ClientSession(timeout=TIMEOUT) as s:
        _, _, r = await post(s, fleet.urls[0] + "/v1/completions", {"prompt": "x", "max_tokens": 1})
    assert "x-emulator-quality" not in r.headers
