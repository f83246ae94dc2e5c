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

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
