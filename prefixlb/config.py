"""Balancer configuration: the YAML file of DESIGN.md, or ``--replica`` flags, validated.

Every key is checked; an error names its path (``tiers[1].replicas[0]: must be an http(s)
URL``) and unknown keys are refused with the list of known ones, so a typo never passes
silently. Durations are seconds unless the key says ``_ms``.

```yaml
listen: {host: 127.0.0.1, port: 8000}
tiers:                            # cheapest first
  - name: small
    model: llama-3.1-8b           # the model name the replicas serve
    price: {input_per_mtok: 0.18, output_per_mtok: 0.18}
    replicas: [http://127.0.0.1:9001, {url: http://127.0.0.1:9002, capacity_tokens: 400000}]
    cost: {prefill_tokens_per_s: 12000, fixed_ms: 15, context_weight: 0.001, step_tokens: 8192}
  - name: large                   # precise mode: the index follows vLLM's KV-cache events
    precise: {tokenizer: /models/llama-3.1-70b, block_size: 16}
    replicas:
      - url: http://10.0.0.7:8000  # vLLM: --kv-events-config '{"enable_kv_cache_events": true,
        kv_events:                 #   "endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558"}'
          {endpoint: "tcp://10.0.0.7:5557", replay_endpoint: "tcp://10.0.0.7:5558"}
routing: {policy: cache_aware, default_tier: small}
admin: {token_env: PREFIXLB_ADMIN_TOKEN}
```
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from prefixlb.routing.policies import POLICIES

__all__ = ["Config", "ConfigError", "KVEventsConfig", "PreciseConfig", "ReplicaConfig", "TierConfig", "config_from_flags",
           "load_config"]


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type, or out of range; names the key."""


@dataclass(frozen=True)
class KVEventsConfig:
    """Where a replica's KV-cache events come from (its ``--kv-events-config``)."""

    endpoint: str  # what the balancer connects to (replica bound tcp://*:P) or binds (bind: true)
    topic: str = ""
    replay_endpoint: str | None = None
    bind: bool = False  # the replica was given a concrete host, so it connects to the balancer


@dataclass(frozen=True)
class ReplicaConfig:
    url: str
    capacity_tokens: int | None = None
    kv_events: KVEventsConfig | None = None


@dataclass(frozen=True)
class PreciseConfig:
    """Precise mode for a tier: the index follows the replicas' KV events, prompts are tokenized."""

    # a directory with tokenizer.json (+ chat template); "replica": ask a replica's /tokenize per
    # request (no local tokenizer, ~1 ms more); "byte": the emulator's default rule
    tokenizer: str
    block_size: int = 16  # vLLM's --block-size
    speculative_grace_s: float = 1.0
    discover: bool = False  # event sources from each replica's /kv_event_sources


@dataclass(frozen=True)
class CostConfig:
    prefill_tokens_per_s: float = 10_000.0
    fixed_ms: float = 10.0
    context_weight: float = 1e-3  # prefill-token equivalents per context token per step
    step_tokens: int = 8192


@dataclass(frozen=True)
class TierConfig:
    name: str
    model: str | None  # served model name; None = learn it from the replicas' /v1/models
    replicas: tuple[ReplicaConfig, ...]
    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0
    cost: CostConfig = field(default_factory=CostConfig)
    precise: PreciseConfig | None = None


@dataclass(frozen=True)
class KubernetesDiscoveryConfig:
    namespace: str
    label_selector: str
    port: int
    tier: str | None = None
    tier_label: str | None = None
    scheme: str = "http"
    api: str | None = None  # API server URL; default in-cluster, then ~/.kube/config


@dataclass(frozen=True)
class DNSDiscoveryConfig:
    name: str
    tier: str
    port: int | None = None  # None: SRV records give the ports
    interval_s: float = 5.0
    scheme: str = "http"
    nameservers: tuple[str, ...] = ()
    nameserver_port: int = 53


@dataclass(frozen=True)
class DiscoveryConfig:
    kubernetes: tuple[KubernetesDiscoveryConfig, ...] = ()
    dns: tuple[DNSDiscoveryConfig, ...] = ()


@dataclass(frozen=True)
class PeersConfig:
    """Peer sync between balancer instances (prefixlb.server.peers)."""

    listen: str  # ZMQ endpoint this instance publishes on, e.g. tcp://0.0.0.0:5600
    connect: tuple[str, ...] = ()  # every other instance's endpoint


@dataclass(frozen=True)
class Config:
    tiers: tuple[TierConfig, ...]
    host: str = "127.0.0.1"
    port: int = 8000
    tls_cert: str | None = None  # PEM certificate chain: serve HTTPS
    tls_key: str | None = None
    policy: str = "cache_aware"
    default_tier: str | None = None
    block_bytes: int = 64
    bytes_per_token: float = 4.0
    pressure_weight: float = 1.0
    seed: int = 0
    admin_token: str | None = None
    max_body_bytes: int = 32 * 1024 * 1024
    max_header_bytes: int = 64 * 1024
    first_byte_timeout_s: float = 300.0
    request_timeout_s: float = 1800.0
    stream_idle_timeout_s: float = 300.0
    connect_timeout_s: float = 3.0
    max_attempts: int = 3
    health_interval_s: float = 2.0
    health_timeout_s: float = 1.0
    health_fail_threshold: int = 2
    health_pass_threshold: int = 1
    scrape_interval_s: float = 1.0
    scrape_timeout_s: float = 1.0
    breaker_failure_threshold: int = 5
    breaker_open_s: float = 5.0
    drain_timeout_s: float = 30.0
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    peers: PeersConfig | None = None

    @property
    def default(self) -> str:
        return self.default_tier or self.tiers[0].name


# -- validation helpers ------------------------------------------------------------------------


def _keys(obj: Any, path: str, allowed: Sequence[str]) -> Mapping[str, Any]:
    if obj is None:
        return {}
    if not isinstance(obj, Mapping):
        raise ConfigError(f"{path}: must be a mapping, got {type(obj).__name__}")
    unknown = [k for k in obj if k not in allowed]
    if unknown:
        raise ConfigError(f"{path}.{unknown[0]}: unknown key (known: {', '.join(allowed)})")
    return obj


def _num(obj: Mapping[str, Any], key: str, path: str, default, *, lo=None, hi=None, integer=False):
    if key not in obj or obj[key] is None:
        return default
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise ConfigError(f"{path}.{key}: must be {'an integer' if integer else 'a number'}, got {v!r}")
    if lo is not None and v < lo:
        raise ConfigError(f"{path}.{key}: must be >= {lo}, got {v!r}")
    if hi is not None and v > hi:
        raise ConfigError(f"{path}.{key}: must be <= {hi}, got {v!r}")
    return v


def _str(obj: Mapping[str, Any], key: str, path: str, default: str | None) -> str | None:
    if key not in obj or obj[key] is None:
        return default
    v = obj[key]
    if not isinstance(v, str) or not v.strip():
        raise ConfigError(f"{path}.{key}: must be a non-empty string, got {v!r}")
    return v


def check_url(url: Any, path: str) -> str:
    if not isinstance(url, str):
        raise ConfigError(f"{path}: must be an http(s) URL string, got {url!r}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{path}: must be an http(s) URL like http://10.0.0.5:8000, got {url!r}")
    try:
        parts.port
    except ValueError as exc:
        raise ConfigError(f"{path}: bad port in {url!r}") from exc
    return url.rstrip("/")


def check_zmq_endpoint(ep: Any, path: str) -> str:
    if not isinstance(ep, str) or not ep.startswith(("tcp://", "ipc://", "inproc://")):
        raise ConfigError(f"{path}: must be a ZMQ endpoint like tcp://10.0.0.5:5557, got {ep!r}")
    return ep


def _kv_events(obj: Any, path: str) -> KVEventsConfig | None:
    if obj is None:
        return None
    m = _keys(obj, path, ("endpoint", "topic", "replay_endpoint", "bind"))
    if "endpoint" not in m:
        raise ConfigError(f"{path}.endpoint: required")
    bind = m.get("bind", False)
    if not isinstance(bind, bool):
        raise ConfigError(f"{path}.bind: must be true or false, got {bind!r}")
    topic = m.get("topic", "")
    if not isinstance(topic, str):
        raise ConfigError(f"{path}.topic: must be a string, got {topic!r}")
    replay = m.get("replay_endpoint")
    return KVEventsConfig(
        endpoint=check_zmq_endpoint(m["endpoint"], f"{path}.endpoint"),
        topic=topic,
        replay_endpoint=None if replay is None else check_zmq_endpoint(replay, f"{path}.replay_endpoint"),
        bind=bind,
    )


def _replica(obj: Any, path: str) -> ReplicaConfig:
    if isinstance(obj, str):
        return ReplicaConfig(check_url(obj, path))
    m = _keys(obj, path, ("url", "capacity_tokens", "kv_events"))
    if "url" not in m:
        raise ConfigError(f"{path}.url: required")
    return ReplicaConfig(
        check_url(m["url"], f"{path}.url"),
        _num(m, "capacity_tokens", path, None, lo=16, integer=True),
        _kv_events(m.get("kv_events"), f"{path}.kv_events"),
    )


def _precise(obj: Any, path: str) -> PreciseConfig | None:
    if obj is None:
        return None
    m = _keys(obj, path, ("tokenizer", "block_size", "speculative_grace_s", "discover"))
    tok = _str(m, "tokenizer", path, None)
    if tok is None:
        raise ConfigError(f"{path}.tokenizer: required (a directory with tokenizer.json, 'replica' or 'byte')")
    if tok not in ("byte", "replica") and not os.path.isfile(os.path.join(tok, "tokenizer.json")):
        raise ConfigError(f"{path}.tokenizer: no tokenizer.json in {tok!r}")
    discover = m.get("discover", False)
    if not isinstance(discover, bool):
        raise ConfigError(f"{path}.discover: must be true or false, got {discover!r}")
    return PreciseConfig(
        tokenizer=tok,
        block_size=_num(m, "block_size", path, 16, lo=1, hi=4096, integer=True),
        speculative_grace_s=_num(m, "speculative_grace_s", path, 1.0, lo=0),
        discover=discover,
    )


def _tier(obj: Any, path: str, discovered: bool = False) -> TierConfig:
    m = _keys(obj, path, ("name", "model", "price", "replicas", "cost", "precise"))
    name = _str(m, "name", path, None)
    if name is None:
        raise ConfigError(f"{path}.name: required")
    reps = m.get("replicas", [] if discovered else None)
    if not isinstance(reps, list) or (not reps and not discovered):
        raise ConfigError(f"{path}.replicas: must be a non-empty list of URLs (or configure discovery)")
    replicas = tuple(_replica(r, f"{path}.replicas[{i}]") for i, r in enumerate(reps))
    seen = set()
    for i, r in enumerate(replicas):
        if r.url in seen:
            raise ConfigError(f"{path}.replicas[{i}]: {r.url} is listed twice")
        seen.add(r.url)
    price = _keys(m.get("price"), f"{path}.price", ("input_per_mtok", "output_per_mtok"))
    cost = _keys(m.get("cost"), f"{path}.cost",
                 ("prefill_tokens_per_s", "fixed_ms", "context_weight", "step_tokens"))
    cp = f"{path}.cost"
    return TierConfig(
        name=name,
        model=_str(m, "model", path, None),
        replicas=replicas,
        input_per_mtok=_num(price, "input_per_mtok", f"{path}.price", 0.0, lo=0),
        output_per_mtok=_num(price, "output_per_mtok", f"{path}.price", 0.0, lo=0),
        cost=CostConfig(
            prefill_tokens_per_s=_num(cost, "prefill_tokens_per_s", cp, 10_000.0, lo=1),
            fixed_ms=_num(cost, "fixed_ms", cp, 10.0, lo=0),
            context_weight=_num(cost, "context_weight", cp, 1e-3, lo=0, hi=1),
            step_tokens=_num(cost, "step_tokens", cp, 8192, lo=16, integer=True),
        ),
        precise=_precise(m.get("precise"), f"{path}.precise"),
    )


_TOP = ("listen", "tiers", "routing", "admin", "limits", "timeouts", "retries", "health", "scrape", "breaker",
        "discovery", "peers")


def _discovery(obj: Any) -> DiscoveryConfig:
    m = _keys(obj, "discovery", ("kubernetes", "dns"))
    kube, dns = [], []
    for key, out in (("kubernetes", kube), ("dns", dns)):
        items = m.get(key, [])
        if isinstance(items, Mapping):
            items = [items]
        if not isinstance(items, list):
            raise ConfigError(f"discovery.{key}: must be a list of sources")
        for i, it in enumerate(items):
            p = f"discovery.{key}[{i}]"
            if key == "kubernetes":
                k = _keys(it, p, ("namespace", "label_selector", "port", "tier", "tier_label", "scheme", "api"))
                for req in ("namespace", "label_selector", "port"):
                    if req not in k:
                        raise ConfigError(f"{p}.{req}: required")
                tier, label = _str(k, "tier", p, None), _str(k, "tier_label", p, None)
                if (tier is None) == (label is None):
                    raise ConfigError(f"{p}: give exactly one of tier (a fixed tier) and tier_label (a pod label)")
                api = k.get("api")
                out.append(KubernetesDiscoveryConfig(
                    namespace=_str(k, "namespace", p, None), label_selector=_str(k, "label_selector", p, None),
                    port=_num(k, "port", p, None, lo=1, hi=65535, integer=True), tier=tier, tier_label=label,
                    scheme=_scheme(k, p), api=None if api is None else check_url(api, f"{p}.api")))
            else:
                d = _keys(it, p, ("name", "tier", "port", "interval_s", "scheme", "nameservers", "nameserver_port"))
                for req in ("name", "tier"):
                    if req not in d:
                        raise ConfigError(f"{p}.{req}: required")
                ns = d.get("nameservers", [])
                if not isinstance(ns, list) or not all(isinstance(x, str) for x in ns):
                    raise ConfigError(f"{p}.nameservers: must be a list of IP addresses")
                out.append(DNSDiscoveryConfig(
                    name=_str(d, "name", p, None), tier=_str(d, "tier", p, None),
                    port=_num(d, "port", p, None, lo=1, hi=65535, integer=True),
                    interval_s=_num(d, "interval_s", p, 5.0, lo=0.05), scheme=_scheme(d, p), nameservers=tuple(ns),
                    nameserver_port=_num(d, "nameserver_port", p, 53, lo=1, hi=65535, integer=True)))
    return DiscoveryConfig(tuple(kube), tuple(dns))


def _peers(obj: Any) -> PeersConfig | None:
    if obj is None:
        return None
    m = _keys(obj, "peers", ("listen", "connect"))
    if "listen" not in m:
        raise ConfigError("peers.listen: required (the ZMQ endpoint this instance publishes on)")
    conn = m.get("connect", [])
    if not isinstance(conn, list):
        raise ConfigError("peers.connect: must be a list of ZMQ endpoints")
    return PeersConfig(check_zmq_endpoint(m["listen"], "peers.listen"),
                       tuple(check_zmq_endpoint(c, f"peers.connect[{i}]") for i, c in enumerate(conn)))


def _scheme(m: Mapping[str, Any], path: str) -> str:
    v = m.get("scheme", "http")
    if v not in ("http", "https"):
        raise ConfigError(f"{path}.scheme: must be http or https, got {v!r}")
    return v


def parse_config(raw: Any, source: str = "config") -> Config:
    """Validate a parsed YAML document into a Config."""
    top = _keys(raw, source, _TOP)
    listen = _keys(top.get("listen"), "listen", ("host", "port", "tls_cert", "tls_key"))
    tls_cert, tls_key = _str(listen, "tls_cert", "listen", None), _str(listen, "tls_key", "listen", None)
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("listen.tls_key: tls_cert and tls_key go together")
    for k, v in (("tls_cert", tls_cert), ("tls_key", tls_key)):
        if v is not None and not os.path.isfile(v):
            raise ConfigError(f"listen.{k}: no such file {v!r}")
    routing = _keys(top.get("routing"), "routing",
                    ("policy", "default_tier", "block_bytes", "bytes_per_token", "pressure_weight", "seed"))
    admin = _keys(top.get("admin"), "admin", ("token", "token_env"))
    limits = _keys(top.get("limits"), "limits", ("max_body_bytes", "max_header_bytes"))
    timeouts = _keys(top.get("timeouts"), "timeouts",
                     ("connect_s", "first_byte_s", "request_s", "stream_idle_s", "drain_s"))
    retries = _keys(top.get("retries"), "retries", ("max_attempts",))
    health = _keys(top.get("health"), "health", ("interval_s", "timeout_s", "fail_threshold", "pass_threshold"))
    scrape = _keys(top.get("scrape"), "scrape", ("interval_s", "timeout_s"))
    breaker = _keys(top.get("breaker"), "breaker", ("failure_threshold", "open_s"))

    tiers_raw = top.get("tiers")
    if not isinstance(tiers_raw, list) or not tiers_raw:
        raise ConfigError("tiers: required, a non-empty list of tiers (cheapest first)")
    discovery = _discovery(top.get("discovery"))
    discovered = bool(discovery.kubernetes or discovery.dns)
    tiers = tuple(_tier(t, f"tiers[{i}]", discovered) for i, t in enumerate(tiers_raw))
    names = [t.name for t in tiers]
    for i, d in enumerate(discovery.dns):
        if d.tier not in names:
            raise ConfigError(f"discovery.dns[{i}].tier: {d.tier!r} is not a tier (tiers: {', '.join(names)})")
    for i, k in enumerate(discovery.kubernetes):
        if k.tier is not None and k.tier not in names:
            raise ConfigError(f"discovery.kubernetes[{i}].tier: {k.tier!r} is not a tier (tiers: {', '.join(names)})")
    for i, n in enumerate(names):
        if n in names[:i]:
            raise ConfigError(f"tiers[{i}].name: {n!r} is used twice")
        if n == "auto":
            raise ConfigError(f"tiers[{i}].name: 'auto' is reserved (it asks the balancer to choose)")
    urls = [(r.url, t.name) for t in tiers for r in t.replicas]
    for i, (u, tn) in enumerate(urls):
        for u2, tn2 in urls[:i]:
            if u == u2:
                raise ConfigError(f"tiers: replica {u} is in both {tn2!r} and {tn!r}")

    policy = _str(routing, "policy", "routing", "cache_aware")
    if policy not in POLICIES:
        raise ConfigError(f"routing.policy: unknown policy {policy!r} (choose one of {', '.join(POLICIES)})")
    default_tier = _str(routing, "default_tier", "routing", None)
    if default_tier is not None and default_tier not in names:
        raise ConfigError(f"routing.default_tier: {default_tier!r} is not a tier (tiers: {', '.join(names)})")

    token = _str(admin, "token", "admin", None)
    env = _str(admin, "token_env", "admin", None)
    if env is not None:
        token = os.environ.get(env) or token
    port = _num(listen, "port", "listen", 8000, lo=0, hi=65535, integer=True)

    return Config(
        tiers=tiers,
        host=_str(listen, "host", "listen", "127.0.0.1"),
        port=port,
        tls_cert=tls_cert,
        tls_key=tls_key,
        policy=policy,
        default_tier=default_tier,
        block_bytes=_num(routing, "block_bytes", "routing", 64, lo=4, hi=65536, integer=True),
        bytes_per_token=_num(routing, "bytes_per_token", "routing", 4.0, lo=0.5, hi=64),
        pressure_weight=_num(routing, "pressure_weight", "routing", 1.0, lo=0, hi=100),
        seed=_num(routing, "seed", "routing", 0, lo=0, integer=True),
        admin_token=token,
        max_body_bytes=_num(limits, "max_body_bytes", "limits", 32 * 1024 * 1024, lo=1024, integer=True),
        max_header_bytes=_num(limits, "max_header_bytes", "limits", 64 * 1024, lo=1024, integer=True),
        connect_timeout_s=_num(timeouts, "connect_s", "timeouts", 3.0, lo=0.01),
        first_byte_timeout_s=_num(timeouts, "first_byte_s", "timeouts", 300.0, lo=0.01),
        request_timeout_s=_num(timeouts, "request_s", "timeouts", 1800.0, lo=0.01),
        stream_idle_timeout_s=_num(timeouts, "stream_idle_s", "timeouts", 300.0, lo=0.01),
        drain_timeout_s=_num(timeouts, "drain_s", "timeouts", 30.0, lo=0),
        max_attempts=_num(retries, "max_attempts", "retries", 3, lo=1, hi=16, integer=True),
        health_interval_s=_num(health, "interval_s", "health", 2.0, lo=0.05),
        health_timeout_s=_num(health, "timeout_s", "health", 1.0, lo=0.01),
        health_fail_threshold=_num(health, "fail_threshold", "health", 2, lo=1, integer=True),
        health_pass_threshold=_num(health, "pass_threshold", "health", 1, lo=1, integer=True),
        scrape_interval_s=_num(scrape, "interval_s", "scrape", 1.0, lo=0.05),
        scrape_timeout_s=_num(scrape, "timeout_s", "scrape", 1.0, lo=0.01),
        breaker_failure_threshold=_num(breaker, "failure_threshold", "breaker", 5, lo=1, integer=True),
        breaker_open_s=_num(breaker, "open_s", "breaker", 5.0, lo=0.01),
        discovery=discovery,
        peers=_peers(top.get("peers")),
    )


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config file."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read ({exc.strerror or exc})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({exc})") from exc
    return parse_config(raw, str(p))


def config_from_flags(replicas: Sequence[str], *, policy: str = "cache_aware", host: str = "127.0.0.1",
                      port: int = 8000, base: Config | None = None) -> Config:
    """``--replica URL ...``: one tier whose model names are learned from the replicas."""
    reps = tuple(ReplicaConfig(check_url(u, f"--replica[{i}]")) for i, u in enumerate(replicas))
    if not reps:
        raise ConfigError("--replica: give at least one replica URL (or --config FILE)")
    if policy not in POLICIES:
        raise ConfigError(f"--policy: unknown policy {policy!r} (choose one of {', '.join(POLICIES)})")
    tier = TierConfig(name="default", model=None, replicas=reps)
    cfg = base or Config(tiers=(tier,))
    return replace(cfg, tiers=(tier,), policy=policy, host=host, port=port)
