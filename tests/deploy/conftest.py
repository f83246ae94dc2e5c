"""Fixtures for deploy/ tests: the manifests, parsed once, and one live scrape of the code's metrics.

The live scrape starts an emulated vLLM fleet and a Balancer in this process on 127.0.0.1
(ephemeral ports), sends a few requests that exercise every metric family the dashboard
reads (cached prefixes, a stream with usage, a retry on a failing replica), and returns what
``/metrics`` of the balancer and of a replica expose, parsed by prometheus_client.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from .support import DEPLOY, K8S, exposition_series, load_yaml, load_yaml_docs, parse_dockerfile, run


@dataclasses.dataclass
class Scrape:
    """One family name -> (type, label names seen) and every exposed series name -> family."""

    families: dict[str, tuple[str, set[str]]]
    series: dict[str, tuple[str, str]]


@pytest.fixture(scope="session")
def dockerfile():
    return parse_dockerfile(DEPLOY / "Dockerfile")


@pytest.fixture(scope="session")
def kustomization() -> dict:
    return load_yaml(K8S / "kustomization.yaml")


@pytest.fixture(scope="session")
def k8s_objects() -> list[tuple[Path, dict]]:
    """Every object of every manifest under deploy/k8s (kustomization.yaml aside), with its file."""
    out = []
    for path in sorted(K8S.glob("*.y*ml")):
        if path.name == "kustomization.yaml":
            continue
        out.extend((path, doc) for doc in load_yaml_docs(path))
    return out


@pytest.fixture(scope="session")
def k8s(k8s_objects) -> dict[str, list[dict]]:
    """Objects by kind."""
    by_kind: dict[str, list[dict]] = {}
    for _, doc in k8s_objects:
        by_kind.setdefault(doc["kind"], []).append(doc)
    return by_kind


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    return {name: load_yaml(DEPLOY / name) for name in ("compose.yaml", "compose.vllm.yaml")}


def _families(text: str) -> list:
    from prometheus_client.parser import text_string_to_metric_families

    return list(text_string_to_metric_families(text))


def _scrape(families: list, declared: dict[str, tuple[str, ...]] | None = None) -> Scrape:
    fams: dict[str, tuple[str, set[str]]] = {}
    for f in families:
        labels = {k for s in f.samples for k in s.labels} - {"le", "quantile"}
        if not f.samples and declared and f.name in declared:
            labels = set(declared[f.name])  # no sample yet: the labels the code declares
        fams[f.name] = (f.type, labels)
    return Scrape(fams, exposition_series(families))


def _declared_labels(metrics: object) -> dict[str, tuple[str, ...]]:
    """Label names of the balancer's counter/histogram families, read from its public attributes."""
    out = {}
    for value in vars(metrics).values():
        name, labels = getattr(value, "name", None), getattr(value, "labels", None)
        if isinstance(name, str) and isinstance(labels, tuple):
            out[name] = labels
    return out


async def _live_scrape() -> tuple[Scrape, Scrape]:
    import aiohttp

    from prefixlb.config import parse_config
    from prefixlb.emulator.config import Faults
    from prefixlb.emulator.fleet import EmulatedFleet
    from prefixlb.server import Balancer

    faults = {2: Faults(error_rate=1.0)}  # replica 2 answers 500 to every inference request
    async with EmulatedFleet(3, profile="cpu-tiny-llama", time_scale=20, faults_by_replica=faults) as fleet:
        raw = {
            "listen": {"host": "127.0.0.1", "port": 0},
            "tiers": [
                {"name": "small", "price": {"input_per_mtok": 0.2, "output_per_mtok": 0.2},
                 "replicas": fleet.urls[:2]},
                {"name": "large", "price": {"input_per_mtok": 0.9, "output_per_mtok": 0.9},
                 "replicas": fleet.urls[2:]},
            ],
            "health": {"interval_s": 0.2},
            "scrape": {"interval_s": 0.2},
        }
        balancer = Balancer(parse_config(raw))
        await balancer.start()
        base = f"http://127.0.0.1:{balancer.port}"
        system = "You are the deploy test assistant. Answer briefly and politely. " * 20
        try:
            timeout = aiohttp.ClientTimeout(total=20)
            async with aiohttp.ClientSession(timeout=timeout) as s:
                for i in range(3):  # the same prefix: cached tokens after the first
                    body = {"model": "small", "max_tokens": 4,
                            "messages": [{"role": "system", "content": system},
                                         {"role": "user", "content": f"question {i}"}]}
                    async with s.post(base + "/v1/chat/completions", json=body) as r:
                        assert r.status == 200, await r.text()
                body = {"model": "small", "max_tokens": 4, "stream": True,
                        "stream_options": {"include_usage": True},
                        "messages": [{"role": "system", "content": system}, {"role": "user", "content": "s"}]}
                async with s.post(base + "/v1/chat/completions", json=body) as r:
                    assert r.status == 200, await r.text()
                    await r.read()
                async with s.post(base + "/v1/completions",
                                  json={"model": "small", "prompt": "hello " * 50, "max_tokens": 2}) as r:
                    assert r.status == 200, await r.text()
                async with s.post(base + "/v1/chat/completions",
                                  json={"model": "large", "max_tokens": 2,
                                        "messages": [{"role": "user", "content": "fails"}]}) as r:
                    assert r.status >= 500  # retried, then given up: a retries sample
                    await r.read()
                async with s.get(base + "/metrics") as r:
                    assert r.status == 200
                    balancer_text = await r.text()
                async with s.get(fleet.urls[0] + "/metrics") as r:
                    assert r.status == 200
                    vllm_text = await r.text()
        finally:
            await balancer.stop(drain_timeout=1.0)
        return (_scrape(_families(balancer_text), _declared_labels(balancer.metrics)),
                _scrape(_families(vllm_text)))


@pytest.fixture(scope="session")
def live_metrics() -> dict[str, Scrape]:
    """What the balancer's and an emulated replica's /metrics expose after some traffic."""
    balancer, vllm = run(_live_scrape(), timeout=90)
    return {"balancer": balancer, "vllm": vllm}

