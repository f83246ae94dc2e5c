"""Requests that end early: client disconnects abort in the engine; shutdown; ``/load``."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from prefixlb.emulator import EmulatedFleet

from .helpers import SMALL, TIMEOUT, metrics, one, post, wait_for

LONG = {"prompt": "write a long answer", "max_tokens": 400, "ignore_eos": True}


@pytest.mark.async_timeout(20)
async def test_client_disconnect_mid_stream_aborts_the_request() -> None:
    async with EmulatedFleet(1, **{**SMALL, "time_scale": 1.0}) as fleet, aiohttp.ClientSession(timeout=TIMEOUT) as s:
        url = fleet.urls[0]
        session = aiohttp.ClientSession(timeout=TIMEOUT)
        r = await session.post(url + "/v1/completions", json={**LONG, "stream": True})
        for _ in range(3):
            assert (await r.content.readline()).startswith(b"data: {")
            await r.content.readline()
        m = await metrics(s, url)
        assert one(m["vllm:num_requests_running"]) == 1
        r.close()  # drop the connection mid-stream
        await session.close()

        async def settled() -> bool:
            m = await metrics(s, url)
            return (
                one(m["vllm:num_requests_running"]) == 0
                and one(m["vllm:request_success_total"], finished_reason="abort") == 1
            )

        await wait_for(settled)
        assert not fleet.replicas[0].engine.has_unfinished()
        m = await metrics(s, url)
        assert one(m["vllm:request_success_total"], finished_reason="length") == 0
        assert 3 <= one(m["vllm:generation_tokens_total"]) < 400


@pytest.mark.async_timeout(20)
async def test_client_timeout_on_a_non_streaming_request_aborts_it() -> None:
    async with EmulatedFleet(1, **{**SMALL, "time_scale": 1.0}) as fleet, aiohttp.ClientSession(timeout=TIMEOUT) as s:
        url = fleet.urls[0]
        with pytest.raises(asyncio.TimeoutError):
            await post(s, url + "/v1/completions", LONG, timeout=aiohttp.ClientTimeout(total=0.2))

        async def aborted() -> bool:
            return one((await metrics(s, url))["vllm:request_success_total"], finished_reason="abort") == 1

        await wait_for(aborted)
        m = await metrics(s, url)
        assert one(m["vllm:num_requests_running"]) == 0 and one(m["vllm:num_requests_waiting"]) == 0


async def test_load_counts_requests_in_flight() -> None:
    async with EmulatedFleet(1, **{**SMALL, "time_scale": 1.0}) as fleet, aiohttp.ClientSession(timeout=TIMEOUT) as s:
        url = fleet.urls[0]
        tasks = [asyncio.ensure_future(post(s, url + "/v1/completions", {**LONG, "max_tokens": 60})) for _ in range(3)]

        async def load() -> int:
            async with s.get(url + "/load") as r:
                return int((await r.json())["server_load"])

        async def three_in_flight() -> bool:
            return await load() == 3

        await wait_for(three_in_flight)
        results = await asyncio.gather(*tasks)
        assert [status for status, _, _ in results] == [200] * 3
        assert await load() == 0


@pytest.mark.async_timeout(20)
async def test_stop_with_requests_in_flight_answers_and_cleans_up() -> None:
    fleet = EmulatedFleet(1, **{**SMALL, "time_scale": 1.0})
    await fleet.start()
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        task = asyncio.ensure_future(post(s, fleet.urls[0] + "/v1/completions", LONG))
        await wait_for(lambda: fleet.replicas[0].engine.has_unfinished())
        t0 = asyncio.get_running_loop().time()
        await fleet.stop()
        assert asyncio.get_running_loop().time() - t0 < 3.0
        status, body, _ = await asyncio.wait_for(task, 5)
    # in-flight requests get vLLM's error shape before the port goes away
    assert status == 503 and body["error"]["type"] == "ServiceUnavailableError"
