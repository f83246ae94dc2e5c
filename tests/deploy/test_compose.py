"""deploy/compose*.yaml: commands use real CLI flags, the balancer's configs load and point at
the ports the fleet really listens on, and the monitoring profile scrapes what runs."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from prefixlb.cli import build_parser
from prefixlb.config import load_config
from prefixlb.engine.profiles import get_profile

from .support import DEPLOY, ROOT, iter_yaml_files, load_yaml, load_yaml_docs

VLLM_SRC = ROOT / ".venv-vllm" / "lib"


def uses_prefixlb_image(service: dict) -> bool:
    return service.get("image", "").split(":")[0] == "prefixlb" or "build" in service


def emulator_ports(service: dict) -> set[int]:
    ns = build_parser().parse_args(service["command"])
    return set(range(ns.base_port, ns.base_port + ns.replicas))


def mounted_config(service: dict, compose_dir: Path) -> Path:
    ns = build_parser().parse_args(service["command"])
    for vol in service["volumes"]:
        src, dst = vol.split(":")[:2]
        if dst == ns.config:
            return (compose_dir / src).resolve()
    raise AssertionError(f"--config {ns.config} is not mounted")


def test_every_yaml_file_under_deploy_parses_without_duplicate_keys():
    files = list(iter_yaml_files())
    assert len(files) >= 15
    for path in files:
        assert load_yaml_docs(path), f"{path} is empty"


@pytest.mark.parametrize("name", ["compose.yaml", "compose.vllm.yaml"])
def test_prefixlb_services_run_real_subcommands_with_real_flags(compose, name):
    services = compose[name]["services"]
    assert "prefixlb" in services
    for sname, svc in services.items():
        if not uses_prefixlb_image(svc):
            continue
        cmd = svc["command"]
        assert all(isinstance(a, str) for a in cmd), f"{sname}: quote numbers so the argv is strings"
        ns = build_parser().parse_args(cmd)  # SystemExit on an unknown flag or a bad value
        assert ns.command in ("serve", "emulate"), sname
        if ns.command == "emulate":
            assert ns.host == "0.0.0.0", f"{sname}: other containers must reach the replicas"
            get_profile(ns.profile)  # KeyError naming the known profiles
        if "build" in svc:
            b = svc["build"]
            ctx = (DEPLOY / b["context"]).resolve()
            assert ctx == ROOT and (ctx / b["dockerfile"]).is_file()


@pytest.mark.parametrize("name", ["compose.yaml", "compose.vllm.yaml"])
def test_balancer_config_loads_and_its_port_is_published(compose, name):
    svc = compose[name]["services"]["prefixlb"]
    cfg = load_config(mounted_config(svc, DEPLOY))
    assert cfg.host == "0.0.0.0"
    published = {int(p.split(":")[-1]) for p in svc["ports"]}
    assert cfg.port in published
    grace = svc["stop_grace_period"]
    assert int(re.fullmatch(r"(\d+)s", grace).group(1)) > cfg.drain_timeout_s
    assert svc["environment"]["PREFIXLB_ADMIN_TOKEN"].startswith("${PREFIXLB_ADMIN_TOKEN"), "no literal token"


def test_emulated_replicas_in_the_config_are_the_ports_the_emulators_listen_on(compose):
    services = compose["compose.yaml"]["services"]
    cfg = load_config(mounted_config(services["prefixlb"], DEPLOY))
    emulators = {n: s for n, s in services.items()
                 if uses_prefixlb_image(s) and build_parser().parse_args(s["command"]).command == "emulate"}
    configured: dict[str, set[int]] = {n: set() for n in emulators}
    for tier in cfg.tiers:
        hosts = set()
        for r in tier.replicas:
            u = urlsplit(r.url)
            assert u.hostname in emulators, f"{r.url}: not a compose emulator service"
            assert u.port in emulator_ports(emulators[u.hostname]), f"{r.url}: no replica on that port"
            configured[u.hostname].add(u.port)
            hosts.add(u.hostname)
        (host,) = hosts  # one tier, one emulated model
        ns = build_parser().parse_args(emulators[host]["command"])
        assert tier.model == (ns.model or get_profile(ns.profile).model), f"tier {tier.name}: model name"
    for n, svc in emulators.items():
        assert configured[n] == emulator_ports(svc), f"{n}: replicas the balancer does not know"
        assert {int(p) for p in svc["expose"]} == emulator_ports(svc)
        health = urlsplit(svc["environment"]["PREFIXLB_HEALTH_URL"])
        assert health.port in emulator_ports(svc) and health.path == "/health"
        dep = services["prefixlb"]["depends_on"][n]
        assert dep["condition"] == "service_healthy"


def test_emulators_use_distinct_replica_indexes(compose):
    """Replica indexes name KV-event topics and ports: two emulators must not overlap."""
    services = compose["compose.yaml"]["services"]
    taken: set[int] = set()
    for svc in services.values():
        if uses_prefixlb_image(svc):
            ns = build_parser().parse_args(svc["command"])
            if ns.command == "emulate":
                idx = set(range(ns.index_offset, ns.index_offset + ns.replicas))
                assert not idx & taken
                taken |= idx


def test_prometheus_scrapes_the_balancer_and_every_emulated_replica(compose):
    services = compose["compose.yaml"]["services"]
    prom_svc = services["prometheus"]
    assert "monitoring" in prom_svc["profiles"]
    mounts = dict(v.split(":")[:2][::-1] for v in prom_svc["volumes"])
    prom = load_yaml((DEPLOY / mounts["/etc/prometheus/prometheus.yml"]).resolve())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    cfg = load_config(mounted_config(services["prefixlb"], DEPLOY))
    expected = {f"prefixlb:{cfg.port}"}
    for t in cfg.tiers:
        expected |= {urlsplit(r.url).netloc for r in t.replicas}
    assert targets == expected
    # vLLM targets carry the tier label the dashboard filters on
    for job in prom["scrape_configs"]:
        if job["job_name"] == "vllm":
            for sc in job["static_configs"]:
                (tier,) = [t.name for t in cfg.tiers if {urlsplit(r.url).netloc for r in t.replicas} == set(sc["targets"])]
                assert sc["labels"]["tier"] == tier


def test_grafana_provisions_the_dashboard_folder_and_a_prometheus_datasource(compose):
    graf = compose["compose.yaml"]["services"]["grafana"]
    mounts = {dst: (DEPLOY / src).resolve() for src, dst in (v.split(":")[:2] for v in graf["volumes"])}
    prov = mounts["/etc/grafana/provisioning"]
    (ds,) = load_yaml(prov / "datasources" / "prometheus.yaml")["datasources"]
    assert ds["type"] == "prometheus" and urlsplit(ds["url"]).hostname == "prometheus"
    (provider,) = load_yaml(prov / "dashboards" / "prefixlb.yaml")["providers"]
    host_dir = mounts[provider["options"]["path"]]
    assert (host_dir / "prefixlb-dashboard.json").is_file()


def test_vllm_variant_puts_the_balancer_in_front_of_prefix_caching_vllm(compose):
    services = compose["compose.vllm.yaml"]["services"]
    cfg = load_config(mounted_config(services["prefixlb"], DEPLOY))
    vllm = {n: s for n, s in services.items() if s.get("image", "").startswith("vllm/vllm-openai:")}
    assert len(vllm) >= 2
    for name, svc in vllm.items():
        tag = svc["image"].split(":")[1]
        assert tag != "latest", "pin the vLLM image"
        args = svc["command"]
        assert "--enable-prefix-caching" in args and "--enable-prompt-tokens-details" in args
        served = args[args.index("--served-model-name") + 1]
        assert served in {t.model for t in cfg.tiers}
        port = int(args[args.index("--port") + 1])
        assert f"http://{name}:{port}" in {r.url for t in cfg.tiers for r in t.replicas}
        assert services["prefixlb"]["depends_on"][name]["condition"] == "service_healthy"
        assert "/health" in " ".join(svc["healthcheck"]["test"])
    used = {r.url for t in cfg.tiers for r in t.replicas}
    assert {urlsplit(u).hostname for u in used} == set(vllm)


def test_vllm_flags_exist_in_the_installed_vllm_when_present(compose):
    """With `make vllm` done, every --flag given to vLLM is an argument vLLM defines."""
    roots = sorted(VLLM_SRC.glob("python3*/site-packages/vllm"))
    if not roots:
        pytest.skip("real vLLM not installed (make vllm)")
    sources = "\n".join(p.read_text(errors="replace") for p in (roots[0] / "engine").glob("*.py"))
    sources += "\n".join(p.read_text(errors="replace") for p in (roots[0] / "entrypoints").rglob("cli_args.py"))
    services = compose["compose.vllm.yaml"]["services"]
    flags = {a for s in services.values() if s.get("image", "").startswith("vllm/") for a in s["command"]
             if a.startswith("--")}
    for flag in flags:
        field = flag[2:].replace("-", "_")
        assert re.search(rf"\b{field}\s*:", sources) or flag in sources, f"vLLM defines no {flag}"


@pytest.mark.parametrize("name", ["compose.yaml", "compose.vllm.yaml"])
def test_docker_compose_accepts_the_file_when_installed(name):
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], check=False, capture_output=True,
                                        timeout=30).returncode != 0:
        pytest.skip("docker compose not installed")
    out = subprocess.run([docker, "compose", "-f", str(DEPLOY / name), "config", "-q"], check=False,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
