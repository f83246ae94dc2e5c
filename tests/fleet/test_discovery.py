"""Replica discovery against local stand-ins: a Kubernetes API server replaying a recorded pod
list and watch stream, and a DNS server answering SRV/A records from a table the test edits.
The balancer adds what appears and drains what leaves, without a restart."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
from pathlib import Path

import dns.message
import dns.rdatatype
import dns.rrset
from aiohttp import web

from prefixlb.config import Config, DiscoveryConfig, DNSDiscoveryConfig, KubernetesDiscoveryConfig, TierConfig
from prefixlb.fleet.discovery import Reconciler
from prefixlb.server import Balancer

DATA = Path(__file__).resolve().parents[1] / "data" / "k8s"


def test_reconciler_adds_removes_and_leaves_static_alone() -> None:
    calls = []
    r = Reconciler(lambda t, u: calls.append(("add", t, u)), lambda u: calls.append(("rm", u)), static={"http://s:1"})
    r.update("a", {"http://x:1": "small", "http://s:1": "small"})
    r.update("b", {"http://y:1": "large"})
    r.update("a", {})
    r.update("b", {"http://y:1": "small"})  # moved tier: leave, then join again
    assert calls == [("add", "small", "http://x:1"), ("add", "large", "http://y:1"), ("rm", "http://x:1"),
                     ("rm", "http://y:1"), ("add", "small", "http://y:1")]


async def until(pred, timeout: float = 10.0) -> None:
    end = asyncio.get_running_loop().time() + timeout
    while not pred():
        assert asyncio.get_running_loop().time() < end, "timed out"
        await asyncio.sleep(0.05)


def tiers() -> tuple[TierConfig, ...]:
    return (TierConfig("small", "m", ()), TierConfig("large", "m", ()))


def urls(b: Balancer, tier: str, live: bool = True) -> set[str]:
    return {r.url for r in b.tiers[tier].replicas.values() if not (live and r.draining)}


async def test_kubernetes_pods_watch_replayed() -> None:
    listing = json.loads((DATA / "pods-list.json").read_text())
    events = (DATA / "pods-watch.jsonl").read_text().splitlines()
    release = asyncio.Event()
    done = asyncio.Event()
    seen_queries = []

    async def pods(request: web.Request) -> web.StreamResponse:
        seen_queries.append(dict(request.query))
        if request.query.get("watch") not in ("true", "True", "1"):
            return web.json_response(listing)
        resp = web.StreamResponse(headers={"content-type": "application/json"})
        await resp.prepare(request)
        for line in events:
            await release.wait()
            await resp.write(line.encode() + b"\n")
            await asyncio.sleep(0.05)
        await done.wait()  # a watch stays open until the test ends
        return resp

    app = web.Application()
    app.router.add_get("/api/v1/namespaces/llm/pods", pods)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    api = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # noqa: SLF001
    disc = DiscoveryConfig(kubernetes=(KubernetesDiscoveryConfig("llm", "app=vllm", 8000,
                                                                 tier_label="prefixlb.io/tier", api=api),))
    cfg = dataclasses.replace(Config(tiers=tiers(), port=0), discovery=disc, health_interval_s=0.2,
                              drain_timeout_s=0.5)
    b = Balancer(cfg)
    await b.start()
    try:
        # the list: two ready small pods; the large one is not ready yet
        await until(lambda: urls(b, "small") == {"http://127.0.0.11:8000", "http://127.0.0.12:8000"})
        assert urls(b, "large") == set()
        assert seen_queries[0]["labelSelector"] == "app=vllm"
        release.set()
        # the watch: large-0 ready, small-2 scheduled then ready, small-0 terminating then deleted
        await until(lambda: urls(b, "large") == {"http://127.0.0.21:8000"})
        await until(lambda: urls(b, "small") == {"http://127.0.0.12:8000", "http://127.0.0.13:8000"})
        assert seen_queries[-1].get("resourceVersion") == "100"  # the watch resumed from the list
        # a terminating pod is drained first, then dropped
        await until(lambda: "http://127.0.0.11:8000" not in urls(b, "small", live=False), timeout=5)
    finally:
        done.set()
        await b.stop(0.2)
        await runner.cleanup()


class DNSServer(asyncio.DatagramProtocol):
    """Answers SRV and A queries from ``records`` (``{(name, type): [rdata text, ...]}``)."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], list[str]] = {}
        self.queries = 0

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.queries += 1
        q = dns.message.from_wire(data)
        resp = dns.message.make_response(q)
        question = q.question[0]
        name = question.name.to_text()
        rtype = dns.rdatatype.to_text(question.rdtype)
        rows = self.records.get((name, rtype))
        if rows is None and not any(n == name for n, _ in self.records):
            resp.set_rcode(dns.rcode.NXDOMAIN)
        elif rows:
            resp.answer.append(dns.rrset.from_text_list(name, 5, "IN", rtype, rows))
        self.transport.sendto(resp.to_wire(), addr)


async def test_dns_srv_records_re_resolved() -> None:
    import dns.rcode  # noqa: F401 - used by the server

    loop = asyncio.get_running_loop()
    server = DNSServer()
    transport, _ = await loop.create_datagram_endpoint(lambda: server, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    srv = "_http._tcp.vllm.llm.svc.cluster.local."
    server.records = {(srv, "SRV"): ["0 0 9001 a.vllm.", "0 0 9002 b.vllm."], ("a.vllm.", "A"): ["127.0.0.1"],
                      ("b.vllm.", "A"): ["127.0.0.1"], ("c.vllm.", "A"): ["127.0.0.1"]}
    disc = DiscoveryConfig(dns=(DNSDiscoveryConfig(srv.rstrip("."), "small", interval_s=0.1,
                                                   nameservers=("127.0.0.1",), nameserver_port=port),))
    cfg = dataclasses.replace(Config(tiers=tiers(), port=0), discovery=disc, health_interval_s=0.2,
                              drain_timeout_s=0.3)
    b = Balancer(cfg)
    await b.start()
    try:
        await until(lambda: urls(b, "small") == {"http://127.0.0.1:9001", "http://127.0.0.1:9002"})
        server.records[(srv, "SRV")] = ["0 0 9002 b.vllm.", "0 0 9003 c.vllm."]  # scale: one out, one in
        await until(lambda: urls(b, "small") == {"http://127.0.0.1:9002", "http://127.0.0.1:9003"})
        await until(lambda: "http://127.0.0.1:9001" not in urls(b, "small", live=False), timeout=5)
        transport.close()  # the resolver goes away: the last set stays
        before = urls(b, "small")
        await asyncio.sleep(0.5)
        assert urls(b, "small") == before
    finally:
        await b.stop(0.2)
        transport.close()


def test_free_loopback_aliases() -> None:
    # the Kubernetes test's pod IPs are loopback aliases: nothing needs to listen there
    with socket.socket() as s:
        s.bind(("127.0.0.11", 0))
