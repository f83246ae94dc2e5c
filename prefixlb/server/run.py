"""``prefixlb serve``: run a Balancer until SIGINT/SIGTERM, then drain and exit.

``--workers N`` runs N balancer processes on one port (``SO_REUSEPORT``: the kernel spreads
connections across them), each a complete balancer with its own index and load model. In
precise mode every worker consumes every replica's KV events, so their indexes agree; their
load views are their own plus the replicas' scraped queues. The parent only supervises: it
forwards SIGINT/SIGTERM and exits when the workers have drained.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import multiprocessing
import os
import signal
import socket
import sys
from collections.abc import Callable

from prefixlb.config import Config, ConfigError

from .balancer import Balancer

__all__ = ["run", "serve_forever"]

log = logging.getLogger("prefixlb.server")


async def serve_forever(config: Config, ready=None, *, reuse_port: bool = False, worker: int | None = None,
                        reload: Callable[[], Config] | None = None) -> None:
    balancer = Balancer(config)
    balancer.config_source = reload
    await balancer.start(reuse_port=reuse_port)
    # What exists now (modules, config, index, classifier) lives as long as the process: frozen
    # out of the cyclic collector, which would otherwise walk it in every older-generation pass.
    # A request allocates a few hundred containers, nearly all freed by reference counting: the
    # youngest generation is collected every ~50 requests instead of every ~2 (CPython's 700).
    # With the classifier on, perf put the collector at ~3% of the process, and CPU time a
    # request fell ~9% with the freeze and ~5% more with the threshold (scratch runs on a busy
    # machine, so roughly). The simulator does the same. Undone when the server stops.
    gc_threshold = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, *gc_threshold[1:])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass

    def on_hup() -> None:
        if reload is None:
            log.warning("prefixlb: SIGHUP ignored: started without a configuration file")
            return
        try:
            balancer.reload(reload())
        except ConfigError as exc:
            log.error("prefixlb: SIGHUP: the configuration file is invalid, nothing changed: %s", exc)

    with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):
        loop.add_signal_handler(signal.SIGHUP, on_hup)
    tiers = ", ".join(f"{t.name} ({len(t.replicas)} replicas)" for t in balancer.tiers.values())
    who = "" if worker is None else f" (worker {worker}, pid {os.getpid()})"
    scheme = "https" if config.tls_cert else "http"
    log.info("prefixlb listening on %s://%s:%d%s, policy %s, tiers: %s", scheme, config.host, balancer.port, who,
             config.policy, tiers)
    print(f"prefixlb listening on {scheme}://{config.host}:{balancer.port}{who}", flush=True)
    if ready is not None:
        ready(balancer)
    try:
        await stop.wait()
    finally:
        log.info("prefixlb: draining (up to %.0fs)", config.drain_timeout_s)
        await balancer.stop()
        gc.unfreeze()
        gc.set_threshold(*gc_threshold)


def _run_loop(coro) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def _worker(config: Config, index: int, reload, log_setup) -> None:
    if log_setup is not None:
        log_setup(index)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; SIGTERM drains
    _run_loop(serve_forever(config, reuse_port=True, worker=index, reload=reload))


def run(config: Config, workers: int = 1, reload: Callable[[], Config] | None = None,
        log_setup: Callable[[int | None], None] | None = None) -> int:
    """Serve until SIGTERM/SIGINT. ``reload`` re-reads the configuration (SIGHUP, POST
    /admin/reload); ``log_setup(worker)`` configures logging in each process (picklable)."""
    if workers <= 1:
        try:
            _run_loop(serve_forever(config, reload=reload))
        except ConfigError as exc:  # found while building the balancer (a classifier that will not load, ...)
            print(f"prefixlb serve: {exc}", file=sys.stderr)
            return 2
        return 0
    if not hasattr(socket, "SO_REUSEPORT"):
        print("prefixlb serve: --workers needs SO_REUSEPORT (Linux, BSD, macOS)", file=sys.stderr)
        return 2
    # hold the port (bound, not listening) so that port 0 resolves once and every worker shares it
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        holder.bind((config.host, config.port))
    except OSError as exc:
        print(f"prefixlb serve: cannot bind {config.host}:{config.port}: {exc}", file=sys.stderr)
        return 2
    config = dataclasses.replace(config, port=holder.getsockname()[1])
    configs = [config] * workers
    if config.peers is None:
        # workers share their routing with each other (prefixlb.server.peers) over local sockets
        import tempfile

        from prefixlb.config import PeersConfig

        d = tempfile.mkdtemp(prefix="prefixlb-peers-")
        eps = [f"ipc://{d}/w{i}" for i in range(workers)]
        configs = [dataclasses.replace(config, peers=PeersConfig(eps[i], tuple(eps[:i] + eps[i + 1:])))
                   for i in range(workers)]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(configs[i], i, reload, log_setup), name=f"prefixlb-worker-{i}")
             for i in range(workers)]
    for p in procs:
        p.start()

    def forward(signum, _frame) -> None:
        for p in procs:
            if p.pid and p.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGTERM)

    def hup(signum, _frame) -> None:
        for p in procs:
            if p.pid and p.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGHUP)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, hup)
    try:
        for p in procs:
            p.join()
    finally:
        holder.close()
    bad = [p.exitcode for p in procs if p.exitcode not in (0, -signal.SIGTERM)]
    return 1 if bad else 0
