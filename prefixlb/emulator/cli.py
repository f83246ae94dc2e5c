"""``prefixlb emulate``: serve a fleet of emulated vLLM replicas until SIGINT/SIGTERM.

Prints one URL per replica on stdout (one per line, nothing else), logs to stderr. Only
argparse is imported at module level so building the top-level parser stays cheap.
"""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``emulate`` subcommand's flags."""
    g = p.add_argument_group("fleet")
    g.add_argument("--replicas", type=int, default=1, help="replicas in this process, one port each (default 1)")
    g.add_argument(
        "--base-port", type=int, default=9001, help="replica i listens on base-port + i; 0 = ephemeral ports"
    )
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    g.add_argument(
        "--index-offset", type=int, default=0, help="number replicas from this index (topics, KV port offsets)"
    )
    g.add_argument("--time-scale", type=float, default=1.0, help="emulated seconds per wall second (default 1)")
    g.add_argument("--seed", type=int, default=0, help="seed of the fault-injection draws")
    e = p.add_argument_group("engine (defaults from the profile)")
    e.add_argument("--profile", default="h100-llama3-8b", help="hardware/model profile (default h100-llama3-8b)")
    e.add_argument("--model", default=None, help="served model name (default: the profile's)")
    e.add_argument("--block-size", type=int, default=None)
    e.add_argument("--kv-capacity-tokens", type=int, default=None, help="KV cache size in tokens")
    e.add_argument("--num-gpu-blocks", type=int, default=None, help="KV cache size in blocks (wins over tokens)")
    e.add_argument("--max-num-seqs", type=int, default=None)
    e.add_argument("--max-num-batched-tokens", type=int, default=None)
    e.add_argument("--max-model-len", type=int, default=None)
    e.add_argument("--prefix-caching-hash-algo", default="sha256", help="sha256 | sha256_cbor | xxhash | xxhash_cbor")
    e.add_argument(
        "--tokenizer", default=None, metavar="DIR", help="HF tokenizer dir (tokenizer.json); default: byte tokenizer"
    )
    e.add_argument("--expose-quality", action="store_true", help="send the x-emulator-quality header (quality model)")
    e.add_argument(
        "--no-prompt-tokens-details",
        action="store_true",
        help="usage.prompt_tokens_details = null, as vLLM without --enable-prompt-tokens-details",
    )
    k = p.add_argument_group("KV-cache events (vLLM's ZMQ publisher)")
    k.add_argument(
        "--kv-events-endpoint",
        default=None,
        help="PUB endpoint: a concrete host connects (the subscriber binds); '*' or ipc:// binds",
    )
    k.add_argument(
        "--kv-replay-endpoint", default=None, help="ROUTER endpoint for replay (bound; port + replica index)"
    )
    k.add_argument("--kv-topic", default="replica-{i}", help="topic per replica; {i} is the replica index")
    k.add_argument("--kv-buffer-steps", type=int, default=10_000, help="batches kept for replay (default 10000)")
    f = p.add_argument_group("fault injection (durations in emulated seconds)")
    f.add_argument(
        "--fault-replicas", default=None, help="comma-separated replica indexes the fault flags apply to (default all)"
    )
    f.add_argument("--fault-error-rate", type=float, default=0.0, help="share of inference requests answered 500")
    f.add_argument("--fault-latency", type=float, default=0.0, help="added before the first byte")
    f.add_argument("--fault-hang", action="store_true", help="accept requests and never answer")
    f.add_argument("--fault-crash-after", type=int, default=None, help="close the port after N inference requests")
    f.add_argument("--fault-flap-period", type=float, default=None, help="alternate up/down with this period")
    f.add_argument("--fault-slow-stream", type=float, default=0.0, help="delay between SSE chunks")
    p.add_argument("--log-level", default="INFO", help="stderr log level (default INFO)")


def _quiet_bad_http(record: object) -> bool:
    """Drop aiohttp's traceback for non-HTTP/1 bytes (sglang-router's gRPC probe sends ``PRI *``);
    uvicorn, in front of vLLM, logs a one-line warning for the same thing."""
    import logging

    exc = getattr(record, "exc_info", None)
    if exc and type(exc[1]).__name__ == "BadHttpMessage":
        logging.getLogger("prefixlb.emulator").debug("ignored a request that is not HTTP/1.x")
        return False
    return True


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; 2 on a configuration error."""
    import asyncio
    import logging
    import signal
    import sys

    from .config import Faults, ReplicaConfig
    from .fleet import EmulatedFleet

    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    log = logging.getLogger("prefixlb.emulator")
    logging.getLogger("aiohttp.server").addFilter(_quiet_bad_http)
    faults = Faults(
        error_rate=args.fault_error_rate,
        latency=args.fault_latency,
        hang=args.fault_hang,
        crash_after=args.fault_crash_after,
        flap_period=args.fault_flap_period,
        slow_stream=args.fault_slow_stream,
    )
    config = ReplicaConfig(
        profile=args.profile,
        model=args.model,
        block_size=args.block_size,
        num_gpu_blocks=args.num_gpu_blocks,
        kv_capacity_tokens=args.kv_capacity_tokens,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        hash_algo=args.prefix_caching_hash_algo,
        tokenizer=args.tokenizer,
        time_scale=args.time_scale,
        host=args.host,
        kv_events_endpoint=args.kv_events_endpoint,
        kv_replay_endpoint=args.kv_replay_endpoint,
        kv_topic=args.kv_topic,
        kv_buffer_steps=args.kv_buffer_steps,
        expose_quality=args.expose_quality,
        enable_prompt_tokens_details=not args.no_prompt_tokens_details,
        seed=args.seed,
    )
    targets = None
    if args.fault_replicas:
        try:
            targets = {int(x) for x in args.fault_replicas.split(",") if x.strip()}
        except ValueError:
            print(
                f"prefixlb emulate: --fault-replicas must be comma-separated integers, got {args.fault_replicas!r}",
                file=sys.stderr,
            )
            return 2
    indexes = range(args.index_offset, args.index_offset + args.replicas)
    by_replica = {i: faults for i in indexes if targets is None or i in targets}

    async def serve() -> None:
        fleet = EmulatedFleet(
            args.replicas,
            base_port=args.base_port,
            index_offset=args.index_offset,
            config=config,
            faults_by_replica=by_replica if faults.active() else None,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with fleet:
            for url in fleet.urls:
                print(url, flush=True)
            r0 = fleet.replicas[0]
            log.info(
                "%d replica(s) of %s (profile %s, %d KV blocks of %d tokens) at time scale %g",
                len(fleet.replicas),
                r0.model,
                r0.engine.profile.name,
                r0.engine.num_gpu_blocks,
                r0.engine.block_size,
                args.time_scale,
            )
            await stop.wait()
            log.info("shutting down")

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        uvloop = None
    try:
        if uvloop is not None:
            uvloop.run(serve())
        else:
            asyncio.run(serve())
    except (ValueError, KeyError, OSError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"prefixlb emulate: {msg}", file=sys.stderr)
        return 2
    return 0
