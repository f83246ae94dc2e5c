"""The balancer: OpenAI-compatible HTTP in front of tiers of vLLM replicas.

Request path (one straight line, DESIGN.md): parse the body once -> resolve the tier ->
prompt key -> ``TierRouter.decide`` (hash + match + cost model) -> forward on a pooled
keep-alive connection -> stream the replica's bytes back unchanged -> feedback hooks.

Retries: a request that fails before its first byte reached the client (connect error, 5xx or
429 from the replica, no response in time) is sent to the next best replica, up to
``max_attempts``. Once a byte went to the client it is never retried: a failing stream ends
with an OpenAI-style error event and ``data: [DONE]``. Every dispatched decision is closed by
exactly one router hook in a ``finally``, so a client that disconnects (the HTTP layer cancels
this handler) releases everything it held.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import itertools
import logging
import os
import random
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import GaugeMetricFamily

from prefixlb import errors
from prefixlb.config import Config, ConfigError, check_url
from prefixlb.fleet.breaker import BreakerConfig
from prefixlb.index import block_hashes as index_block_hashes
from prefixlb.fleet.kv_events import AllCleared, EventSource, KVEventSubscriber, Removed, Stored
from prefixlb.fleet.kv_events import sources_from_kv_event_sources
from prefixlb.fleet.monitor import FleetMonitor, fetch_json, fetch_models
from prefixlb.fleet.replica import Replica
from prefixlb.routing import CostParams, NoReplicaAvailable, PromptError, TierRouter, make_policy, prompt_key
from prefixlb.routing import token_key
from prefixlb.routing.admission import AdmissionQueue, Held
from prefixlb.routing.prompt import PromptKey
from prefixlb.routing.router import Decision

from .http import (
    ClientDisconnected,
    HTTPServer,
    Limits,
    Request,
    UpstreamError,
    UpstreamPool,
    UpstreamTimeout,
    end_to_end,
    render_header_lines,
)
from .metrics import BalancerMetrics, Cell, Histogram
from .tiering import TierRouting, Trace

__all__ = ["Balancer"]

log = logging.getLogger("prefixlb.server")
access = logging.getLogger("prefixlb.access")  # one line per request when --access-log is on

_JSON = (b"content-type", b"application/json")
# request ids for upstream calls that came without one: a per-process random prefix and a counter
# (unique, and no syscall per request as os.urandom would cost)
_RID_PREFIX = os.urandom(6).hex()
_rid_counter = itertools.count(1)
_FORWARD = frozenset({b"authorization", b"x-request-id", b"traceparent", b"tracestate", b"accept",
                      b"x-vllm-priority", b"x-session-id", b"x-data-parallel-rank"})
_COMPLETIONS = {"/v1/chat/completions": True, "/v1/completions": False}
_RETRYABLE = frozenset({429, 500, 502, 503, 504})
_DONE = b"data: [DONE]\n\n"


@dataclass
class Tier:
    name: str
    model: str | None  # configured served-model name (None: learned from replicas)
    router: TierRouter
    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0
    replicas: dict[int, Replica] = field(default_factory=dict)
    encoder: object | None = None  # precise mode: CachedEncoder giving the replicas' prompt token ids
    remote_tokenize: bool = False  # precise mode without a local tokenizer: ask a replica's /tokenize
    block_size: int | None = None  # precise mode: vLLM's block size
    # admission: requests held at the balancer, in arrival order (Balancer._wait_for_room), and
    # whether a pass over them is scheduled
    held: AdmissionQueue = field(init=False)
    _pass_due: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.held = AdmissionQueue(self.router)

    def wake(self) -> None:
        """The router's ``room_listener``: room may have come back on a replica. One pass over the
        held requests runs soon after, on the loop; the first bytes that arrive meanwhile share it."""
        if self.held and not self._pass_due:
            self._pass_due = True
            asyncio.get_running_loop().call_soon(self._run_pass)

    def _run_pass(self) -> None:
        self._pass_due = False
        self.held.run(self.router.clock(), self._admit)

    def _admit(self, h: Held) -> None:
        fut = h.token
        if fut.done():  # the client left; its task has not run yet and will not send
            return
        if h.error is not None:
            fut.set_exception(h.error)
            return
        self.router.reserve(h.decision)  # pending from now: the rest of the pass is decided against it
        fut.set_result(h.decision)

    def served_models(self) -> set[str]:
        names = {self.model} if self.model else set()
        for r in self.replicas.values():
            names |= r.models
        return names


class Balancer:
    def __init__(self, config: Config, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.tiers: dict[str, Tier] = {}
        self.replicas: dict[int, Replica] = {}
        self._by_url: dict[str, Replica] = {}  # the same replicas by URL (peer messages name them so)
        self.pools: dict[int, UpstreamPool] = {}
        self._next_id = 0
        self._capacity_configured: set[int] = set()  # replicas whose KV capacity the config fixed
        self._event_sources: list[EventSource] = []
        self._tok_pool = None
        self._tok_rr = 0
        # replica id -> its x-prefixlb-tier and -replica response headers as written on the wire,
        # rendered once (the config refuses a tier name or URL that is not a header value)
        self._replica_lines: dict[int, bytes] = {}
        # the metric series _account adds to, kept at hand: replica id -> its _ReplicaSeries;
        # tier name -> its route-decision histogram
        self._series: dict[int, _ReplicaSeries] = {}
        self._decision_hists: dict[str, Histogram] = {}
        self.config_source: Callable[[], Config] | None = None  # re-reads the config file (reload)
        self._discovery_sources: list = []
        self.discovery = None  # Reconciler when discovery is configured
        self.peers = None  # PeerSync when peer sync is configured (config peers:, or --workers)
        self._ledger = None
        self.events: KVEventSubscriber | None = None
        self._breaker = BreakerConfig(failure_threshold=config.breaker_failure_threshold,
                                      open_s=config.breaker_open_s)
        self.metrics = BalancerMetrics(self._state_rows)
        self.metrics.extra.append(self._admission_gauges)
        for i, t in enumerate(config.tiers):
            c = t.cost
            params = CostParams(prefill_tokens_per_s=c.prefill_tokens_per_s, fixed_s=c.fixed_ms / 1e3,
                                context_weight=c.context_weight, step_tokens=c.step_tokens,
                                admit_share=c.admit_share, admit_max_wait_s=c.admit_max_wait_s)
            policy_kw = {"pressure_weight": config.pressure_weight} if config.policy == "cache_aware" else {}
            rng = random.Random(config.seed + i)
            router = TierRouter(t.name, policy=make_policy(config.policy, rng, **policy_kw), params=params,
                                block_bytes=config.block_bytes, bytes_per_token=config.bytes_per_token,
                                seed=config.seed + i, clock=clock)
            tier = Tier(t.name, t.model, router, t.input_per_mtok, t.output_per_mtok)
            router.room_listener = tier.wake
            if t.precise is not None:
                router.enable_precise(t.precise.block_size, t.precise.speculative_grace_s)
                if t.precise.tokenizer == "replica":
                    tier.remote_tokenize = True
                else:
                    tier.encoder = _encoder(t.precise.tokenizer)
                tier.block_size = t.precise.block_size
            self.tiers[t.name] = tier
            for rc in t.replicas:
                r = self._add_replica(tier, rc.url, rc.capacity_tokens)
                if rc.kv_events is not None:
                    e = rc.kv_events
                    self._event_sources.append(EventSource(r.id, e.endpoint, e.topic, e.replay_endpoint, e.bind))
        self.server = HTTPServer(self.handle, limits=Limits(max_body_bytes=config.max_body_bytes,
                                                            max_header_bytes=config.max_header_bytes,
                                                            request_timeout=60.0))
        self.monitor = FleetMonitor(
            lambda: list(self.replicas.values()),
            health_interval=config.health_interval_s, health_timeout=config.health_timeout_s,
            fail_threshold=config.health_fail_threshold, pass_threshold=config.health_pass_threshold,
            scrape_interval=config.scrape_interval_s, scrape_timeout=config.scrape_timeout_s,
            on_health=self._on_health, on_scrape=self._on_scrape, clock=clock,
        )
        self._ticker: asyncio.Task | None = None
        self._closing = False
        tr = config.tier_routing  # model tiers by rules, classifier, cascade (prefixlb.server.tiering)
        self.tiering = TierRouting(self, tr) if tr is not None else None

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, host: str | None = None, port: int | None = None, *, sock=None,
                    reuse_port: bool = False) -> None:
        await self.monitor.start()
        await self._learn_models()
        await self._start_events()
        await self._start_discovery()
        await self._start_peers()
        ssl_ctx = None
        if self.config.tls_cert:
            import ssl

            ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_ctx.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        await self.server.serve(host or self.config.host, self.config.port if port is None else port,
                                sock=sock, reuse_port=reuse_port, ssl=ssl_ctx)
        self._ticker = asyncio.create_task(self._tick(), name="prefixlb-eligibility")

    @property
    def port(self) -> int:
        return self.server.port

    async def stop(self, drain_timeout: float | None = None) -> None:
        self._closing = True
        await self.server.close(self.config.drain_timeout_s if drain_timeout is None else drain_timeout)
        if self._ticker:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
        await self.monitor.stop()
        if self.events is not None:
            await self.events.close()
        if self._tok_pool is not None:
            self._tok_pool.shutdown(wait=False, cancel_futures=True)
        for src in self._discovery_sources:
            await src.stop()
        if self.peers is not None:
            await self.peers.close()
        if self.tiering is not None:
            await self.tiering.close()
        await asyncio.gather(*(p.close() for p in self.pools.values()), return_exceptions=True)

    async def _learn_models(self) -> None:
        session = self.monitor.session
        results = await asyncio.gather(*(fetch_models(session, r.url, self.config.health_timeout_s * 2)
                                         for r in self.replicas.values()))
        for r, models in zip(list(self.replicas.values()), results):
            r.models |= models

    # -- configuration reload (SIGHUP, POST /admin/reload) -----------------------------------------

    def reload(self, new: Config) -> dict:
        """Apply a re-read configuration without dropping a connection: static replicas added and
        drained away, prices, timeouts, retries, limits, admin token. What cannot change live
        (listen address, TLS, tiers, policy, precise mode, discovery) is reported, not applied."""
        old = self.config
        restart = [k for k in ("host", "port", "tls_cert", "tls_key", "policy", "discovery")
                   if getattr(old, k) != getattr(new, k)]
        if new.peers is not None and old.peers != new.peers:
            restart.append("peers")
        if [t.name for t in old.tiers] != [t.name for t in new.tiers]:
            restart.append("tiers (names or order)")
        if old.tier_routing != new.tier_routing:
            restart.append("tier_routing")  # the pipeline, classifier and cascade are built at start
        added, removed = [], []
        for t in new.tiers:
            tier = self.tiers.get(t.name)
            if tier is None:
                continue
            prev = next((x for x in old.tiers if x.name == t.name), None)
            if prev is not None and prev.precise != t.precise:
                restart.append(f"tiers[{t.name}].precise")
            tier.input_per_mtok, tier.output_per_mtok = t.input_per_mtok, t.output_per_mtok
            want = {r.url: r for r in t.replicas}
            have = {r.url for r in prev.replicas} if prev is not None else set()
            for url in have - set(want):
                if self.remove_replica(url) is not None:
                    removed.append(url)
            for url in set(want) - have:
                rc = want[url]
                ev = None
                if rc.kv_events is not None:
                    e = rc.kv_events
                    ev = EventSource(-1, e.endpoint, e.topic, e.replay_endpoint, e.bind)
                try:
                    self.add_replica(t.name, url, rc.capacity_tokens, ev)
                    added.append(url)
                except ValueError:
                    pass
        keep = {k: getattr(old, k) for k in ("host", "port", "tls_cert", "tls_key", "policy", "discovery", "peers")}
        self.config = dataclasses.replace(new, **keep, tiers=tuple(
            t if t.name in self.tiers else next(x for x in old.tiers if x.name == t.name)
            for t in new.tiers if t.name in self.tiers))
        self.server.limits = dataclasses.replace(self.server.limits, max_body_bytes=new.max_body_bytes,
                                                 max_header_bytes=new.max_header_bytes)
        summary = {"added": added, "removed": removed, "needs_restart": restart}
        log.info("prefixlb: configuration reloaded: %s", summary)
        return summary

    # -- peer sync -------------------------------------------------------------------------------

    async def _start_peers(self) -> None:
        pc = self.config.peers
        if pc is None:
            return
        from .peers import PeerSync, RemoteLedger

        self.peers = PeerSync(pc.listen, pc.connect, self._on_peer_message)
        self._ledger = RemoteLedger(ttl=self.config.request_timeout_s)
        await self.peers.start()
        for tier in self.tiers.values():
            tier.router.observer = functools.partial(self._publish_hook, tier.name)

    def _publish_hook(self, tier: str, kind: str, d: Decision, now: float) -> None:
        r = self.replicas.get(d.replica.id)
        if r is None:
            return
        if kind == "dispatched":
            d.tag = self.peers.tag()
        self.peers.publish(kind, tier, r.url, d.tag, d)

    def _on_peer_message(self, msg: list) -> None:
        self._ledger.apply(msg, self._peer_replica, self.clock())

    def _peer_replica(self, tier_name: str, url: str):
        tier = self.tiers.get(tier_name)
        r = self._by_url.get(url)
        if tier is None or r is None or r.tier != tier_name:
            return None
        return tier.router, r.id

    # -- discovery -------------------------------------------------------------------------------

    async def _start_discovery(self) -> None:
        d = self.config.discovery
        if not d.kubernetes and not d.dns:
            return
        from prefixlb.fleet.discovery import DNSRecords, KubernetesPods, Reconciler

        static = {r.url for t in self.config.tiers for r in t.replicas}
        self.discovery = Reconciler(lambda tier, url: self.add_replica(tier, url), self.remove_replica, static)
        for i, k in enumerate(d.kubernetes):
            self._discovery_sources.append(KubernetesPods(
                k.namespace, k.label_selector, k.port, tier=k.tier, tier_label=k.tier_label, scheme=k.scheme,
                host=k.api, name=f"kubernetes[{i}]"))
        for i, n in enumerate(d.dns):
            self._discovery_sources.append(DNSRecords(
                n.name, n.tier, port=n.port, interval=n.interval_s, scheme=n.scheme, nameservers=n.nameservers,
                nameserver_port=n.nameserver_port, source=f"dns[{i}]"))
        for src in self._discovery_sources:
            await src.start(self.discovery.update)

    # -- precise mode: KV events -------------------------------------------------------------------

    async def _start_events(self) -> None:
        discover = [r for t in self.config.tiers if t.precise is not None and t.precise.discover
                    for r in self.tiers[t.name].replicas.values()]
        configured = {s.replica_id for s in self._event_sources}
        for r in discover:
            if r.id in configured:
                continue
            body = await fetch_json(self.monitor.session, r.url + "/kv_event_sources", self.config.health_timeout_s * 2)
            found = sources_from_kv_event_sources(r.id, r.url, body)
            if not found:
                log.warning("precise mode: %s publishes no KV-event endpoint the balancer can subscribe to "
                            "(GET /kv_event_sources); it is routed on speculative entries only", r.url)
            self._event_sources += found[:1]  # one data-parallel rank per replica URL
        if not self._event_sources:
            return
        for s in self._event_sources:
            tier = self.tiers[self.replicas[s.replica_id].tier]
            if tier.router.events is None:
                raise ConfigError(f"tiers: replica {self.replicas[s.replica_id].url} has kv_events but tier "
                                  f"{tier.name!r} is not in precise mode (set tiers[].precise)")
        self.events = KVEventSubscriber(self._event_sources, self._on_kv_events, self._on_kv_resync)
        await self.events.start()

    def _on_kv_events(self, rid: int, seq: int, events: list) -> None:
        r = self.replicas.get(rid)
        if r is None:
            return
        tier = self.tiers[r.tier]
        ev = tier.router.events
        if ev is None:
            return
        stored = removed = 0
        for e in events:
            if isinstance(e, Stored):
                if e.medium not in (None, "GPU"):
                    continue  # offloaded copies (CPU / storage) are not prefix-cache hits for routing
                ev.stored(rid, e.block_hashes, e.parent_block_hash, e.token_ids, e.block_size, e.lora_name,
                          e.extra_keys)
                stored += len(e.block_hashes)
            elif isinstance(e, Removed):
                if e.medium not in (None, "GPU"):
                    continue
                ev.removed(rid, e.block_hashes)
                removed += len(e.block_hashes)
            elif isinstance(e, AllCleared):
                ev.cleared(rid)
                self.metrics.kv_events.inc((tier.name, r.url, "cleared"))
        if stored:
            self.metrics.kv_events.inc((tier.name, r.url, "stored"), stored)
        if removed:
            self.metrics.kv_events.inc((tier.name, r.url, "removed"), removed)

    def _on_kv_resync(self, rid: int, why: str) -> None:
        r = self.replicas.get(rid)
        if r is None:
            return
        tier = self.tiers[r.tier]
        if tier.router.events is not None:
            tier.router.events.cleared(rid)
        self.metrics.kv_resyncs.inc((tier.name, r.url))

    async def _tick(self) -> None:
        # open -> half-open breakers become routable with time, not with an event; the routers'
        # upkeep (cache fullness, ratio drift) runs here rather than on the request path
        while True:
            await asyncio.sleep(0.25)
            for r in self.replicas.values():
                self._sync(r)
            now = self.clock()
            for tier in self.tiers.values():
                tier.router.maintain(now)
            if self._ledger is not None:
                self._ledger.expire(now)

    # -- replica set ------------------------------------------------------------------------------

    def _add_replica(self, tier: Tier, url: str, capacity_tokens: int | None) -> Replica:
        rid = self._next_id
        self._next_id += 1
        r = Replica.make(rid, url, tier.name, self._breaker)
        tier.replicas[rid] = r
        self.replicas[rid] = r
        self._by_url[url] = r
        self.pools[rid] = UpstreamPool(url, connect_timeout=self.config.connect_timeout_s)
        self._replica_lines[rid] = render_header_lines(
            ((b"x-prefixlb-tier", tier.name.encode()), (b"x-prefixlb-replica", url.encode())))
        tier.router.add_replica(rid, url, capacity_tokens)
        if capacity_tokens is not None:
            self._capacity_configured.add(rid)
        return r

    def _sync(self, r: Replica) -> None:
        tier = self.tiers.get(r.tier)
        if tier is None or r.id not in tier.router.replicas:
            return
        s = tier.router.replicas[r.id]
        s.eligible = r.healthy and r.breaker.available(self.clock())
        s.draining = r.draining

    def _on_health(self, r: Replica) -> None:
        if r.healthy and r.was_down and self.events is not None:
            # back after failing health checks: most likely a new process with an empty cache and
            # its event sequence back at 0; rebuild from its replay buffer rather than trust the old state
            self.events.reset(r.id)
            self._on_kv_resync(r.id, "replica came back after failing health checks")
        r.was_down = not r.healthy
        self._sync(r)

    def _on_scrape(self, r: Replica) -> None:
        tier = self.tiers.get(r.tier)
        if tier is None or r.id not in tier.router.replicas or r.scraped is None:
            return
        s = tier.router.replicas[r.id]
        sc = r.scraped
        if tier.block_size and sc.block_size and sc.block_size != tier.block_size and not r.block_size_warned:
            r.block_size_warned = True
            log.error("precise mode: %s runs with --block-size %d but tier %r is configured with block_size %d; "
                      "its KV events are ignored until they agree", r.url, sc.block_size, tier.name, tier.block_size)
        s.observe_scrape(sc.waiting, sc.running, sc.kv_usage, r.scraped_at)
        cap = sc.kv_capacity_tokens
        if cap and r.id not in self._capacity_configured and cap != s.capacity_tokens:
            tier.router.set_capacity_tokens(r.id, cap)

    def _state_rows(self) -> list[dict]:
        now = self.clock()
        rows = []
        for tier in self.tiers.values():
            per = tier.router.index.stats()["per_replica"]
            for rid, r in tier.replicas.items():
                s = tier.router.replicas.get(rid)
                if s is None:
                    continue
                rows.append({
                    "tier": tier.name, "url": r.url, "inflight": s.inflight, "backlog_tokens": s.backlog(now),
                    "healthy": r.healthy, "available": s.available, "breaker": r.breaker.state,
                    "prefill_tokens_per_s": s.prefill_rate, "index_blocks": per.get(rid, {}).get("blocks", 0),
                    "index_evictions": per.get(rid, {}).get("evictions", 0),
                    "pending_prefill_tokens": s.pending_prefill,
                })
        return rows

    def _admission_gauges(self) -> list:
        g = GaugeMetricFamily("prefixlb_admission_held_requests", "Requests held at the balancer now (admission)",
                              labels=["tier"])
        for tier in self.tiers.values():
            g.add_metric([tier.name], len(tier.held))
        return [g]

    # -- HTTP entry point ------------------------------------------------------------------------------

    async def handle(self, req: Request) -> None:
        try:
            path = req.path
            if path in _COMPLETIONS:
                if req.method != "POST":
                    raise errors.MethodNotAllowed(f"{path} takes POST")
                await self._completion(req, _COMPLETIONS[path])
            elif path == "/v1/models":
                self._need(req, "GET")
                req.respond_json(200, self._models_body())
            elif path in ("/health", "/healthz", "/ready"):
                self._need(req, "GET")
                self._health(req)
            elif path == "/livez":  # liveness: the process answers, whatever the replicas' state
                self._need(req, "GET")
                req.respond_json(200, b'{"status":"alive"}')
            elif path == "/metrics":
                self._need(req, "GET")
                req.respond(200, ((b"content-type", CONTENT_TYPE_LATEST.encode()),),
                            generate_latest(self.metrics.registry))
            elif path.startswith("/admin/"):
                self._admin(req)
            else:
                raise errors.NotFound(f"no route {req.method} {path}")
        except errors.PrefixlbError as e:
            if not req.prepared:
                hdrs = [(k.encode(), v.encode()) for k, v in e.headers.items()]
                req.respond_json(e.status, e.body(), hdrs)
        except ClientDisconnected:
            pass

    @staticmethod
    def _need(req: Request, method: str) -> None:
        if req.method != method and not (method == "GET" and req.method == "HEAD"):
            raise errors.MethodNotAllowed(f"{req.path} takes {method}")

    def _health(self, req: Request) -> None:
        now = self.clock()
        up = sum(1 for r in self.replicas.values() if r.available(now))
        if self._closing:
            req.respond_json(503, orjson.dumps({"status": "draining", "available_replicas": up}))
        elif up:
            req.respond_json(200, orjson.dumps({"status": "ok", "available_replicas": up,
                                                "replicas": len(self.replicas)}))
        else:
            req.respond_json(503, orjson.dumps({"status": "no available replica", "available_replicas": 0}),
                             ((b"retry-after", b"1"),))

    def _models_body(self) -> bytes:
        data, seen = [], set()
        created = int(time.time())
        for tier in self.tiers.values():
            for name in [tier.name, *sorted(tier.served_models())]:
                if name not in seen:
                    seen.add(name)
                    data.append({"id": name, "object": "model", "created": created, "owned_by": "prefixlb",
                                 "root": name, "parent": None, "tier": tier.name})
        data.append({"id": "auto", "object": "model", "created": created, "owned_by": "prefixlb",
                     "root": "auto", "parent": None, "tier": self.config.default})
        return orjson.dumps({"object": "list", "data": data})

    # -- the proxy ---------------------------------------------------------------------------------------

    def _resolve(self, model: str | None) -> Tier:
        if model is None or model == "auto":
            return self.tiers[self.config.default]
        tier = self.tiers.get(model)
        if tier is not None:
            return tier
        for t in self.tiers.values():
            if model in t.served_models():
                return t
        raise errors.ModelNotFound(f"The model `{model}` does not exist. Known: "
                                   f"{', '.join(sorted(self._known_models()))}", param="model")

    def _known_models(self) -> set[str]:
        names = {"auto"}
        for t in self.tiers.values():
            names.add(t.name)
            names |= t.served_models()
        return names

    async def _completion(self, req: Request, chat: bool) -> None:
        ctype = req.header(b"content-type")
        if ctype is None or not ctype.split(b";", 1)[0].strip().lower() == b"application/json":
            raise errors.UnsupportedMediaType("Content-Type must be application/json")
        try:
            body = orjson.loads(req.body)
        except orjson.JSONDecodeError as exc:
            raise errors.BadRequest(f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise errors.BadRequest("request body must be a JSON object")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise errors.BadRequest("'model' must be a string", param="model")
        stream = body.get("stream", False)
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            raise errors.BadRequest("'stream' must be a boolean", param="stream")
        tiering = self.tiering
        if tiering is None:
            tier = self._resolve(model)
        else:  # explicit -> rules -> classifier -> default, then maybe a cascade
            # the headers _forward sends upstream, built here once: the request id is among them
            fwd = [(k, v) for k, v in req.headers if k in _FORWARD]
            trace = tiering.decide(req, body, chat, model, fwd)
            tier = self.tiers[trace.decision.tier]
        try:
            key = prompt_key(body, chat)
        except PromptError as exc:
            raise errors.BadRequest(str(exc), param="messages" if chat else "prompt") from None
        prepared = None
        if tier.encoder is not None:
            try:
                prepared = tier.encoder.prepare(body, chat)  # type: ignore[attr-defined]
                key = token_key(prepared.ids, body, total_tokens=prepared.total)
            except Exception as exc:  # noqa: BLE001 - a template the request breaks: the replica will say why
                self.metrics.precise_fallbacks.inc((tier.name,))
                log.debug("precise mode: cannot tokenize a request (%s); routing on its text", exc)
        elif tier.remote_tokenize:
            ids = await self._remote_ids(tier, body, chat)
            if ids is None:
                self.metrics.precise_fallbacks.inc((tier.name,))
            else:
                key = token_key(ids, body)
        started = time.perf_counter()
        if tiering is None:
            await self._forward(req, tier, body, model, key, stream, started, prepared)
            return
        # as decided: forwarded once, or through the cascade; then the trace is finished (here,
        # not in a coroutine of TierRouting's: one coroutine less to create, and to pass through
        # at every resumption of the request's task)
        try:
            if trace.decision.cascade:
                from .cascade import run_cascade

                await run_cascade(tiering, req, trace, tier, body, chat, model, key, stream, started, prepared)
            else:
                await self._forward(req, tier, body, model, key, stream, started, prepared, trace, fwd)
        except errors.PrefixlbError as exc:
            trace.status = exc.status
            raise
        except BaseException:
            trace.status = 499  # the client went away (nginx's code for it)
            raise
        finally:
            tiering.finish(trace, started)

    def _upstream_body(self, req: Request, body: dict, model: str | None, replica: Replica, tier: Tier) -> bytes:
        target = tier.model or (min(replica.models) if replica.models else None)
        if target is None or model == target:
            return req.body
        body["model"] = target
        return orjson.dumps(body)

    async def _forward(self, req: Request, tier: Tier, body: dict, model: str | None, key, stream: bool,
                       started: float, prepared=None, trace: Trace | None = None,
                       forward_headers: list[tuple[bytes, bytes]] | None = None) -> None:
        """Send the request to the tier's best replica, retrying on others before the first byte.
        ``trace``: the request's tier-routing trace (None without tier routing);
        ``forward_headers``: the request's headers to send upstream, if already picked (with
        its x-request-id: ``TierRouting.decide``); taken over."""
        router = tier.router
        cfg = self.config
        mt = body.get("max_tokens", body.get("max_completion_tokens"))
        out_tokens = mt if isinstance(mt, int) and not isinstance(mt, bool) and mt > 0 else None
        headers = forward_headers
        if headers is None:
            headers = [(k, v) for k, v in req.headers if k in _FORWARD]
            for k, _ in headers:  # (the forwarded few, not every header the client sent)
                if k == b"x-request-id":
                    break
            else:
                headers.append((b"x-request-id", f"plb-{_RID_PREFIX}-{next(_rid_counter):x}".encode()))
        headers.append(_JSON)
        tried: list[int] = []
        last: errors.PrefixlbError | None = None
        attempts = 0
        while attempts < cfg.max_attempts:
            now = self.clock()
            try:
                d = router.decide(key, now, exclude=tried, max_tokens=out_tokens)
                if not router.admits(d):
                    d = await self._wait_for_room(tier, key, tried, out_tokens, d)
                    now = self.clock()
            except NoReplicaAvailable as exc:
                if last is not None:
                    break  # the last attempt's error, raised below
                raise errors.NoReplicaAvailable(f"{exc}; retry shortly", headers={"retry-after": "1"}) from None
            replica = self.replicas[d.replica.id]
            tried.append(replica.id)
            if not replica.breaker.allows(now):  # half-open with its probe already out
                router.release(d)  # if admission reserved its prefill there
                self._sync(replica)
                continue
            attempts += 1
            h = self._decision_hists.get(tier.name)  # (no label tuple to build and look up)
            if h is None:
                h = self._decision_hists[tier.name] = self.metrics.decision_seconds.child((tier.name,))
            h.observe(d.decision_s)
            ub = self._upstream_body(req, body, model, replica, tier)
            router.dispatched(d, now, track_prefill=stream)  # a streamed request's first byte is seen
            if prepared is not None and not prepared.complete:
                self._finish_tokens(tier, d, prepared, key.seed)
            outcome = await self._attempt(req, tier, replica, d, headers, ub, stream, started, key, trace)
            if outcome is None:
                return
            last = outcome
            self.metrics.retries.inc((tier.name, type(outcome).__name__))
        assert last is not None
        # Raised with no local left holding it: its traceback holds this frame, and a frame that
        # held the error back would make a cycle keeping the request's body (up to
        # max_body_bytes) alive until a cyclic collection, rare by design (serve's GC settings)
        err, last, outcome = last, None, None
        try:
            raise err
        finally:
            err = None

    async def _wait_for_room(self, tier: Tier, key, tried: list[int], out_tokens, d: Decision) -> Decision:
        """Hold a request the router does not admit yet (``TierRouter.admits``) in the tier's
        admission queue (prefixlb.routing.admission): it is decided again, in arrival order,
        each time room may have come back, until a decision is admitted or ``admit_max_wait_s``
        has passed (then its latest decision goes anyway). A client that leaves while held
        cancels this wait and has taken nothing."""
        router = tier.router
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        fut = loop.create_future()
        h = tier.held.hold(key, d, self.clock(), tried, out_tokens, fut)
        outcome = "admitted"
        try:
            try:
                d = await asyncio.wait_for(fut, router.params.admit_max_wait_s)
            except asyncio.TimeoutError:
                outcome = "timeout"
                tier.held.leave(h, self.clock())
                return h.decision  # its latest decision, no longer held
            if h.timed_out:
                outcome = "timeout"
            return d
        except NoReplicaAvailable:
            outcome = "no_replica"
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"
            tier.held.leave(h, self.clock())
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                router.release(fut.result())  # admitted, but it will not be sent
            raise
        finally:
            self.metrics.admission_waits.inc((tier.name, outcome))
            self.metrics.admission_wait_seconds.observe((tier.name,), loop.time() - t0)

    async def _attempt(self, req, tier: Tier, replica: Replica, d: Decision, headers, ub: bytes, stream: bool,
                       started: float, key: PromptKey, trace: Trace | None) -> errors.PrefixlbError | None:
        """One attempt on one replica. Returns an error to retry elsewhere, or None when the
        client has been answered (successfully or not)."""
        router = tier.router
        cfg = self.config
        pool = self.pools[replica.id]
        resp = None
        closed = False
        try:
            try:
                resp = await pool.request("POST", req.path, headers, ub,
                                          timeout_first_byte=cfg.first_byte_timeout_s,
                                          read_timeout=cfg.stream_idle_timeout_s)
            except UpstreamError as exc:
                router.failed(d, self.clock())
                closed = True
                self._replica_failed(replica, str(exc))
                cls = errors.UpstreamTimedOut if isinstance(exc, UpstreamTimeout) else errors.UpstreamFailed
                return cls(f"replica {replica.url} failed: {exc}")
            if resp.status in _RETRYABLE:
                status = resp.status
                text = resp_status_text(await self._read_all(resp))
                resp = None
                router.failed(d, self.clock())
                closed = True
                self._replica_failed(replica, f"HTTP {status}: {text}")
                return errors.UpstreamFailed(f"replica {replica.url} answered {status}: {text}")
            replica.breaker.record(True, self.clock())
            # the headers the balancer adds, rendered ahead: the replica's, then the trace's
            lines = self._replica_lines[replica.id]
            if trace is not None:
                lines += trace.lines if trace.cascade is None else trace.cascade_lines()
            ctype = resp.header(b"content-type") or b""
            if stream and resp.status == 200 and b"event-stream" in ctype:
                usage = await self._relay_stream(req, resp, tier, replica, d, started, lines)
            else:
                usage = await self._relay_whole(req, resp, tier, replica, d, lines)
            status, resp = resp.status, None
            router.finished(d, self.clock(), usage,
                            prompt_text_bytes=key.text_bytes if key.token_ids is None else None)
            closed = True
            self._account(tier, replica, d, usage, started, status, trace)
            if not access.disabled:
                self._access(req, headers, tier, replica, d, usage, started, status)
            return None
        finally:
            if resp is not None:
                resp.abort()  # client gone or cancelled: the replica stops generating
            if not closed:
                if d.first_token_at is None and d.dispatched_at is not None and not req.prepared:
                    router.failed(d, self.clock())
                else:
                    router.finished(d, self.clock())
                if req.is_disconnected:
                    self.metrics.client_disconnects.inc((tier.name,))

    async def _read_all(self, resp) -> bytes:
        chunks = []
        try:
            while True:
                c = await resp.read_chunk()
                if not c:
                    break
                chunks.append(c)
            await resp.release()
        except UpstreamError:
            resp.abort()
        return b"".join(chunks)

    async def _relay_whole(self, req, resp, tier, replica, d, lines: bytes) -> dict | None:
        body = await self._read_all(resp)
        req.respond(resp.status, end_to_end(resp.headers), body, lines)
        if resp.status != 200:
            return None
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        u = parsed.get("usage") if isinstance(parsed, dict) else None
        return u if isinstance(u, dict) else None

    async def _relay_stream(self, req, resp, tier, replica, d, started, lines: bytes) -> dict | None:
        router = tier.router
        out = req.start(resp.status, end_to_end(resp.headers), lines=lines)
        prev = last = b""  # the usage event (include_usage) is in the last chunk or two
        first = True
        try:
            while True:
                chunk = await resp.read_chunk()
                if not chunk:
                    break
                if first:
                    first = False
                    now = self.clock()
                    router.first_token(d, now)
                    self.metrics.ttft_seconds.observe((tier.name, replica.url), time.perf_counter() - started)
                await out.write(chunk)
                prev, last = last, chunk
            await resp.release()
            await out.end()
        except UpstreamError as exc:
            # after the first byte: never retried; end the stream with an error event
            resp.abort()
            self._replica_failed(replica, str(exc))
            self.metrics.stream_errors.inc((tier.name,))
            err = orjson.dumps({"error": {"message": f"the replica failed mid-stream: {exc}",
                                          "type": "upstream_error", "param": None, "code": 502}})
            try:
                await out.end(b"data: " + err + b"\n\n" + _DONE)
            except ClientDisconnected:
                pass
            return None
        return _usage_from_sse_tail(prev[-8192:] + last)

    async def _remote_ids(self, tier: Tier, body: dict, chat: bool) -> list[int] | None:
        """The prompt's token ids from a replica's ``/tokenize`` (vLLM's chat or completion form:
        the chat template applied exactly as the replica applies it). None when no replica could
        answer; the request is then routed on its text."""
        now = self.clock()
        reps = [r for r in tier.replicas.values() if r.available(now)]
        if not reps:
            return None
        self._tok_rr = (self._tok_rr + 1) % len(reps)
        r = reps[self._tok_rr]
        if chat:
            q = {"messages": body.get("messages"), "add_generation_prompt": body.get("add_generation_prompt", True)}
            for k in ("tools", "chat_template_kwargs", "continue_final_message"):
                if k in body:
                    q[k] = body[k]
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
                return list(prompt)
            if isinstance(prompt, list):
                prompt = prompt[0] if prompt else ""
            q = {"prompt": prompt, "add_special_tokens": body.get("add_special_tokens", True)}
        model = tier.model or (min(r.models) if r.models else None)
        if model:
            q["model"] = model
        got = await fetch_json(self.monitor.session, r.url + "/tokenize", self.config.health_timeout_s, body=q)
        toks = got.get("tokens") if isinstance(got, dict) else None
        return toks if isinstance(toks, list) else None

    def _finish_tokens(self, tier: Tier, d: Decision, prepared, seed: int) -> None:
        """Precise mode: encode the prompt's unseen tail in the tokenizer thread (``tokenizers``
        releases the GIL), then hold the full chain on the chosen replica."""
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._tokenizer_pool(), tier.encoder.finish, prepared)  # type: ignore[attr-defined]

        def done(f: asyncio.Future) -> None:
            if f.cancelled() or f.exception() is not None:
                return
            ids = f.result()
            chain = index_block_hashes(array("I", ids).tobytes(), tier.router.block_bytes, seed)
            tier.router.extend(d, chain)

        fut.add_done_callback(done)

    def _tokenizer_pool(self):
        if self._tok_pool is None:
            from concurrent.futures import ThreadPoolExecutor

            # one thread: the encoders' chunk caches have a single writer
            self._tok_pool = ThreadPoolExecutor(1, thread_name_prefix="prefixlb-tokenize")
        return self._tok_pool

    def _access(self, req, headers, tier: Tier, replica: Replica, d: Decision, usage: dict | None, started: float,
                status: int) -> None:
        rid = next((v for k, v in headers if k == b"x-request-id"), b"").decode("latin-1")
        details = (usage or {}).get("prompt_tokens_details") or {}
        access.info("%s %s %d %s", req.method, req.path, status, replica.url, extra={
            "request_id": rid, "tier": tier.name, "replica": replica.url, "status": status,
            "duration_ms": round((time.perf_counter() - started) * 1e3, 2), "attempts": len(d.attempts),
            "predicted_cached_tokens": d.cached_tokens,
            "cached_tokens": details.get("cached_tokens") if isinstance(details, dict) else None,
            "prompt_tokens": (usage or {}).get("prompt_tokens"),
            "completion_tokens": (usage or {}).get("completion_tokens")})

    def _replica_failed(self, replica: Replica, why: str) -> None:
        replica.breaker.record(False, self.clock())
        replica.last_error = why
        self._sync(replica)

    def _account(self, tier: Tier, replica: Replica, d: Decision, usage: dict | None, started: float,
                 status: int, trace: Trace | None = None) -> None:
        # the families' inc()/observe() on series kept at hand (each created when first counted,
        # as those would): this runs for every answer, and a call and a label tuple cost more
        # than the addition
        a = self._series.get(replica.id)
        if a is None:  # this replica's first answer
            a = self._series[replica.id] = _ReplicaSeries(self.metrics, tier, replica)
        c = a.requests.get(status)
        if c is None:
            c = a.requests[status] = self.metrics.requests.cell((tier.name, replica.url, str(status)))
        c.v += 1.0
        a.e2e.observe(time.perf_counter() - started)
        a.predicted.v += d.cached_tokens
        if usage:
            details = usage.get("prompt_tokens_details") or {}
            cached = details.get("cached_tokens") if isinstance(details, dict) else None
            if isinstance(cached, int):
                c = a.actual
                if c is None:
                    c = a.actual = self.metrics.actual_cached.cell((tier.name, replica.url))
                c.v += cached
            p, n = usage.get("prompt_tokens"), usage.get("completion_tokens")
            if isinstance(p, int) and isinstance(n, int):
                if a.prompt is None:
                    m = self.metrics
                    a.prompt, a.completion, a.cost = (m.prompt_tokens.cell((tier.name,)),
                                                      m.completion_tokens.cell((tier.name,)),
                                                      m.cost.cell((tier.name,)))
                a.prompt.v += p
                a.completion.v += n  # type: ignore[union-attr]
                a.cost.v += (p * tier.input_per_mtok + n * tier.output_per_mtok) / 1e6  # type: ignore[union-attr]
        if trace is not None:  # tier routing: the request's trace records every attempt paid for
            trace.attempts.append((tier, replica.url, d.cached_tokens, usage, status))

    # -- admin -------------------------------------------------------------------------------------------

    def _admin(self, req: Request) -> None:
        token = self.config.admin_token
        if not token:
            raise errors.Unauthorized("the admin API is disabled: set admin.token (or admin.token_env) "
                                      "or PREFIXLB_ADMIN_TOKEN")
        auth = req.header(b"authorization") or b""
        if not _consteq(auth, b"Bearer " + token.encode()):
            raise errors.Unauthorized("missing or wrong admin bearer token")
        parts = [p for p in req.path.split("/") if p]
        now = self.clock()
        if parts == ["admin", "reload"]:
            if req.method != "POST":
                raise errors.MethodNotAllowed("/admin/reload takes POST")
            if self.config_source is None:
                raise errors.Conflict("no configuration file to reload (started from --replica flags)")
            try:
                summary = self.reload(self.config_source())
            except ConfigError as exc:
                raise errors.BadRequest(f"the configuration file is invalid, nothing changed: {exc}") from None
            req.respond_json(200, orjson.dumps(summary))
            return
        if parts == ["admin", "route"]:
            if req.method != "POST":
                raise errors.MethodNotAllowed("/admin/route takes POST")
            self._dry_run(req)
            return
        if parts == ["admin", "replicas"]:
            if req.method == "GET":
                req.respond_json(200, orjson.dumps([r.describe(now) | self._route_view(r, now)
                                                    for r in self.replicas.values()]))
                return
            if req.method == "POST":
                spec = errors.json_object(req.body)
                url = spec.get("url")
                tier_name = spec.get("tier", self.config.default)
                try:
                    url = check_url(url, "url")
                except ConfigError as exc:
                    raise errors.BadRequest(str(exc)) from None
                tier = self.tiers.get(tier_name)
                if tier is None:
                    raise errors.BadRequest(f"tier: {tier_name!r} is not a tier ({', '.join(self.tiers)})")
                if url in self._by_url:
                    raise errors.BadRequest(f"url: {url} is already a replica")
                cap = spec.get("capacity_tokens")
                if cap is not None and (not isinstance(cap, int) or cap < 16):
                    raise errors.BadRequest("capacity_tokens: must be an integer >= 16")
                r = self._add_replica(tier, url, cap)
                req.respond_json(201, orjson.dumps(r.describe(now)))
                return
            raise errors.MethodNotAllowed("/admin/replicas takes GET or POST")
        if len(parts) >= 3 and parts[:2] == ["admin", "replicas"]:
            try:
                rid = int(parts[2])
            except ValueError:
                raise errors.NotFound(f"no replica {parts[2]!r}") from None
            r = self.replicas.get(rid)
            if r is None:
                raise errors.NotFound(f"no replica {rid}")
            action = parts[3] if len(parts) > 3 else None
            if action in ("drain", "undrain") and req.method == "POST":
                r.draining = action == "drain"
                self._sync(r)
                req.respond_json(200, orjson.dumps(r.describe(now)))
                return
            if action is None and req.method == "DELETE":
                r.draining = True
                self._sync(r)
                asyncio.get_running_loop().create_task(self._remove_when_idle(r))
                req.respond_json(202, orjson.dumps(r.describe(now) | {"removing": True}))
                return
            if action is None and req.method == "GET":
                req.respond_json(200, orjson.dumps(r.describe(now) | self._route_view(r, now)))
                return
        if self.tiering is not None and self.tiering.admin(req, parts):
            return
        raise errors.NotFound(f"no admin route {req.method} {req.path}")

    def _dry_run(self, req: Request) -> None:
        """``POST /admin/route`` with a completion or chat body (``"chat": false`` for completions):
        the decision this balancer would make now, without sending anything."""
        body = errors.json_object(req.body)
        chat = body.pop("chat", "messages" in body)
        model = body.get("model")
        tier = self._resolve(model if isinstance(model, str) else None)
        try:
            key = prompt_key(body, bool(chat))
            if tier.encoder is not None:
                key = token_key(tier.encoder.prompt_ids(body, bool(chat)), body)  # type: ignore[attr-defined]
        except PromptError as exc:
            raise errors.BadRequest(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - the template refused the body
            raise errors.BadRequest(f"cannot tokenize the prompt: {exc}") from None
        try:
            d = tier.router.decide(key, self.clock())
        except NoReplicaAvailable as exc:
            raise errors.NoReplicaAvailable(str(exc), headers={"retry-after": "1"}) from None
        r = self.replicas[d.replica.id]
        req.respond_json(200, orjson.dumps({
            "tier": tier.name, "replica": r.id, "url": r.url, "prompt_tokens": d.prompt_tokens,
            "cached_tokens": d.cached_tokens, "predicted_ttft_ms": round(d.predicted_ttft * 1e3, 3),
            "precise": tier.router.events is not None}))

    def _route_view(self, r: Replica, now: float) -> dict:
        s = self.tiers[r.tier].router.replicas.get(r.id)
        if s is None:
            return {}
        return {"inflight": s.inflight, "backlog_tokens": round(s.backlog(now), 1),
                "prefill_tokens_per_s": round(s.prefill_rate, 1), "capacity_tokens": s.capacity_tokens}

    # -- the replica set at run time (admin API, discovery, config reload) -----------------------

    def add_replica(self, tier_name: str, url: str, capacity_tokens: int | None = None,
                    kv_events: EventSource | None = None) -> Replica:
        """Start routing to a new replica of ``tier_name`` (its models and capacity are learned
        from its /v1/models and /metrics). Raises KeyError for an unknown tier, ValueError for a
        URL that is already a replica."""
        tier = self.tiers[tier_name]
        if url in self._by_url:
            raise ValueError(f"{url} is already a replica")
        r = self._add_replica(tier, url, capacity_tokens)
        loop = asyncio.get_running_loop()
        loop.create_task(self._learn_models_of(r))
        if kv_events is not None and self.events is not None:
            self.events.add_source(dataclasses.replace(kv_events, replica_id=r.id))
        return r

    def remove_replica(self, url: str) -> Replica | None:
        """Drain the replica at ``url`` (no new work) and drop it once its requests finish (or
        after the drain timeout). Returns it, or None if it is not a replica."""
        r = self._by_url.get(url)
        if r is None:
            return None
        r.draining = True
        self._sync(r)
        asyncio.get_running_loop().create_task(self._remove_when_idle(r))
        return r

    async def _learn_models_of(self, r: Replica) -> None:
        r.models |= await fetch_models(self.monitor.session, r.url, self.config.health_timeout_s * 2)

    async def _remove_when_idle(self, r: Replica) -> None:
        tier = self.tiers[r.tier]
        deadline = self.clock() + self.config.drain_timeout_s
        while self.clock() < deadline:
            s = tier.router.replicas.get(r.id)
            if s is None or s.inflight == 0:
                break
            await asyncio.sleep(0.05)
        tier.router.remove_replica(r.id)
        tier.replicas.pop(r.id, None)
        self.replicas.pop(r.id, None)
        self._replica_lines.pop(r.id, None)
        self._series.pop(r.id, None)
        if self._by_url.get(r.url) is r:
            del self._by_url[r.url]
        if self.events is not None:
            self.events.remove_source(r.id)
        pool = self.pools.pop(r.id, None)
        if pool is not None:
            await pool.close()


class _ReplicaSeries:
    """The metric series ``Balancer._account`` adds to for one replica, made at its first answer
    (a series is exposed once counted): those every answer counts at once, the others (by status,
    and from usage) when first counted. The per-tier ones are the family's, shared with the
    tier's other replicas."""

    __slots__ = ("actual", "completion", "cost", "e2e", "predicted", "prompt", "requests")

    def __init__(self, m: BalancerMetrics, tier: Tier, replica: Replica) -> None:
        self.requests: dict[int, Cell] = {}  # by HTTP status
        self.e2e: Histogram = m.e2e_seconds.child((tier.name,))
        self.predicted: Cell = m.predicted_cached.cell((tier.name, replica.url))
        self.actual: Cell | None = None
        self.prompt: Cell | None = None
        self.completion: Cell | None = None
        self.cost: Cell | None = None


def _encoder(spec: str):
    """The tier's prompt tokenizer in precise mode: a Hugging Face directory, or "byte"."""
    from prefixlb.engine.tokenizer import CachedEncoder, HFTokenizer, default_tokenizer

    tok = default_tokenizer() if spec == "byte" else HFTokenizer.from_dir(spec)
    return CachedEncoder(tok)


def _consteq(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def resp_status_text(body: bytes) -> str:
    try:
        e = orjson.loads(body)
        if isinstance(e, dict) and isinstance(e.get("error"), dict):
            return str(e["error"].get("message", ""))[:300]
    except orjson.JSONDecodeError:
        pass
    return body[:300].decode("utf-8", "replace")


def _usage_from_sse_tail(tail: bytes) -> dict | None:
    """The ``usage`` object of the last SSE event that carries one (stream_options.include_usage)."""
    i = tail.rfind(b'"usage"')
    if i < 0:
        return None
    start = tail.rfind(b"data: ", 0, i)
    end = tail.find(b"\n", i)
    if start < 0:
        return None
    try:
        ev = orjson.loads(tail[start + 6 : end if end >= 0 else len(tail)])
    except orjson.JSONDecodeError:
        return None
    u = ev.get("usage") if isinstance(ev, dict) else None
    return u if isinstance(u, dict) else None
