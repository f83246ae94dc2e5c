"""Starting the balancers under test as processes: prefixlb (any policy), sglang-router and
vllm-router, each in its own process group, on loopback, stopped by group.

Peers are run as ../shared/peers.md documents: Prometheus exporters on loopback ports,
``HF_ENDPOINT`` pointing at a closed loopback port so sglang-router's tokenizer lookup never
leaves the machine, ``--log-level warn`` for sglang-router (``info`` logs twice per request and
costs it ~20% throughput).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

__all__ = ["PEERS", "POLICY_TARGETS", "PRECISE", "SGLANG_LIKE", "Target", "free_port", "precise_config", "start_target"]

#: prefixlb's proxy with a model of sglang-router's rule (opt-in): separates what a peer's rule
#: is worth from what its proxy is
SGLANG_LIKE = "prefixlb-sglang_like"
POLICY_TARGETS = {"prefixlb": "cache_aware", "round_robin": "round_robin", "least_loaded": "least_loaded",
                  "consistent_hash": "consistent_hash", SGLANG_LIKE: "sglang_like"}
#: prefixlb in precise mode (the index follows the replicas' KV events); needs a fleet publishing them
PRECISE = "prefixlb-precise"
PEERS = ("sglang-router", "vllm-router")


#: prefixlb targets run with this admin token, so the runner can read what they learned
ADMIN_TOKEN = secrets.token_hex(16)
ADMIN_ENV = {"PREFIXLB_ADMIN_TOKEN": ADMIN_TOKEN}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Target:
    """A balancer process: started, probed until it proxies a request, stopped by process group."""

    def __init__(self, name: str, argv: list[str], url: str | None, *, probe: tuple[str, bytes],
                 env: dict | None = None, startup_s: float = 60.0) -> None:
        self.name = name
        self.argv = argv
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                  start_new_session=True, env={**os.environ, **(env or {})})
        self.url = url
        deadline = time.monotonic() + startup_s
        if url is None:  # prefixlb prints its address
            while time.monotonic() < deadline:
                line = self.p.stdout.readline()  # type: ignore[union-attr]
                m = re.search(r"listening on (http://\S+)", line)
                if m:
                    self.url = m.group(1)
                    break
                if not line and self.p.poll() is not None:
                    break
            if self.url is None:
                self.stop()
                raise RuntimeError(f"{name} did not start ({' '.join(argv)})")
        self._wait_proxying(probe, deadline)

    def _wait_proxying(self, probe: tuple[str, bytes], deadline: float) -> None:
        path, body = probe
        last = ""
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                break
            try:
                req = urllib.request.Request(self.url + path, body, {"content-type": "application/json"})
                with urllib.request.urlopen(req, timeout=5) as r:
                    r.read()
                    if r.status == 200:
                        return
            except OSError as exc:
                last = str(exc)
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"{self.name} never proxied a request ({last})")

    def cpu_ns(self) -> int:
        """CPU time of every thread of every process in the target's process group (its
        workers included: ``prefixlb serve --workers N`` forks them)."""
        total = 0
        for pid in self._group_pids():
            try:
                tasks = list(Path(f"/proc/{pid}/task").iterdir())
            except FileNotFoundError:
                continue
            for task in tasks:
                try:
                    total += int((task / "schedstat").read_text().split()[0])
                except (FileNotFoundError, ProcessLookupError):
                    pass
        return total

    def _group_pids(self) -> list[int]:
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text()
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            # fields after the ")" closing the command name: state, ppid, pgrp, ...
            if int(stat.rsplit(")", 1)[1].split()[2]) == self.p.pid:
                pids.append(int(d.name))
        return pids

    def stop(self) -> None:
        try:
            os.killpg(self.p.pid, 15)
            self.p.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.p.pid, 9)
            except ProcessLookupError:
                pass
        if self.p.stdout:
            self.p.stdout.close()

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _bin(name: str) -> str | None:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


def precise_config(replicas: list[str], *, tokenizer: str = "byte", block_size: int = 16,
                   extra: dict | None = None) -> str:
    """A config file for prefixlb in precise mode in front of ``replicas`` (event sources from
    each replica's /kv_event_sources); returns its path."""
    import tempfile

    import yaml

    doc = {"listen": {"host": "127.0.0.1", "port": 0},
           "tiers": [{"name": "default", "replicas": list(replicas),
                      "precise": {"tokenizer": tokenizer, "block_size": block_size, "discover": True}}],
           **(extra or {})}
    fd, path = tempfile.mkstemp(prefix="prefixlb-precise-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(doc, f)
    return path


def start_target(name: str, replicas: list[str], *, probe: tuple[str, bytes], config: str | None = None,
                 extra: list[str] | None = None, peer_policy: str = "cache_aware",
                 precise: dict | None = None) -> Target:
    """Start balancer ``name`` in front of ``replicas`` (peers with ``peer_policy``). Raises
    RuntimeError (with the reason) when it cannot run here, e.g. a peer that is not installed.
    ``precise`` (``tokenizer``, ``block_size``) configures the ``prefixlb-precise`` target."""
    py = sys.executable
    if name == PRECISE:
        path = precise_config(replicas, **(precise or {}))
        argv = [py, "-m", "prefixlb", "serve", "--config", path, "--log-level", "warning"]
        try:
            return Target(name, argv + (extra or []), None, probe=probe, env=ADMIN_ENV)
        finally:
            os.unlink(path)  # read at start-up
    if name in POLICY_TARGETS:
        argv = [py, "-m", "prefixlb", "serve", "--port", "0", "--policy", POLICY_TARGETS[name], "--log-level", "warning"]
        argv += ["--config", config] if config else [a for u in replicas for a in ("--replica", u)]
        return Target(name, argv + (extra or []), None, probe=probe, env=ADMIN_ENV)
    hf = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"}
    if name == "sglang-router":
        try:
            import sglang_router  # noqa: F401
        except ImportError:
            raise RuntimeError("sglang-router is not installed (pip install 'prefixlb[bench]')") from None
        port = free_port()
        argv = [py, "-m", "sglang_router.launch_router", "--worker-urls", *replicas, "--policy", peer_policy,
                "--host", "127.0.0.1", "--port", str(port), "--prometheus-host", "127.0.0.1",
                "--prometheus-port", str(free_port()), "--log-level", "warn"]
        return Target(name, argv + (extra or []), f"http://127.0.0.1:{port}", probe=probe, env=hf)
    if name == "vllm-router":
        exe = _bin("vllm-router")
        if exe is None:
            raise RuntimeError("vllm-router is not installed (pip install 'prefixlb[bench]')")
        port = free_port()
        argv = [exe, "--worker-urls", *replicas, "--policy", peer_policy, "--host", "127.0.0.1",
                "--port", str(port), "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]
        return Target(name, argv + (extra or []), f"http://127.0.0.1:{port}", probe=probe, env=hf)
    raise ValueError(f"unknown target {name!r}; known: {', '.join([*POLICY_TARGETS, *PEERS])}")
