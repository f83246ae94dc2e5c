"""Fault injection, by configuration and at run time through ``POST /admin/faults``."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from prefixlb.emulator import EmulatedFleet, Faults

from .helpers import SMALL, TIMEOUT, post, wait_for

BODY = {"prompt": "hello fault", "max_tokens": 2}


async def healthy(s: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with s.get(url + "/health", timeout=aiohttp.ClientTimeout(total=1)) as r:
            return r.status == 200
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return False


async def test_error_rate_answers_500_in_vllms_error_shape() -> None:
    async with (
        EmulatedFleet(2, **SMALL, faults_by_replica={0: Faults(error_rate=1.0)}) as fleet,
        aiohttp.ClientSession(timeout=TIMEOUT) as s,
    ):
        status, body, _ = await post(s, fleet.urls[0] + "/v1/completions", BODY)
        assert status == 500
        assert body == {
            "error": {"message": body["error"]["message"], "type": "InternalServerError", "param": None, "code": 500}
        }
        assert await healthy(s, fleet.urls[0])  # only inference routes fail
        status, _, _ = await post(s, fleet.urls[1] + "/v1/completions", BODY)
        assert status == 200  # faults are per replica
        # half the requests fail at error_rate 0.5 (seeded draws)
        await post(s, fleet.urls[0] + "/admin/faults", {"error_rate": 0.5})
        statuses = [(await post(s, fleet.urls[0] + "/v1/completions", BODY))[0] for _ in range(40)]
    assert set(statuses) == {200, 500} and 8 <= statuses.count(500) <= 32


async def test_added_latency_delays_the_first_byte() -> None:
    async with (
        EmulatedFleet(1, **{**SMALL, "time_scale": 10.0}, faults_by_replica={0: Faults(latency=3.0)}) as fleet,
        aiohttp.ClientSession(timeout=TIMEOUT) as s,
    ):
        t0 = time.perf_counter()
        status, _, _ = await post(s, fleet.urls[0] + "/v1/completions", BODY)
        slow = time.perf_counter() - t0
        await post(s, fleet.urls[0] + "/admin/faults", {"reset": True})
        t0 = time.perf_counter()
        await post(s, fleet.urls[0] + "/v1/completions", BODY)
        fast = time.perf_counter() - t0
    assert status == 200
    assert 0.3 <= slow < 1.0  # 3 emulated seconds at 10x
    assert fast < 0.1


async def test_hang_accepts_and_never_answers_until_reset() -> None:
    async with EmulatedFleet(1, **SMALL) as fleet, aiohttp.ClientSession(timeout=TIMEOUT) as s:
        url = fleet.urls[0]
        status, body, _ = await post(s, url + "/admin/faults", {"hang": True})
        assert status == 200 and body["faults"]["hang"] is True
        with pytest.raises(asyncio.TimeoutError):
            await post(s, url + "/v1/completions", BODY, timeout=aiohttp.ClientTimeout(total=0.3))
        assert not await healthy(s, url)  # health checks hang too (the connection is accepted)
        status, body, _ = await post(s, url + "/admin/faults", {"reset": True})  # admin always answers
        assert status == 200 and body["faults"]["hang"] is False
        status, _, _ = await post(s, url + "/v1/completions", BODY)
        assert status == 200
        # the hung requests were cancelled by the client's disconnect: nothing left in the engine
        assert fleet.replicas[0].engine.has_unfinished() is False


async def test_crash_after_n_requests_closes_the_port_and_drops_connections() -> None:
    async with (
        EmulatedFleet(2, **SMALL, faults_by_replica={0: Faults(crash_after=2)}) as fleet,
        aiohttp.ClientSession(timeout=TIMEOUT) as s,
    ):
        url = fleet.urls[0]
        # a slow stream in flight on its own connection is dropped by the crash
        conn = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(timeout=TIMEOUT, connector=conn) as s2:
            for _ in range(2):
                status, _, _ = await post(s2, url + "/v1/completions", BODY)
                assert status == 200
            with pytest.raises((aiohttp.ClientConnectionError, aiohttp.ServerDisconnectedError)):
                await post(s2, url + "/v1/completions", BODY)  # the third request crashes it
        assert not fleet.replicas[0].is_up
        with pytest.raises(aiohttp.ClientConnectionError):
            async with s.get(url + "/health", timeout=aiohttp.ClientTimeout(total=2)):
                pass
        # revive it through another replica of the same process
        status, body, _ = await post(s, fleet.urls[1] + "/admin/faults", {"replica": 0, "reset": True})
        assert status == 200 and body == {"replica": 0, "up": True, "faults": Faults().to_json()}
        assert await healthy(s, url)
        status, _, _ = await post(s, url + "/v1/completions", BODY)
        assert status == 200


@pytest.mark.async_timeout(15)
async def test_crash_drops_an_open_stream() -> None:
    async with EmulatedFleet(2, **{**SMALL, "time_scale": 1.0}) as fleet, aiohttp.ClientSession(timeout=TIMEOUT) as s:
        url = fleet.urls[0]
        body = {"prompt": "long", "max_tokens": 400, "ignore_eos": True, "stream": True}
        async with s.post(url + "/v1/completions", json=body) as r:
            await r.content.readline()  # streaming has started
            fleet.replicas[0].go_down()
            with pytest.raises(
                (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientConnectionError)
            ):
                while await r.content.readline():
                    pass
        # the dropped request was aborted in the engine
        await wait_for(lambda: not fleet.replicas[0].engine.has_unfinished())
        await fleet.replicas[0].go_up()
        assert await healthy(s, url)


@pytest.mark.async_timeout(15)
async def test_flap_alternates_down_and_up() -> None:
    async with (
        EmulatedFleet(1, **{**SMALL, "time_scale": 1.0}, faults_by_replica={0: Faults(flap_period=0.25)}) as fleet,
        aiohttp.ClientSession(timeout=TIMEOUT) as s,
    ):
        url = fleet.urls[0]
        seen = []
        loop = asyncio.get_running_loop()
        end = loop.time() + 1.2
        while loop.time() < end:
            seen.append(fleet.replicas[0].is_up and await healthy(s, url))
            await asyncio.sleep(0.05)
        # up first, then down, then up again
        first_down = seen.index(False)
        assert first_down > 0 and True in seen[first_down:]
        assert fleet.replicas[0].faults.faults.flap_period == 0.25  # flapping until reset
        await fleet.replicas[0].faults.update({"reset": True})
        assert fleet.replicas[0].is_up and await healthy(s, url)


async def test_slow_streaming_spaces_the_chunks() -> None:
    async with (
        EmulatedFleet(1, **{**SMALL, "time_scale": 10.0}, faults_by_replica={0: Faults(slow_stream=1.0)}) as fleet,
        aiohttp.ClientSession(timeout=TIMEOUT) as s,
    ):
        body = {"prompt": "slow", "max_tokens": 4, "ignore_eos": True, "stream": True}
        stamps = []
        async with s.post(fleet.urls[0] + "/v1/completions", json=body) as r:
            async for line in r.content:
                if line.startswith(b"data: {"):
                    stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert len(stamps) == 4 and all(g >= 0.09 for g in gaps)  # 1 emulated second at 10x


async def test_admin_rejects_unknown_fields_and_bad_values() -> None:
    async with EmulatedFleet(1, **SMALL) as fleet, aiohttp.ClientSession(timeout=TIMEOUT) as s:
        url = fleet.urls[0] + "/admin/faults"
        for bad in ({"explode": True}, {"error_rate": 2}, {"latency": "slow"}, {"replica": 7, "hang": True}):
            status, body, _ = await post(s, url, bad)
            assert status in (400, 404) and set(body["error"]) == {"message", "type", "param", "code"}
        async with s.get(url) as r:
            current = await r.json()
    assert current == {"replica": 0, "up": True, "faults": Faults().to_json()}
