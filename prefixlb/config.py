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
    cost: {prefill_tokens_per_s: 12000, fixed_ms: 15, context_weight: 0.001, step_tokens: 8192,
           admit_share: 0.75, admit_max_wait_s: 2}   # admission: see TierRouter.admits
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
    admit_share: float = 0.75  # admission: hold requests while their replica has this share of
    # step_tokens sent and not yet prefilled (0: never hold)
    admit_max_wait_s: float = 2.0  # the longest a request is held before it goes anyway


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
    tier_routing: TierRoutingConfig | None = None  # the optional ``tier_routing:`` section

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


def _has_control(v: str) -> bool:
    """True for a string with a control character (CR, LF, NUL, ...): it could not be sent as a
    header value (a replica's URL and a tier's name are, on every answer) nor logged as one line."""
    return any(c < " " or c == "\x7f" for c in v)


def check_url(url: Any, path: str) -> str:
    if not isinstance(url, str):
        raise ConfigError(f"{path}: must be an http(s) URL string, got {url!r}")
    if _has_control(url) or " " in url:  # (urlsplit would silently drop tabs and newlines)
        raise ConfigError(f"{path}: must not contain spaces or control characters, got {url!r}")
    parts = urlsplit(url)
    if "@" in parts.netloc:
        # checked first, and the URL is not echoed: the error must not print the secret
        raise ConfigError(f"{path}: credentials in a URL (user:password@) are not accepted: they would show in "
                          "logs, metrics and response headers. Clients' Authorization headers are forwarded "
                          "to the replicas; give the replica its --api-key and send it as a bearer token")
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
    if _has_control(name):
        raise ConfigError(f"{path}.name: must not contain control characters, got {name!r}")
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
                 ("prefill_tokens_per_s", "fixed_ms", "context_weight", "step_tokens", "admit_share",
                  "admit_max_wait_s"))
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
            admit_share=_num(cost, "admit_share", cp, 0.75, lo=0, hi=64),
            admit_max_wait_s=_num(cost, "admit_max_wait_s", cp, 2.0, lo=0, hi=3600),
        ),
        precise=_precise(m.get("precise"), f"{path}.precise"),
    )


_TOP = ("listen", "tiers", "routing", "admin", "limits", "timeouts", "retries", "health", "scrape", "breaker",
        "discovery", "peers", "tier_routing")


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
        tier_routing=parse_tier_routing(top.get("tier_routing"), names, default_tier or names[0]),
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


# -- tier routing (optional section ``tier_routing:``) ---------------------------------------------
#
# tier_routing:
#   default_tier: small                 # else routing.default_tier, else the cheapest tier
#   rules:                              # first match wins; conditions in `when` are ANDed
#     - name: code
#       tier: large
#       cascade: false                  # true: cascade starting at `tier`
#       when: {keywords_any: [traceback, segfault], max_tokens_gt: 1000}
#   classifier: {model: /models/router, enabled: true, shadow: false, threshold: 0.5}
#   cascade: {routes: [auto-cascade], max_tiers: 3, deadline_s: 60, min_mean_logprob: -0.6,
#             verifier_url: http://127.0.0.1:7000/verify, verifier_timeout_s: 2, json: false}
#   per_user: {header: x-user-id, half_life_s: 3600, max_users: 10000, step: 0.5}
#   decision_log: {path: /var/log/prefixlb/decisions.jsonl, max_bytes: 104857600, backups: 5, prompts: false}
#                                       # with --workers N put {pid} in the path: one file per worker


@dataclass(frozen=True)
class ClassifierConfig:
    model: str  # the directory `prefixlb train-router` wrote
    enabled: bool = True  # false: loaded but killed (revive with POST /admin/classifier/revive)
    shadow: bool = False  # predict and log, do not dispatch
    threshold: float | None = None  # the score above which a stronger tier is chosen (model's default if None)
    cost_budget: float | None = None  # or: a target share of spend, the classifier derives its threshold
    drift_window: int = 2000  # recent scores compared with the reference
    drift_warmup: int = 1000  # scores taken as the reference when the model ships none


@dataclass(frozen=True)
class CascadeConfig:
    routes: tuple[str, ...] = ("auto-cascade",)  # model names that start a cascade ("auto" = every auto request)
    max_tiers: int = 3  # tiers tried at most, the first included
    deadline_s: float = 60.0  # no escalation starts after this long since the request arrived
    min_mean_logprob: float | None = None  # escalate when the mean token logprob is lower
    min_token_logprob: float | None = None  # ... when any token's logprob is lower
    low_token_logprob: float = -2.3  # what counts as a low-probability token (ln 0.1)
    max_low_token_fraction: float | None = None  # ... when more tokens than this share are low
    min_margin: float | None = None  # ... when the mean top-1/top-2 logprob margin is smaller
    top_logprobs: int = 2  # asked of the replicas when the client did not ask for logprobs
    verifier_url: str | None = None  # POST {"tier", "request", "response"} -> {"accept": bool}
    verifier_python: str | None = None  # "module:function" (request, response, tier) -> bool | awaitable bool
    verifier_timeout_s: float = 2.0
    verifier_on_error: str = "accept"  # accept | escalate, when the verifier fails or times out
    json: bool = False  # every answer must be JSON (requests with response_format json are checked anyway)
    tool_calls: bool = True  # tool calls must name a given tool and carry JSON arguments
    # {tier: {min_mean_logprob, min_token_logprob, max_low_token_fraction, min_margin}}: models are not
    # calibrated alike, and escalating from a middle tier costs more than from the cheapest
    per_tier: tuple[tuple[str, tuple[tuple[str, float], ...]], ...] = ()


@dataclass(frozen=True)
class PerUserConfig:
    header: str | None = None  # whose requests: this header, else the body's "user"
    half_life_s: float = 3600.0
    max_users: int = 10_000
    step: float = 0.5  # mean escalation (in tiers) that moves a user one tier
    prior: float = 2.0  # pseudo-observations of "no escalation"
    max_offset: int = 1


@dataclass(frozen=True)
class DecisionLogConfig:
    path: str
    max_bytes: int = 100 * 1024 * 1024
    backups: int = 5
    prompts: bool = False  # also log the prompt text (needed to train the classifier from the log)


@dataclass(frozen=True)
class TierRoutingConfig:
    default_tier: str | None = None
    rules: tuple = ()  # prefixlb.routing.tiers.Rule, compiled
    classifier: ClassifierConfig | None = None
    cascade: CascadeConfig = field(default_factory=CascadeConfig)
    per_user: PerUserConfig | None = None
    decision_log: DecisionLogConfig | None = None
    feedback_memory: int = 100_000  # recent requests remembered for POST /admin/feedback


def _bool(m: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
    v = m.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ConfigError(f"{path}.{key}: must be true or false, got {v!r}")
    return v


def _str_list(v: Any, path: str) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise ConfigError(f"{path}: must be a list of non-empty strings, got {v!r}")
    return tuple(v)


_WHEN = ("last_user_regex", "keywords_any", "header", "path", "user_in", "tools", "max_tokens_gt", "max_tokens_lt",
         "prompt_chars_gt", "prompt_chars_lt")


def _rule(obj: Any, path: str, tiers: Sequence[str]):
    import re

    from prefixlb.routing.tiers import Rule

    m = _keys(obj, path, ("name", "tier", "cascade", "when"))
    name = _str(m, "name", path, None)
    if name is None:
        raise ConfigError(f"{path}.name: required")
    tier = _str(m, "tier", path, None)
    if tier is None:
        raise ConfigError(f"{path}.tier: required (one of {', '.join(tiers)})")
    if tier not in tiers:
        raise ConfigError(f"{path}.tier: {tier!r} is not a tier (tiers: {', '.join(tiers)})")
    wp = f"{path}.when"
    w = _keys(m.get("when"), wp, _WHEN)
    kw: dict[str, Any] = {}
    if "last_user_regex" in w:
        rx = _str(w, "last_user_regex", wp, None)
        try:
            re.compile(rx or "")
        except re.error as exc:
            raise ConfigError(f"{wp}.last_user_regex: not a valid regular expression ({exc})") from None
        kw["last_user_regex"] = rx
    if "keywords_any" in w:
        kw["keywords_any"] = _str_list(w["keywords_any"], f"{wp}.keywords_any")
    if "header" in w:
        h = w["header"]
        if not isinstance(h, Mapping) or not h:
            raise ConfigError(f"{wp}.header: must be a mapping {{name: value}} (value \"*\": present)")
        for k, v in h.items():
            if not isinstance(k, str) or not isinstance(v, (str, int)) or isinstance(v, bool):
                raise ConfigError(f"{wp}.header.{k}: must map a header name to a string value, got {v!r}")
        kw["header"] = tuple((k, str(v)) for k, v in h.items())
    if "path" in w:
        kw["path"] = _str_list(w["path"], f"{wp}.path")
    if "user_in" in w:
        kw["user_in"] = frozenset(_str_list(w["user_in"], f"{wp}.user_in"))
    if "tools" in w:
        kw["tools"] = _bool(w, "tools", wp, False)
    for k in ("max_tokens_gt", "max_tokens_lt", "prompt_chars_gt", "prompt_chars_lt"):
        if k in w:
            kw[k] = _num(w, k, wp, None, lo=0, integer=True)
    return Rule(name=name, tier=tier, cascade=_bool(m, "cascade", path, False), **kw)


def _classifier(obj: Any, path: str) -> ClassifierConfig | None:
    if obj is None:
        return None
    m = _keys(obj, path, ("model", "enabled", "shadow", "threshold", "cost_budget", "drift_window", "drift_warmup"))
    model = _str(m, "model", path, None)
    if model is None:
        raise ConfigError(f"{path}.model: required (the directory prefixlb train-router wrote)")
    if not os.path.isdir(model):
        raise ConfigError(f"{path}.model: no such directory {model!r}")
    threshold = _num(m, "threshold", path, None, lo=0, hi=1)
    budget = _num(m, "cost_budget", path, None, lo=0, hi=1)
    if threshold is not None and budget is not None:
        raise ConfigError(f"{path}.cost_budget: give threshold or cost_budget, not both")
    return ClassifierConfig(
        model=model, enabled=_bool(m, "enabled", path, True), shadow=_bool(m, "shadow", path, False),
        threshold=threshold, cost_budget=budget,
        drift_window=_num(m, "drift_window", path, 2000, lo=10, hi=1_000_000, integer=True),
        drift_warmup=_num(m, "drift_warmup", path, 1000, lo=10, hi=1_000_000, integer=True),
    )


def _cascade(obj: Any, path: str, tiers: Sequence[str]) -> CascadeConfig:
    m = _keys(obj, path, ("routes", "max_tiers", "deadline_s", "min_mean_logprob", "min_token_logprob",
                          "low_token_logprob", "max_low_token_fraction", "min_margin", "top_logprobs", "verifier_url",
                          "verifier_python", "verifier_timeout_s", "verifier_on_error", "json", "tool_calls",
                          "per_tier"))
    per_tier = []
    pt = m.get("per_tier")
    if pt is not None:
        if not isinstance(pt, Mapping):
            raise ConfigError(f"{path}.per_tier: must map tier names to thresholds")
        for tname, th in pt.items():
            tp = f"{path}.per_tier.{tname}"
            if tname not in tiers:
                raise ConfigError(f"{tp}: not a tier (tiers: {', '.join(tiers)})")
            tm = _keys(th, tp, ("min_mean_logprob", "min_token_logprob", "max_low_token_fraction", "min_margin"))
            vals = []
            for k in tm:
                bounds = {"max_low_token_fraction": (0, 1), "min_margin": (0, None)}.get(k, (None, 0))
                vals.append((k, _num(tm, k, tp, None, lo=bounds[0], hi=bounds[1])))
            per_tier.append((tname, tuple(v for v in vals if v[1] is not None)))
    routes = _str_list(m["routes"], f"{path}.routes") if m.get("routes") is not None else ("auto-cascade",)
    for i, r in enumerate(routes):
        if r in tiers:
            raise ConfigError(f"{path}.routes[{i}]: {r!r} is a tier name (a route is a model name of its own)")
    url = m.get("verifier_url")
    if url is not None:
        url = check_url(url, f"{path}.verifier_url")
    py = _str(m, "verifier_python", path, None)
    if py is not None and (":" not in py or not all(py.split(":", 1))):
        raise ConfigError(f"{path}.verifier_python: must be 'module:function', got {py!r}")
    if py is not None and url is not None:
        raise ConfigError(f"{path}.verifier_python: give verifier_url or verifier_python, not both")
    on_error = _str(m, "verifier_on_error", path, "accept")
    if on_error not in ("accept", "escalate"):
        raise ConfigError(f"{path}.verifier_on_error: must be accept or escalate, got {on_error!r}")
    return CascadeConfig(
        routes=routes,
        max_tiers=_num(m, "max_tiers", path, len(tiers), lo=1, hi=64, integer=True),
        deadline_s=_num(m, "deadline_s", path, 60.0, lo=0),
        min_mean_logprob=_num(m, "min_mean_logprob", path, None, hi=0),
        min_token_logprob=_num(m, "min_token_logprob", path, None, hi=0),
        low_token_logprob=_num(m, "low_token_logprob", path, -2.3, hi=0),
        max_low_token_fraction=_num(m, "max_low_token_fraction", path, None, lo=0, hi=1),
        min_margin=_num(m, "min_margin", path, None, lo=0),
        top_logprobs=_num(m, "top_logprobs", path, 2, lo=0, hi=20, integer=True),
        verifier_url=url, verifier_python=py,
        verifier_timeout_s=_num(m, "verifier_timeout_s", path, 2.0, lo=0.001),
        verifier_on_error=on_error,
        json=_bool(m, "json", path, False), tool_calls=_bool(m, "tool_calls", path, True),
        per_tier=tuple(per_tier),
    )


def _per_user(obj: Any, path: str) -> PerUserConfig | None:
    if obj is None:
        return None
    m = _keys(obj, path, ("header", "half_life_s", "max_users", "step", "prior", "max_offset"))
    header = _str(m, "header", path, None)
    return PerUserConfig(
        header=header.lower() if header else None,
        half_life_s=_num(m, "half_life_s", path, 3600.0, lo=0.001),
        max_users=_num(m, "max_users", path, 10_000, lo=1, hi=10_000_000, integer=True),
        step=_num(m, "step", path, 0.5, lo=0.01, hi=1),
        prior=_num(m, "prior", path, 2.0, lo=0),
        max_offset=_num(m, "max_offset", path, 1, lo=0, hi=16, integer=True),
    )


def _decision_log(obj: Any, path: str) -> DecisionLogConfig | None:
    if obj is None:
        return None
    m = _keys(obj, path, ("path", "max_bytes", "backups", "prompts"))
    p = _str(m, "path", path, None)
    if p is None:
        raise ConfigError(f"{path}.path: required (a file to append JSON lines to)")
    parent = os.path.dirname(os.path.abspath(p))
    if not os.path.isdir(parent):
        raise ConfigError(f"{path}.path: directory {parent!r} does not exist")
    return DecisionLogConfig(
        path=p, max_bytes=_num(m, "max_bytes", path, 100 * 1024 * 1024, lo=1024, integer=True),
        backups=_num(m, "backups", path, 5, lo=1, hi=1000, integer=True), prompts=_bool(m, "prompts", path, False),
    )


def parse_tier_routing(obj: Any, tiers: Sequence[str], default: str, path: str = "tier_routing") -> TierRoutingConfig | None:
    """Validate the ``tier_routing:`` section (None when absent) against the tier names."""
    if obj is None:
        return None
    m = _keys(obj, path, ("default_tier", "rules", "classifier", "cascade", "per_user", "decision_log",
                          "feedback_memory"))
    dt = _str(m, "default_tier", path, None)
    if dt is not None and dt not in tiers:
        raise ConfigError(f"{path}.default_tier: {dt!r} is not a tier (tiers: {', '.join(tiers)})")
    rules_raw = m.get("rules") or []
    if not isinstance(rules_raw, list):
        raise ConfigError(f"{path}.rules: must be a list of rules")
    rules = tuple(_rule(r, f"{path}.rules[{i}]", tiers) for i, r in enumerate(rules_raw))
    names = [r.name for r in rules]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise ConfigError(f"{path}.rules[{i}].name: {n!r} is used twice")
    return TierRoutingConfig(
        default_tier=dt or default,
        rules=rules,
        classifier=_classifier(m.get("classifier"), f"{path}.classifier"),
        cascade=_cascade(m.get("cascade"), f"{path}.cascade", tiers),
        per_user=_per_user(m.get("per_user"), f"{path}.per_user"),
        decision_log=_decision_log(m.get("decision_log"), f"{path}.decision_log"),
        feedback_memory=_num(m, "feedback_memory", path, 100_000, lo=0, hi=10_000_000, integer=True),
    )
