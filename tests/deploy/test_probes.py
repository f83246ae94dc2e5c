"""The paths deploy/ probes are answered by the real server, with the status each probe needs.

A Balancer and an emulated vLLM replica run in this process on 127.0.0.1; the image's
HEALTHCHECK command runs as a subprocess against them.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import socket
import sys
from urllib.parse import urlsplit

import aiohttp
import pytest

from prefixlb.config import parse_config
from prefixlb.emulator.fleet import EmulatedFleet
from prefixlb.server import Balancer

from .support import DEPLOY, load_yaml, one, run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _balancer(urls: list[str]) -> Balancer:
    raw = {"listen": {"host": "127.0.0.1", "port": 0},
           "tiers": [{"name": "small", "replicas": urls}],
           "health": {"interval_s": 0.1, "timeout_s": 0.3, "fail_threshold": 1}}
    b = Balancer(parse_config(raw))
    await b.start()
    return b


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, str, str]:
    async with session.get(url) as r:
        return r.status, r.headers.get("content-type", ""), await r.text()


async def _healthcheck(argv: list[str], url: str) -> int:
    """The image's HEALTHCHECK command with this interpreter as `python`; its exit code."""
    cmd = [sys.executable if argv[0] in ("python", "python3") else argv[0], *argv[1:]]
    env = {**os.environ, "PREFIXLB_HEALTH_URL": url}
    proc = await asyncio.create_subprocess_exec(*cmd, env=env, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.DEVNULL)
    return await asyncio.wait_for(proc.wait(), 20)


def _probe_paths(k8s, dockerfile, compose) -> dict[str, str]:
    """Every HTTP path deploy/ expects the balancer to answer 200 on, by where it is used."""
    dep = one(k8s, "Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    paths = {"k8s readinessProbe": c["readinessProbe"]["httpGet"]["path"]}
    if "httpGet" in c["livenessProbe"]:
        paths["k8s livenessProbe"] = c["livenessProbe"]["httpGet"]["path"]
    env = dict(part.split("=", 1) for e in dockerfile.final.all("ENV") for part in shlex.split(e.args))
    paths["Dockerfile HEALTHCHECK"] = urlsplit(env["PREFIXLB_HEALTH_URL"]).path
    lb = compose["compose.yaml"]["services"]["prefixlb"]
    paths["compose prefixlb healthcheck"] = urlsplit(lb["environment"]["PREFIXLB_HEALTH_URL"]).path
    for ep in one(k8s, "ServiceMonitor")["spec"]["endpoints"]:
        paths["ServiceMonitor"] = ep["path"]
    prom = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    for job in prom["scrape_configs"]:
        if job["job_name"] == "prefixlb":
            paths["prometheus.yml prefixlb job"] = job.get("metrics_path", "/metrics")
    return paths


def test_every_probe_and_scrape_path_is_answered_200_by_a_balancer_with_replicas(k8s, dockerfile, compose):
    paths = _probe_paths(k8s, dockerfile, compose)

    async def main():
        async with EmulatedFleet(1, profile="cpu-tiny-llama", time_scale=20) as fleet:
            b = await _balancer(fleet.urls)
            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
                    return {where: await _get(s, f"http://127.0.0.1:{b.port}{path}") for where, path in paths.items()}
            finally:
                await b.stop(drain_timeout=1.0)

    answers = run(main(), timeout=60)
    for where, (status, ctype, body) in answers.items():
        assert status == 200, f"{where}: GET {paths[where]} answered {status}: {body[:200]}"
        if paths[where] == "/metrics":
            assert ctype.startswith("text/plain") and "prefixlb_" in body, where


def test_liveness_does_not_fail_when_every_vllm_replica_is_down(k8s):
    """A balancer whose backends are all down is alive: restarting it would only drop its index."""
    dep = one(k8s, "Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    live = c["livenessProbe"]

    async def main():
        b = await _balancer([f"http://127.0.0.1:{_free_port()}"])
        base = f"http://127.0.0.1:{b.port}"
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
                for _ in range(100):  # until the health checker has marked the replica down
                    if (await _get(s, base + "/health"))[0] == 503:
                        break
                    await asyncio.sleep(0.05)
                else:
                    pytest.fail("the dead replica was never marked down")
                if "httpGet" in live:
                    return (await _get(s, base + live["httpGet"]["path"]))[0]
                assert "tcpSocket" in live
                _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", b.port), 5)
                writer.close()
                return 200
        finally:
            await b.stop(drain_timeout=1.0)

    assert run(main(), timeout=60) == 200


def test_the_image_healthcheck_passes_on_a_healthy_server_and_fails_otherwise(dockerfile, compose):
    argv = dockerfile.final.last("HEALTHCHECK").exec_form()
    assert argv and argv[0] in ("python", "python3"), "the slim image has no curl: stdlib Python"
    emulator_url = compose["compose.yaml"]["services"]["emulator"]["environment"]["PREFIXLB_HEALTH_URL"]

    async def main():
        async with EmulatedFleet(1, profile="cpu-tiny-llama", time_scale=20) as fleet:
            b = await _balancer(fleet.urls)
            try:
                up = await _healthcheck(argv, f"http://127.0.0.1:{b.port}/health")
                # the compose file reuses the image's check for the emulator, on its own port
                emu = await _healthcheck(argv, fleet.urls[0] + urlsplit(emulator_url).path)
            finally:
                await b.stop(drain_timeout=1.0)
        down = await _healthcheck(argv, f"http://127.0.0.1:{_free_port()}/health")
        return up, emu, down

    up, emu, down = run(main(), timeout=90)
    assert (up, emu) == (0, 0)
    assert down != 0
