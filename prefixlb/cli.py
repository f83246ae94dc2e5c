"""The ``prefixlb`` command line: one entry point, a subcommand per job.

Each subcommand's code lives in the module that owns the job; this file only wires argument
parsers to them and imports each lazily, so ``prefixlb info`` never pays for aiohttp or torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from prefixlb import __version__


def _cmd_info(args: argparse.Namespace) -> int:
    from prefixlb import index

    info = {
        "version": __version__,
        "python": sys.version.split()[0],
        "index_implementation": index.IMPLEMENTATION,
        "native": index.NATIVE,
    }
    print(json.dumps(info, indent=2))
    return 0


def _serve_config(args: argparse.Namespace):
    """The balancer's configuration from ``prefixlb serve``'s flags (raises ConfigError)."""
    import dataclasses
    import os

    from prefixlb.config import ConfigError, config_from_flags, load_config

    if args.config:
        cfg = load_config(args.config)
        if args.replica:
            raise ConfigError("--replica: give replicas in the config file or as flags, not both")
    else:
        cfg = config_from_flags(args.replica, policy=args.policy or "cache_aware")
    changes = {}
    if args.policy and args.config:
        from prefixlb.routing import POLICIES

        if args.policy not in POLICIES:
            raise ConfigError(f"--policy: unknown policy {args.policy!r} (choose one of {', '.join(POLICIES)})")
        changes["policy"] = args.policy
    if args.host:
        changes["host"] = args.host
    if args.port is not None:
        changes["port"] = args.port
    token = args.admin_token or os.environ.get("PREFIXLB_ADMIN_TOKEN")
    if token:
        changes["admin_token"] = token
    return dataclasses.replace(cfg, **changes)


def _cmd_serve(args: argparse.Namespace) -> int:
    import functools

    from prefixlb.config import ConfigError
    from prefixlb.server.run import run

    log_setup = functools.partial(_log_setup, args.log_level, args.log_format, args.access_log)
    log_setup(None)
    try:
        cfg = _serve_config(args)
    except ConfigError as exc:
        print(f"prefixlb serve: {exc}", file=sys.stderr)
        return 2
    if args.workers < 1:
        print("prefixlb serve: --workers must be >= 1", file=sys.stderr)
        return 2
    # SIGHUP / POST /admin/reload re-read the file with the same flags (picklable for workers)
    keep = argparse.Namespace(config=args.config, replica=args.replica, policy=args.policy, host=args.host,
                              port=args.port, admin_token=args.admin_token)
    reload = functools.partial(_serve_config, keep) if args.config else None
    return run(cfg, workers=args.workers, reload=reload, log_setup=log_setup)


def _log_setup(level: str, fmt: str, access_log: bool, worker: int | None) -> None:
    from prefixlb.logs import setup_logging

    setup_logging(level, fmt, access_log, worker)


def _cmd_emulate(args: argparse.Namespace) -> int:
    from prefixlb.emulator.cli import run

    return run(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    import dataclasses

    from prefixlb.demo import DemoSettings, run_demo

    s = DemoSettings(seed=args.seed)
    if args.requests:
        s = dataclasses.replace(s, requests=args.requests)
    if args.rate:
        s = dataclasses.replace(s, rate=args.rate)
    results = run_demo(s)
    return 0 if all(r.errors == 0 for r in results.values()) else 1


def _benchmarks_dir():
    """The checkout's benchmarks/ (``prefixlb bench`` runs the programs there)."""
    from pathlib import Path

    for base in (Path(__file__).resolve().parent.parent, Path.cwd()):
        if (base / "benchmarks" / "runner.py").exists():
            return base / "benchmarks"
    return None


def _cmd_bench(args: argparse.Namespace) -> int:
    bench = _benchmarks_dir()
    if bench is None:
        print("prefixlb bench: needs a source checkout (benchmarks/runner.py); run it from the repository",
              file=sys.stderr)
        return 2
    sys.path.insert(0, str(bench))
    import runner

    return runner.main(args.rest)


def _cmd_sim(args: argparse.Namespace) -> int:
    from pathlib import Path

    from prefixlb.routing import CostParams
    from prefixlb.sim.run import SimSettings, run, to_markdown

    policies = tuple(p.strip() for p in (args.policies or args.policy).split(",") if p.strip())
    if args.admit_share < 0:
        print(f"prefixlb sim: --admit-share: must be >= 0 (0: never hold), got {args.admit_share}", file=sys.stderr)
        return 2
    s = SimSettings(workload=args.workload, requests=args.requests, replicas=args.replicas, policies=policies,
                    profile=args.profile, load=args.load, pressure=args.pressure,
                    kv_capacity_tokens=args.kv_capacity_tokens, index_capacity_tokens=args.index_capacity_tokens,
                    scrape_interval=args.scrape_interval, network_s=args.network_ms / 1e3,
                    observe_jitter_s=args.observe_jitter_ms / 1e3, time_scale=args.time_scale,
                    balancers=args.balancers, seed=args.seed, bounds=args.bounds,
                    params=CostParams(prefill_tokens_per_s=args.prefill_prior, admit_share=args.admit_share),
                    bounds_requests=args.bounds_requests, progress=not args.no_progress)
    try:
        report = run(s, command=" ".join(["prefixlb", "sim", *args.argv]))
    except ValueError as exc:
        print(f"prefixlb sim: {exc}", file=sys.stderr)
        return 2
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
    md = to_markdown(report)
    if args.markdown:
        Path(args.markdown).write_text(md)
    print(md)
    return 0


def _add_sim_arguments(p: argparse.ArgumentParser) -> None:
    from prefixlb.routing import CostParams
    from prefixlb.sim.workloads import WORKLOAD_NAMES

    p.add_argument("--workload", default="tenants", choices=WORKLOAD_NAMES,
                   help="the live benchmark's workloads, scaled to --requests (default tenants)")
    p.add_argument("--requests", type=int, default=10_000, help="requests in the workload (default 10,000)")
    p.add_argument("--replicas", type=int, default=16, help="replicas in the fleet (default 16)")
    p.add_argument("--policy", default="cache_aware",
                   help="cache_aware (default), round_robin, least_loaded, consistent_hash, sglang_like")
    p.add_argument("--policies", default=None, metavar="A,B,...",
                   help="compare several policies on the same workload and fleet (overrides --policy)")
    p.add_argument("--profile", default="h100-llama3-8b", help="the replicas' hardware/model profile")
    p.add_argument("--load", type=float, default=0.6,
                   help="offered prompt tokens/s as a fraction of the fleet's prefill throughput, counting every "
                        "prompt token as uncached, as prefixlb bench does (default 0.6)")
    p.add_argument("--pressure", type=float, default=1.2, metavar="X",
                   help="size the fleet's KV at X times the workload's shared working set, at least 20,000 tokens "
                        "a replica, as prefixlb bench does (default 1.2; 0 = the profile's capacity)")
    p.add_argument("--kv-capacity-tokens", type=int, default=None, metavar="N",
                   help="KV tokens per replica (overrides --pressure)")
    p.add_argument("--index-capacity-tokens", type=int, default=None, metavar="N",
                   help="tokens the balancer's prefix index may hold per replica (default: the replica's KV; "
                        "sglang_like: 2^26 characters, as sglang-router's tree)")
    p.add_argument("--scrape-interval", type=float, default=1.0, metavar="S",
                   help="seconds between scrapes of each replica's /metrics (default 1; 0 = never)")
    p.add_argument("--network-ms", type=float, default=0.3, help="one-way balancer <-> replica latency (default 0.3)")
    p.add_argument("--observe-jitter-ms", type=float, default=0.0,
                   help="the balancer sees each first byte this much later on average (exponential: an event "
                        "loop's delay); 0 (default) = exact, one deterministic trajectory per seed")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="replicas run this many times faster than the balancer's clock, as an emulated fleet with "
                        "--time-scale X (default 1: real hardware)")
    p.add_argument("--admit-share", type=float, default=CostParams().admit_share, metavar="X",
                   help="cache_aware's admission: hold a request while its replica has X x step_tokens of prompt "
                        f"sent and not yet prefilled (default {CostParams().admit_share:g}; 0: never hold)")
    p.add_argument("--prefill-prior", type=float, default=CostParams().prefill_tokens_per_s, metavar="TOKENS_PER_S",
                   help="the balancer's prior prefill rate per replica, as tiers[].cost.prefill_tokens_per_s "
                        f"(default {CostParams().prefill_tokens_per_s:g}); the rate it learns is reported")
    p.add_argument("--balancers", type=int, default=1,
                   help="independent balancer processes, requests spread over them (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bounds", default="auto", choices=("auto", "full", "off"),
                   help="pooled-cache hit rate and TTFT floor (benchmarks/bounds.py): auto = over all requests up to "
                        "--bounds-requests, else over the first that many; full = all; off (default auto)")
    p.add_argument("--bounds-requests", type=int, default=100_000, metavar="N")
    p.add_argument("--json", default=None, metavar="OUT", help="write the report (the benchmark's JSON shape) here")
    p.add_argument("--markdown", default=None, metavar="OUT", help="write the Markdown summary here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _cmd_train_router(args: argparse.Namespace) -> int:
    from prefixlb.routing.classifier.commands import run_train

    return run_train(args)


def _cmd_eval_router(args: argparse.Namespace) -> int:
    from prefixlb.routing.classifier.commands import run_eval

    return run_eval(args)


def _cmd_report(args: argparse.Namespace) -> int:
    from prefixlb.routing.decision_log import format_report, read_log, summarise, write_training_jsonl

    prices: dict[str, tuple[float, float]] | None = None
    tiers = None
    try:
        if args.config:
            from prefixlb.config import ConfigError, load_config

            try:
                cfg = load_config(args.config)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
            prices = {t.name: (t.input_per_mtok, t.output_per_mtok) for t in cfg.tiers}
            tiers = [t.name for t in cfg.tiers]
        if args.prices:
            prices = {}
            for item in args.prices.split(","):
                name, _, price = item.partition("=")
                pin, _, pout = price.partition("/")
                prices[name.strip()] = (float(pin), float(pout or pin))
            tiers = list(prices)
        summary = summarise(read_log(args.log), prices, tiers)
        if args.to_training:
            names = [t.strip() for t in args.tiers.split(",")] if args.tiers else tiers or summary["tiers"]
            if not names:
                raise ValueError("--to-training needs the tier order: --tiers A,B,C (cheapest first), --prices or --config")
            rows = write_training_jsonl(args.log, names, args.to_training)
            print(f"{rows} labelled prompts written to {args.to_training} (prefixlb train-router --data "
                  f"{args.to_training} --tiers {','.join(names)})", file=sys.stderr)
    except (OSError, ValueError) as exc:
        print(f"prefixlb report: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_report(summary), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefixlb",
        description="Cache-aware, load-aware load balancer for self-hosted LLM inference.",
    )
    parser.add_argument("--version", action="version", version=f"prefixlb {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("info", help="print version and which index implementation is active")
    p.set_defaults(func=_cmd_info)

    from prefixlb.emulator.cli import add_arguments as emulate_arguments

    p = sub.add_parser(
        "emulate",
        help="serve a fleet of emulated vLLM replicas (prints one URL per line; stops on SIGINT/SIGTERM)",
        description="Serve emulated vLLM replicas: vLLM's HTTP API, /metrics and KV events, timed by a profile.",
    )
    emulate_arguments(p)
    p.set_defaults(func=_cmd_emulate)

    p = sub.add_parser("serve", help="run the balancer in front of vLLM (or OpenAI-compatible) replicas")
    p.add_argument("--config", metavar="FILE", help="YAML configuration (see README)")
    p.add_argument(
        "--replica",
        action="append",
        default=[],
        metavar="URL",
        help="a replica URL (repeat); without --config they form one tier",
    )
    p.add_argument("--policy", default=None, help="cache_aware (default), round_robin, least_loaded, consistent_hash")
    p.add_argument("--host", default=None, help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="listen port (default 8000)")
    p.add_argument("--admin-token", default=None, help="bearer token for /admin (or PREFIXLB_ADMIN_TOKEN)")
    p.add_argument("--workers", type=int, default=1,
                   help="balancer processes sharing the port (SO_REUSEPORT); default 1")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="text (default) or one JSON object per line")
    p.add_argument("--access-log", action="store_true",
                   help="one log line per request (request id, tier, replica, status, duration, cached tokens)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("bench", help="the prefix-hit benchmark: every policy and peer router on the same fleet",
                       add_help=False)
    p.set_defaults(func=_cmd_bench, raw=True)

    p = sub.add_parser("sim", help="simulate fleets of thousands of replicas on a virtual clock (same engine, "
                                   "same routing code)",
                       description="Discrete-event simulation: the emulator's engine per replica, the server's routing "
                                   "core, a virtual clock; reports the live benchmark's metrics and bounds.")
    _add_sim_arguments(p)
    p.set_defaults(func=_cmd_sim)

    p = sub.add_parser("demo", help="an emulated vLLM fleet behind prefixlb: cache_aware vs round_robin")
    p.add_argument("--requests", type=int, default=None, help="requests per policy (default 600)")
    p.add_argument("--rate", type=float, default=None, help="emulated requests per second (default 14)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)

    from prefixlb.routing.classifier.commands import add_eval_arguments, add_train_arguments

    p = sub.add_parser(
        "train-router",
        help="train the tier classifier on labelled prompts (needs the classifier extra)",
        description="Train the tier classifier; writes the model, its held-out split and the held-out report to DIR.",
    )
    add_train_arguments(p)
    p.set_defaults(func=_cmd_train_router)

    p = sub.add_parser(
        "eval-router",
        help="score labelled prompts with a trained tier classifier (AUC, APGR, CPT, cost saved, latency)",
        description="Evaluate a tier classifier on every prompt of a labelled file (or its held-out split).",
    )
    add_eval_arguments(p)
    p.set_defaults(func=_cmd_eval_router)

    p = sub.add_parser(
        "report",
        help="summarise a decision log: cost per 1K requests vs all on the largest tier, tier mix, quality",
        description="Read a tier-routing decision log (tier_routing.decision_log; rotated backups included) and "
                    "report cost per 1K requests against sending everything to the largest tier, the tier mix, "
                    "escalations and, when feedback labels were posted, quality.",
    )
    p.add_argument("--log", required=True, action="append", metavar="FILE",
                   help="the decision log (repeat for several; FILE.1, FILE.2, ... are read too)")
    p.add_argument("--prices", default=None, metavar="TIER=IN[/OUT],...",
                   help="$/Mtok per tier, cheapest first, to recompute costs (e.g. small=0.06,medium=0.18,large=0.88)")
    p.add_argument("--config", default=None, metavar="FILE", help="take tiers and prices from a balancer config")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--to-training", default=None, metavar="OUT.jsonl",
                   help="also write the log's labelled requests (cascade outcomes, feedback) as train-router data; "
                        "needs a log written with decision_log.prompts: true")
    p.add_argument("--tiers", default=None, metavar="A,B,C", help="tier names cheapest first (for --to-training)")
    p.set_defaults(func=_cmd_report)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # its own parser (benchmarks/runner.py) takes the rest
        args = argparse.Namespace(func=_cmd_bench, rest=argv[1:])
    else:
        args = parser.parse_args(argv)
        args.argv = argv[1:]
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
