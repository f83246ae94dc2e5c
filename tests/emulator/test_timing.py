"""The scaled clock: a request that costs T emulated seconds takes about T/X wall seconds."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import pytest

from prefixlb.emulator import EmulatedFleet, ScaledClock
from prefixlb.engine import Engine, EngineRequest, default_tokenizer

from .helpers import TIMEOUT, metrics, one, post

CFG = dict(profile="cpu-small-llama-88m", block_size=32, num_gpu_blocks=200, max_model_len=2048)
PROMPT = " ".join(f"tok{i}" for i in range(800))  # ~1000 tokens: ~0.35 s of prefill on this profile
BODY = {"prompt": PROMPT, "max_tokens": 4, "ignore_eos": True}


def modelled_seconds() -> float:
    """The same request on a twin engine driven by a virtual clock: its emulated latency T."""
    eng = Engine(
        CFG["profile"],
        block_size=CFG["block_size"],
        num_gpu_blocks=CFG["num_gpu_blocks"],
        max_model_len=CFG["max_model_len"],
    )
    ids = default_tokenizer().encode(PROMPT)
    eng.add_request(EngineRequest("r", ids, max_tokens=4, ignore_eos=True), 0.0)
    t = 0.0
    while eng.has_unfinished():
        res = eng.step(t)
        assert res is not None
        t = res.end
    return t


@pytest.mark.async_timeout(20)
async def test_wall_time_is_emulated_time_divided_by_the_time_scale() -> None:
    T = modelled_seconds()
    assert 0.3 < T < 1.0
    walls = {}
    for scale in (1.0, 4.0):
        async with EmulatedFleet(1, **CFG, time_scale=scale) as fleet, aiohttp.ClientSession(timeout=TIMEOUT) as s:
            url = fleet.urls[0] + "/v1/completions"
            await post(s, url, {"prompt": "warm up", "max_tokens": 1})
            t0 = time.perf_counter()
            status, body, _ = await post(s, url, BODY)
            walls[scale] = time.perf_counter() - t0
            assert status == 200 and body["usage"]["completion_tokens"] == 4
            m = await metrics(s, fleet.urls[0])
        e2e = one(m["vllm:e2e_request_latency_seconds_sum"])  # plus the short warm-up request
        assert e2e >= T and e2e - T < 0.1  # the emulated latency is the engine's, at any scale
        expected = T / scale
        assert expected * 0.95 <= walls[scale] <= expected * 1.15 + 0.03, (scale, walls[scale], expected)
    assert 3.0 < walls[1.0] / walls[4.0] < 4.6


async def test_falling_behind_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    # ~2 ms emulated steps at 2000x are 1 us of wall time each: no host keeps up with that
    caplog.set_level(logging.WARNING, logger="prefixlb.emulator")
    async with (
        EmulatedFleet(
            1,
            profile="cpu-tiny-llama",
            block_size=16,
            num_gpu_blocks=64,
            max_model_len=512,
            time_scale=2000.0,
            late_tolerance=0.0005,
        ) as fleet,
        aiohttp.ClientSession(timeout=TIMEOUT) as s,
    ):
        status, _, _ = await post(
            s, fleet.urls[0] + "/v1/completions", {"prompt": "go", "max_tokens": 300, "ignore_eos": True}
        )
        assert status == 200
        m = await metrics(s, fleet.urls[0])
    assert one(m["prefixlb_emulator_late_steps_total"]) > 0
    assert one(m["prefixlb_emulator_steps_total"]) >= 300
    assert any("falling behind" in r.getMessage() for r in caplog.records)


async def test_scaled_clock_maps_both_ways() -> None:
    clock = ScaledClock(10.0)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await clock.sleep(0.5)  # 0.05 s of wall time
    elapsed = loop.time() - t0
    assert 0.045 <= elapsed < 0.2
    assert abs(clock.wall_at(clock.now()) - loop.time()) < 1e-3
    assert clock.wall(2.0) == 0.2
    with pytest.raises(ValueError):
        ScaledClock(0.0)
