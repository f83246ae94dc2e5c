"""The balancer as a proxy: bytes unchanged, retries only before the first byte, accounting
that returns to zero, circuit breaker, bad input. Deterministic fake replicas on 127.0.0.1."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest

from .support import FakeReplica, balancer_for, metric, post, run, wait_for

CHAT = {"model": "auto", "messages": [{"role": "user", "content": "hello there"}], "stream": True}


def test_streaming_is_byte_identical_to_a_direct_call():
    async def main():
        fake = await FakeReplica("sse", delay=0.01).start()
        b = await balancer_for([fake.url])
        try:
            async with aiohttp.ClientSession() as s:
                st1, _, direct = await post(s, fake.url + "/v1/chat/completions", CHAT)
                st2, hdrs, proxied = await post(s, f"http://127.0.0.1:{b.port}/v1/chat/completions", CHAT)
            assert st1 == st2 == 200
            assert proxied == direct == b"".join(FakeReplica.EVENTS)
            assert hdrs["x-prefixlb-replica"] == fake.url and hdrs["x-prefixlb-tier"] == "default"
        finally:
            await b.stop()
            await fake.stop()

    run(main())


def test_stream_chunks_arrive_as_produced_not_buffered():
    async def main():
        fake = await FakeReplica("sse", delay=0.08).start()
        b = await balancer_for([fake.url])
        try:
            async with aiohttp.ClientSession() as s:
                arrivals = []
                loop = asyncio.get_running_loop()
                async with s.post(f"http://127.0.0.1:{b.port}/v1/chat/completions", json=CHAT) as r:
                    async for _ in r.content.iter_any():
                        arrivals.append(loop.time())
            # 10 events 80 ms apart: the first must arrive long before the last
            assert len(arrivals) >= 5 and arrivals[-1] - arrivals[0] > 0.4
        finally:
            await b.stop()
            await fake.stop()

    run(main())


def test_retry_before_first_byte_on_a_dead_replica():
    async def main():
        good = await FakeReplica("ok").start()
        dead = await FakeReplica("ok").start()
        dead_url = dead.url
        await dead.stop()  # nothing listens there now: connection refused
        b = await balancer_for([dead_url, good.url], health_interval_s=30)  # checks too slow to help
        try:
            base = f"http://127.0.0.1:{b.port}"
            async with aiohttp.ClientSession() as s:
                for i in range(12):
                    st, hdrs, _ = await post(s, base + "/v1/completions", {"model": "auto", "prompt": f"p{i}" * 40})
                    assert st == 200 and hdrs["x-prefixlb-replica"] == good.url
                assert good.hits == 12
                assert await metric(s, base, "prefixlb_retries_total") >= 1
        finally:
            await b.stop()
            await good.stop()

    run(main())


def test_retry_on_a_5xx_before_the_first_byte():
    async def main():
        bad = await FakeReplica("error").start()
        good = await FakeReplica("ok").start()
        b = await balancer_for([bad.url, good.url], health_interval_s=30)
        try:
            async with aiohttp.ClientSession() as s:
                for i in range(6):
                    st, hdrs, _ = await post(s, f"http://127.0.0.1:{b.port}/v1/completions",
                                             {"model": "auto", "prompt": f"q{i}" * 40})
                    assert st == 200 and hdrs["x-prefixlb-replica"] == good.url
            assert bad.hits >= 1 and good.hits == 6
        finally:
            await b.stop()
            await bad.stop()
            await good.stop()

    run(main())


def test_a_request_that_fails_everywhere_leaves_no_cycle_holding_its_body():
    """The last attempt's error is re-raised with nothing in the forwarding frame holding it: its
    traceback holds that frame, and a frame holding the error back is a cycle that would keep the
    request (and its body, up to max_body_bytes) alive until a cyclic collection -- which prefixlb
    serve runs rarely (gc.freeze, youngest generation every 20,000 allocations)."""
    import gc

    from prefixlb.server.http.server import Request

    async def main():
        bad = [await FakeReplica("error").start() for _ in range(2)]
        b = await balancer_for([r.url for r in bad], health_interval_s=30, max_attempts=2,
                               breaker_failure_threshold=1_000_000)
        prompt = {"model": "auto", "prompt": "x" * 50_000}
        try:
            async with aiohttp.ClientSession() as s:
                gc.collect()
                gc.disable()
                try:
                    for _ in range(10):
                        st, _, _ = await post(s, f"http://127.0.0.1:{b.port}/v1/completions", prompt)
                        assert st == 502
                    alive = sum(1 for o in gc.get_objects() if type(o) is Request)
                finally:
                    gc.enable()
            assert alive <= 1, f"{alive} failed requests still alive without a collection"
        finally:
            await b.stop()
            for r in bad:
                await r.stop()

    run(main())


def test_never_retried_after_the_first_byte_the_stream_ends_with_an_error_event():
    async def main():
        cut = await FakeReplica("cut", cut_after=2).start()
        other = await FakeReplica("sse").start()
        # round_robin so `cut` keeps being chosen (cache_aware would learn to avoid it)
        b = await balancer_for([cut.url, other.url], health_interval_s=30, policy="round_robin",
                               breaker_failure_threshold=100)
        try:
            async with aiohttp.ClientSession() as s:
                seen_cut = 0
                for i in range(8):
                    body = dict(CHAT, messages=[{"role": "user", "content": f"m{i} " * 30}])
                    st, hdrs, data = await post(s, f"http://127.0.0.1:{b.port}/v1/chat/completions", body)
                    assert st == 200
                    if hdrs["x-prefixlb-replica"] == cut.url:
                        seen_cut += 1
                        assert data.startswith(FakeReplica.EVENTS[0] + FakeReplica.EVENTS[1])
                        assert b'"type":"upstream_error"' in data and data.endswith(b"data: [DONE]\n\n")
                    else:
                        assert data == b"".join(FakeReplica.EVENTS)
                assert seen_cut >= 1
                assert other.hits == 8 - seen_cut  # nothing that started on `cut` was resent
                assert await metric(s, f"http://127.0.0.1:{b.port}", "prefixlb_stream_errors_total") == seen_cut
        finally:
            await b.stop()
            await cut.stop()
            await other.stop()

    run(main())


def test_breaker_opens_on_failures_and_closes_when_the_replica_recovers():
    async def main():
        flaky = await FakeReplica("error").start()
        flaky.health_ok = True  # /health passes while completions fail: only the breaker can notice
        good = await FakeReplica("ok").start()
        b = await balancer_for([flaky.url, good.url], health_interval_s=0.1, breaker_failure_threshold=3,
                               breaker_open_s=1.0, policy="round_robin")
        try:
            base = f"http://127.0.0.1:{b.port}"
            async with aiohttp.ClientSession() as s:
                hdr = {"authorization": "Bearer secret-token"}

                async def state():
                    async with s.get(base + "/admin/replicas/0", headers=hdr) as r:
                        return (await r.json())["breaker"]

                for i in range(20):
                    await post(s, base + "/v1/completions", {"prompt": f"x{i}" * 50})
                    if await state() == "open":
                        break
                assert await state() == "open"
                hits_when_open = flaky.hits
                for i in range(5):  # while open, nothing is sent to it
                    await post(s, base + "/v1/completions", {"prompt": f"y{i}" * 50})
                assert flaky.hits == hits_when_open
                flaky.mode = "ok"

                async def closed():
                    return await state() == "closed"

                assert await wait_for(closed, timeout=5)  # health checks probe it after the cool-down
                before = flaky.hits
                for i in range(4):
                    await post(s, base + "/v1/completions", {"prompt": f"z{i}" * 50})
                assert flaky.hits > before  # routable again
        finally:
            await b.stop()
            await flaky.stop()
            await good.stop()

    run(main())


@pytest.mark.timeout(120)
def test_client_disconnects_mid_stream_release_every_counter():
    async def main():
        slow = await FakeReplica("sse", delay=0.2).start()
        b = await balancer_for([slow.url])
        base = f"http://127.0.0.1:{b.port}"
        n = 200
        try:
            async def one(s, i):
                body = dict(CHAT, messages=[{"role": "user", "content": f"d{i}"}])
                async with s.post(base + "/v1/chat/completions", json=body) as r:
                    await r.content.readany()  # first event, then hang up
                    r.close()

            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=50)) as s:
                await asyncio.gather(*(one(s, i) for i in range(n)))
            async with aiohttp.ClientSession() as s:
                ok = await wait_for(lambda: _zero(s, base), timeout=10)
                assert ok, "in-flight did not return to 0"
                assert await metric(s, base, "prefixlb_prefill_backlog_tokens") < 1
            assert await wait_for(lambda: slow.disconnects >= n * 0.9, timeout=10), slow.disconnects
        finally:
            await b.stop()
            await slow.stop()

    async def _zero(s, base):
        return await metric(s, base, "prefixlb_inflight_requests") == 0

    run(main(), timeout=100)


def test_model_is_rewritten_to_the_served_name_and_passes_through_otherwise():
    async def main():
        fake = await FakeReplica("ok", model="served-x").start()
        b = await balancer_for([fake.url])
        try:
            base = f"http://127.0.0.1:{b.port}"
            async with aiohttp.ClientSession() as s:
                for model in ("auto", "default", "served-x", None):
                    body = {"prompt": "hi", "max_tokens": 3} | ({} if model is None else {"model": model})
                    st, _, _ = await post(s, base + "/v1/completions", body)
                    assert st == 200
            assert [x["model"] for x in fake.bodies] == ["served-x"] * 4
            assert all(x["max_tokens"] == 3 for x in fake.bodies)
        finally:
            await b.stop()
            await fake.stop()

    run(main())


def test_no_available_replica_is_503_with_retry_after():
    async def main():
        bad = await FakeReplica("error").start()
        b = await balancer_for([bad.url], health_interval_s=0.05, health_fail_threshold=1)
        try:
            base = f"http://127.0.0.1:{b.port}"
            async with aiohttp.ClientSession() as s:
                assert await wait_for(lambda: not b.replicas[0].healthy)
                st, hdrs, body = await post(s, base + "/v1/completions", {"prompt": "x"})
                assert st == 503 and hdrs["Retry-After"] == "1"
                assert orjson.loads(body)["error"]["code"] == 503
                async with s.get(base + "/health") as r:
                    assert r.status == 503
        finally:
            await b.stop()
            await bad.stop()

    run(main())


BAD = [
    ("malformed json", b"{not json", {}, 400),
    ("not an object", b"[1, 2]", {}, 400),
    ("model not a string", orjson.dumps({"model": 5, "prompt": "x"}), {}, 400),
    ("stream not a bool", orjson.dumps({"prompt": "x", "stream": "yes"}), {}, 400),
    ("no prompt", orjson.dumps({"model": "auto"}), {}, 400),
    ("prompt wrong type", orjson.dumps({"prompt": {"a": 1}}), {}, 400),
    ("unknown model", orjson.dumps({"model": "gpt-17", "prompt": "x"}), {}, 404),
    ("wrong content type", orjson.dumps({"prompt": "x"}), {"content-type": "text/plain"}, 415),
    ("too large", orjson.dumps({"prompt": "x" * 3_000_000}), {}, 413),
]


def test_bad_input_battery_gets_openai_4xx_and_never_5xx():
    async def main():
        fake = await FakeReplica("ok").start()
        b = await balancer_for([fake.url], max_body_bytes=2 * 1024 * 1024)
        try:
            base = f"http://127.0.0.1:{b.port}"
            async with aiohttp.ClientSession() as s:
                for name, raw, hdrs, want in BAD:
                    st, _, body = await post(s, base + "/v1/completions", None, headers=hdrs, raw=raw)
                    assert st == want, (name, st, body[:200])
                    err = orjson.loads(body)["error"]
                    assert err["code"] == want and err["message"] and err["type"], name
                for method, path, want in [("GET", "/v1/completions", 405), ("GET", "/nope", 404),
                                           ("POST", "/v1/models", 405), ("GET", "/admin/replicas", 401)]:
                    async with s.request(method, base + path) as r:
                        assert r.status == want, (method, path, r.status)
                        assert (await r.json())["error"]["code"] == want
                # ...and the balancer still serves
                st, _, _ = await post(s, base + "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
                assert st == 200
            assert fake.hits == 1  # no bad request reached the replica
        finally:
            await b.stop()
            await fake.stop()

    run(main())


def test_admin_requires_the_token_and_drains_adds_removes():
    async def main():
        a = await FakeReplica("ok").start()
        c = await FakeReplica("ok").start()
        b = await balancer_for([a.url])
        try:
            base = f"http://127.0.0.1:{b.port}"
            hdr = {"authorization": "Bearer secret-token"}
            async with aiohttp.ClientSession() as s:
                async with s.get(base + "/admin/replicas", headers={"authorization": "Bearer wrong"}) as r:
                    assert r.status == 401
                async with s.post(base + "/admin/replicas", json={"url": c.url}, headers=hdr) as r:
                    assert r.status == 201
                    new_id = (await r.json())["id"]
                async with s.post(base + "/admin/replicas/0/drain", headers=hdr) as r:
                    assert r.status == 200 and (await r.json())["draining"]
                for i in range(5):
                    st, hdrs, _ = await post(s, base + "/v1/completions", {"prompt": f"a{i}" * 30})
                    assert st == 200 and hdrs["x-prefixlb-replica"] == c.url
                async with s.delete(base + f"/admin/replicas/{new_id}", headers=hdr) as r:
                    assert r.status == 202
                assert await wait_for(lambda: new_id not in b.replicas)
                async with s.post(base + "/admin/replicas/0/undrain", headers=hdr) as r:
                    assert r.status == 200
                st, hdrs, _ = await post(s, base + "/v1/completions", {"prompt": "back"})
                assert st == 200 and hdrs["x-prefixlb-replica"] == a.url
                async with s.post(base + "/admin/replicas", json={"url": "file:///etc/passwd"}, headers=hdr) as r:
                    assert r.status == 400
        finally:
            await b.stop()
            await a.stop()
            await c.stop()

    run(main())
