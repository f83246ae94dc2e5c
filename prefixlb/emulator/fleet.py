"""Fleets of emulated replicas: in the current event loop, or in a subprocess.

In the current loop (tests)::

    async with EmulatedFleet(replicas=4, profile="cpu-tiny-llama", time_scale=10) as fleet:
        fleet.urls            # ["http://127.0.0.1:PORT", ...], ephemeral ports by default

In a subprocess, so a benchmark's load generator does not share a loop (or a core's GIL) with
the replicas::

    with start_fleet_process(replicas=4, profile="h100-llama3-8b", time_scale=10) as fleet:
        fleet.urls

The subprocess is ``python -m prefixlb emulate ...`` in its own session; ``stop()`` sends
SIGTERM to its process group, waits, then SIGKILLs the group.
"""

from __future__ import annotations

import dataclasses
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import zmq.asyncio

from .config import ReplicaConfig
from .replica import EmulatedReplica, load_tokenizer

__all__ = ["EmulatedFleet", "FleetProcess", "FleetProcesses", "start_fleet_process", "start_fleet_processes"]


class EmulatedFleet:
    """``replicas`` emulated replicas in the running event loop, one port each.

    Keyword arguments are :class:`~prefixlb.emulator.ReplicaConfig` fields (or pass
    ``config=``). Replica ``i`` listens on ``base_port + i`` (ephemeral when ``base_port`` is
    0) and is replica ``index_offset + i`` for topics and KV endpoint offsets.
    ``faults_by_replica`` maps replica indexes to :class:`~prefixlb.emulator.Faults`, replacing
    the configured faults of those replicas.
    """

    def __init__(
        self,
        replicas: int = 1,
        *,
        base_port: int = 0,
        index_offset: int = 0,
        config: ReplicaConfig | None = None,
        faults_by_replica: Mapping[int, Any] | None = None,
        **config_fields: Any,
    ) -> None:
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        base = config if config is not None else ReplicaConfig()
        if config_fields:
            base = dataclasses.replace(base, **config_fields)
        base.validate()
        self.config = base
        tokenizer = load_tokenizer(base.tokenizer)  # load once, share
        self._zmq = zmq.asyncio.Context() if base.kv_events_endpoint is not None else None
        self.replicas: list[EmulatedReplica] = []
        by_index: dict[int, EmulatedReplica] = {}
        for i in range(replicas):
            cfg = base
            if faults_by_replica and index_offset + i in faults_by_replica:
                cfg = dataclasses.replace(base, faults=faults_by_replica[index_offset + i])
            rep = EmulatedReplica(
                cfg,
                index_offset + i,
                port=base_port + i if base_port else 0,
                tokenizer=tokenizer,
                zmq_context=self._zmq,
                peers=by_index.get,
            )
            by_index[rep.index] = rep
            self.replicas.append(rep)

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    async def start(self) -> EmulatedFleet:
        try:
            for r in self.replicas:
                await r.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def stop(self) -> None:
        for r in self.replicas:
            await r.stop()
        if self._zmq is not None:
            self._zmq.term()
            self._zmq = None

    async def __aenter__(self) -> EmulatedFleet:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class FleetProcess:
    """A ``prefixlb emulate`` subprocess: its replica URLs and a way to stop it."""

    def __init__(self, proc: subprocess.Popen[bytes], urls: list[str], argv: list[str]) -> None:
        self.proc = proc
        self.urls = urls
        self.argv = argv

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the process group, wait up to ``timeout``, then SIGKILL it; the exit code."""
        if self.proc.poll() is None:
            _killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode

    def __enter__(self) -> FleetProcess:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def emulate_argv(replicas: int, options: Mapping[str, Any]) -> list[str]:
    """``prefixlb emulate`` arguments for ``options`` (``time_scale=10`` -> ``--time-scale 10``)."""
    argv = ["--replicas", str(replicas)]
    for key, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        else:
            argv += [flag, str(value)]
    return argv


def start_fleet_process(
    replicas: int = 1,
    *,
    startup_timeout: float = 30.0,
    stderr: Any = subprocess.DEVNULL,
    env: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
    **options: Any,
) -> FleetProcess:
    """Run ``prefixlb emulate`` in a new process group and wait for its URLs.

    ``options`` are CLI flags in Python spelling (``base_port=0`` is the default here, so ports
    are ephemeral; ``profile=...``, ``time_scale=...``, ``kv_events_endpoint=...``, ...).
    Raises RuntimeError with the process's exit code if it dies or is silent for
    ``startup_timeout`` seconds.
    """
    options = {"base_port": 0, **options}
    argv = [sys.executable, "-m", "prefixlb", "emulate", *emulate_argv(replicas, options), *extra_args]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=stderr,
        env=dict(os.environ if env is None else env),
        start_new_session=True,
    )
    assert proc.stdout is not None
    urls: list[str] = []
    buf = b""
    deadline = time.monotonic() + startup_timeout
    fd = proc.stdout.fileno()
    try:
        while len(urls) < replicas:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(
                    f"prefixlb emulate printed {len(urls)}/{replicas} URLs in {startup_timeout:.0f} s: {argv}"
                )
            ready, _, _ = select.select([fd], [], [], min(left, 0.5))
            if not ready:
                if proc.poll() is not None:
                    raise RuntimeError(f"prefixlb emulate exited with {proc.returncode} during startup: {argv}")
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                proc.wait(timeout=5)
                raise RuntimeError(f"prefixlb emulate exited with {proc.returncode} during startup: {argv}")
            buf += chunk
            while b"\n" in buf and len(urls) < replicas:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    urls.append(line.decode().strip())
    except BaseException:
        FleetProcess(proc, urls, argv).stop()
        raise
    return FleetProcess(proc, urls, argv)


class FleetProcesses:
    """Several ``prefixlb emulate`` processes seen as one fleet: ``urls`` in order, ``stop()``."""

    def __init__(self, procs: list[FleetProcess]) -> None:
        self.procs = procs
        self.urls = [u for p in procs for u in p.urls]

    def stop(self, timeout: float = 10.0) -> None:
        for p in self.procs:
            p.stop(timeout)

    def __enter__(self) -> FleetProcesses:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def start_fleet_processes(replicas: int, **options: Any) -> FleetProcesses:
    """One ``prefixlb emulate`` process per replica (:func:`start_fleet_process`'s options).

    Real replicas are independent machines; replicas sharing one emulator process share its
    event loop, so one replica's streaming and scrapes delay the others' engine steps. On a
    machine with few cores that coupling shows in TTFTs and in what a balancer learns from them.
    """
    procs: list[FleetProcess] = []
    try:
        for _ in range(replicas):
            procs.append(start_fleet_process(1, **options))
    except BaseException:
        for p in procs:
            p.stop()
        raise
    return FleetProcesses(procs)

