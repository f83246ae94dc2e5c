"""Replica discovery: which replicas exist, from Kubernetes or DNS, as they come and go.

Sources report the complete set they currently see, as ``{url: tier}``; the
:class:`Reconciler` turns successive sets into ``add(tier, url)`` / ``remove(url)`` calls
on the balancer (which drains a leaving replica: no new work, in-flight requests finish).
Replicas listed statically in the config are never touched by discovery.

* :class:`KubernetesPods` lists and then watches pods matching a label selector through the
  official ``kubernetes`` client (run in a thread: the client is synchronous). A pod counts
  when it has an IP, its ``Ready`` condition is true and it is not terminating, so a pod
  being replaced leaves the set before it stops answering. Its tier comes from a pod label
  (``tier_label``), or is the source's fixed tier. A watch that expires (HTTP 410) or breaks
  is resumed by listing again.
* :class:`DNSRecords` re-resolves a name every ``interval`` seconds: SRV records
  (``_http._tcp.vllm.llm.svc.cluster.local``: each target and port), or A/AAAA records of a
  headless service with a fixed port. A failed lookup keeps the last set (a DNS hiccup must
  not empty the fleet); an authoritative "no such name" empties it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["DNSRecords", "KubernetesPods", "Reconciler"]

log = logging.getLogger("prefixlb.fleet.discovery")

OnChange = Callable[[str, dict[str, str]], None]  # (source name, {url: tier})


class Reconciler:
    """Applies each source's current set to the balancer; one reconciler, many sources."""

    def __init__(self, add: Callable[[str, str], Any], remove: Callable[[str], Any],
                 static: set[str] | None = None) -> None:
        self._add = add
        self._remove = remove
        self._static = set(static or ())
        self._by_source: dict[str, dict[str, str]] = {}
        self.live: dict[str, str] = {}  # url -> tier, everything discovery added
        self.changes = 0

    def update(self, source: str, seen: Mapping[str, str]) -> None:
        self._by_source[source] = dict(seen)
        want: dict[str, str] = {}
        for s in self._by_source.values():
            want.update(s)
        for url in [u for u in self.live if u not in want or want[u] != self.live[u]]:
            log.info("discovery: %s left (%s)", url, self.live[url])
            self._remove(url)
            del self.live[url]
            self.changes += 1
        for url, tier in want.items():
            if url in self.live or url in self._static:
                continue
            try:
                self._add(tier, url)
            except (KeyError, ValueError) as exc:
                log.warning("discovery: cannot add %s to tier %r: %s", url, tier, exc)
                continue
            log.info("discovery: %s joined tier %r", url, tier)
            self.live[url] = tier
            self.changes += 1


# -- Kubernetes -----------------------------------------------------------------------------------


def _pod_url(pod: Any, port: int, scheme: str) -> str | None:
    status = pod.status
    ip = getattr(status, "pod_ip", None) if status is not None else None
    if not ip or pod.metadata.deletion_timestamp is not None:
        return None
    ready = any(c.type == "Ready" and c.status == "True" for c in (status.conditions or []))
    if not ready:
        return None
    host = f"[{ip}]" if ":" in ip else ip
    return f"{scheme}://{host}:{port}"


@dataclass
class KubernetesPods:
    """Pods matching ``label_selector`` in ``namespace``; tier from ``tier_label`` or ``tier``."""

    namespace: str
    label_selector: str
    port: int
    tier: str | None = None
    tier_label: str | None = None
    scheme: str = "http"
    host: str | None = None  # API server URL (default: in-cluster config, else ~/.kube/config)
    name: str = "kubernetes"

    def __post_init__(self) -> None:
        if (self.tier is None) == (self.tier_label is None):
            raise ValueError("give exactly one of tier and tier_label")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pods: dict[str, tuple[str, str]] = {}  # pod name -> (url, tier)
        self._watch: Any = None

    def _client(self) -> Any:
        from kubernetes import client, config

        if self.host:
            cfg = client.Configuration()
            cfg.host = self.host
            return client.CoreV1Api(client.ApiClient(cfg))
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        return client.CoreV1Api()

    def _tier_of(self, pod: Any) -> str | None:
        if self.tier is not None:
            return self.tier
        return (pod.metadata.labels or {}).get(self.tier_label)

    def _apply(self, kind: str, pod: Any) -> bool:
        name = pod.metadata.name
        url = None if kind == "DELETED" else _pod_url(pod, self.port, self.scheme)
        tier = self._tier_of(pod)
        before = self._pods.get(name)
        if url is None or tier is None:
            self._pods.pop(name, None)
        else:
            self._pods[name] = (url, tier)
        return self._pods.get(name) != before

    def current(self) -> dict[str, str]:
        return {url: tier for url, tier in self._pods.values()}

    async def start(self, on_change: OnChange) -> None:
        loop = asyncio.get_running_loop()

        def emit() -> None:
            snapshot = self.current()
            loop.call_soon_threadsafe(on_change, self.name, snapshot)

        self._thread = threading.Thread(target=self._run, args=(emit,), name="prefixlb-k8s-discovery", daemon=True)
        self._thread.start()

    def _run(self, emit: Callable[[], None]) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        api = self._client()
        backoff = 0.5
        while not self._stop.is_set():
            try:
                listing = api.list_namespaced_pod(self.namespace, label_selector=self.label_selector)
                self._pods.clear()
                for pod in listing.items:
                    self._apply("ADDED", pod)
                emit()
                rv = listing.metadata.resource_version
                self._watch = watch.Watch()
                for ev in self._watch.stream(api.list_namespaced_pod, self.namespace,
                                             label_selector=self.label_selector, resource_version=rv,
                                             timeout_seconds=300):
                    if self._stop.is_set():
                        break
                    if ev.get("type") == "ERROR":
                        break  # e.g. 410 Gone: list again
                    if self._apply(ev["type"], ev["object"]):
                        emit()
                backoff = 0.5
            except ApiException as exc:
                if self._stop.is_set():
                    return
                log.warning("discovery: kubernetes API error %s %s; retrying in %.1fs", exc.status, exc.reason,
                            backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
            except Exception as exc:  # noqa: BLE001 - a broken connection: keep the last set, retry
                if self._stop.is_set():
                    return
                log.warning("discovery: kubernetes watch failed (%s); retrying in %.1fs", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)

    async def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            with contextlib.suppress(Exception):
                self._watch.stop()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 2.0)


# -- DNS --------------------------------------------------------------------------------------------


@dataclass
class DNSRecords:
    """The replicas behind a DNS name: SRV records, or A/AAAA records with a fixed ``port``."""

    name: str
    tier: str
    port: int | None = None  # A/AAAA mode; None: SRV mode
    interval: float = 5.0
    scheme: str = "http"
    nameservers: tuple[str, ...] = ()  # default: the system's resolv.conf
    nameserver_port: int = 53
    timeout: float = 2.0
    source: str = ""

    def __post_init__(self) -> None:
        self.source = self.source or f"dns:{self.name}"
        self._task: asyncio.Task | None = None
        self.last: dict[str, str] = {}
        self.failures = 0

    def _resolver(self) -> Any:
        import dns.asyncresolver

        r = dns.asyncresolver.Resolver(configure=not self.nameservers)
        if self.nameservers:
            r.nameservers = list(self.nameservers)
            r.port = self.nameserver_port
        r.lifetime = self.timeout
        return r

    async def resolve(self) -> dict[str, str] | None:
        """The current set, or None when the lookup failed (keep the previous one)."""
        import dns.exception
        import dns.resolver

        res = self._resolver()
        try:
            if self.port is None:
                answer = await res.resolve(self.name, "SRV")
                targets = [(str(r.target).rstrip("."), r.port) for r in answer]
                out = {}
                for host, port in targets:
                    for ip in await self._addresses(res, host):
                        out[self._url(ip, port)] = self.tier
                return out
            return {self._url(ip, self.port): self.tier for ip in await self._addresses(res, self.name)}
        except dns.resolver.NXDOMAIN:
            return {}
        except (dns.exception.DNSException, OSError) as exc:
            self.failures += 1
            log.warning("discovery: resolving %s failed (%s); keeping %d replicas", self.name, exc, len(self.last))
            return None

    async def _addresses(self, res: Any, host: str) -> list[str]:
        import dns.resolver

        out = []
        for rtype in ("A", "AAAA"):
            try:
                out += [r.address for r in await res.resolve(host, rtype)]
            except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
                continue
        return sorted(out)

    def _url(self, ip: str, port: int) -> str:
        host = f"[{ip}]" if ":" in ip else ip
        return f"{self.scheme}://{host}:{port}"

    async def start(self, on_change: OnChange) -> None:
        async def loop() -> None:
            while True:
                got = await self.resolve()
                if got is not None and (got != self.last or not self.last):
                    self.last = got
                    on_change(self.source, got)
                await asyncio.sleep(self.interval)

        self._task = asyncio.get_running_loop().create_task(loop(), name=f"discovery {self.source}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
