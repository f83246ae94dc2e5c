"""``prefixlb serve``: run a Balancer until SIGINT/SIGTERM, then drain and exit."""

from __future__ import annotations

import asyncio
import logging
import signal

from prefixlb.config import Config

from .balancer import Balancer

__all__ = ["serve_forever", "run"]

log = logging.getLogger("prefixlb.server")


async def serve_forever(config: Config, ready=None) -> None:
    balancer = Balancer(config)
    await balancer.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    tiers = ", ".join(f"{t.name} ({len(t.replicas)} replicas)" for t in balancer.tiers.values())
    log.info("prefixlb listening on http://%s:%d, policy %s, tiers: %s", config.host, balancer.port, config.policy, tiers)
    print(f"prefixlb listening on http://{config.host}:{balancer.port}", flush=True)
    if ready is not None:
        ready(balancer)
    try:
        await stop.wait()
    finally:
        log.info("prefixlb: draining (up to %.0fs)", config.drain_timeout_s)
        await balancer.stop()


def run(config: Config) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(serve_forever(config))
    else:
        uvloop.run(serve_forever(config))
    return 0
