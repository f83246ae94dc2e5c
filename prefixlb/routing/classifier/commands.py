"""``prefixlb train-router`` and ``prefixlb eval-router``: argument parsers and runners.

Importing this module is free (numpy, torch and matplotlib are imported inside the runners),
so ``prefixlb --help`` never pays for them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

__all__ = ["add_eval_arguments", "add_train_arguments", "run_eval", "run_train"]

_EXTRA = "pip install 'prefixlb[classifier]'"


def _tiers(s: str | None) -> list[str] | None:
    if not s:
        return None
    names = [t.strip() for t in s.split(",") if t.strip()]
    if len(names) < 2:
        raise argparse.ArgumentTypeError("--tiers: give at least two tier names, cheapest first")
    return names


def _prices(s: str | None) -> list[float] | None:
    """``1,5,25`` or ``small=0.18,large=0.88`` (the order is the tiers' order)."""
    if not s:
        return None
    out = []
    for part in s.split(","):
        v = part.split("=", 1)[-1].strip()
        try:
            out.append(float(v))
        except ValueError:
            raise argparse.ArgumentTypeError(f"--prices: {part!r} is not a number") from None
    return out


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, metavar="FILE.jsonl",
                   help='labelled prompts: {"prompt","weak_correct","strong_correct"} or {"prompt","correct":{tier:bool}}')
    p.add_argument("--out", required=True, metavar="DIR", help="model directory to write (weights, config, split, report)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holdout", type=float, default=0.2, help="held-out fraction, never trained on (default 0.2)")
    p.add_argument("--validation", type=float, default=0.15,
                   help="fraction of the rest used to calibrate thresholds (default 0.15)")
    p.add_argument("--epochs", type=int, default=40, help="epochs of the ordinal head (default 40)")
    p.add_argument("--group-epochs", type=int, default=30, help="epochs of the group head (default 30)")
    p.add_argument("--hidden", type=int, default=32, help="hidden units of the ordinal head (default 32)")
    p.add_argument("--tiers", type=_tiers, default=None, metavar="A,B,C",
                   help="tier names cheapest first (N-tier format; default: key order of the first row)")
    p.add_argument("--prices", type=_prices, default=None, metavar="P,P,...",
                   help="price per call of each tier, cheapest first (default 1,5,25,...)")
    p.add_argument("--budget", type=float, default=None, metavar="FRACTION",
                   help="default threshold: this strong-call (cost) fraction on validation "
                        "(default: the cheapest point at 95%% of the strongest tier's quality)")
    p.add_argument("--label", choices=["win", "needed"], default="win",
                   help="win: P(dearer tier beats cheaper, ties 1/2) (default); needed: strict 'cheaper wrong, dearer right'")
    p.add_argument("--groups", choices=["auto", "subject", "kmeans"], default="auto",
                   help="group targets: the data's subject field when every row has one (auto), or k-means clusters")
    p.add_argument("--vocab", choices=["full", "corpus"], default="full",
                   help="distil the whole MiniLM vocabulary (default, cached) or only tokens in the data (fast)")


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="a directory written by train-router")
    p.add_argument("--data", required=True, metavar="FILE.jsonl", help="labelled prompts (either format); every row is scored")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the metrics as JSON")
    p.add_argument("--plot", type=Path, default=None, metavar="PNG", help="write the cost-quality curve")
    p.add_argument("--tiers", type=_tiers, default=None, metavar="A,B,C", help="tier names cheapest first (N-tier format)")
    p.add_argument("--prices", type=_prices, default=None, metavar="P,P,...",
                   help="price per call of each tier (default: the model's)")
    p.add_argument("--holdout-only", action="store_true",
                   help="score only the prompts in the model's recorded held-out split")


def _fail(cmd: str, msg: str) -> int:
    print(f"prefixlb {cmd}: {msg}", file=sys.stderr)
    return 2


def _command_line(argv0: str = "prefixlb") -> str:
    return " ".join([argv0] + [shlex.quote(a) for a in sys.argv[1:]])


def run_train(args: argparse.Namespace) -> int:
    try:
        import numpy  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        return _fail("train-router", f"needs {exc.name}: {_EXTRA} (torch is pinned there; an unpinned torch is a "
                                     "multi-GB CUDA build)")
    from .data import DataError
    from .evaluate import markdown, public, write_report
    from .minilm import MiniLMNotInstalled
    from .train import TrainConfig, train

    cfg = TrainConfig(seed=args.seed, holdout=args.holdout, validation=args.validation, epochs=args.epochs,
                      group_epochs=args.group_epochs, hidden=args.hidden, label=args.label, groups=args.groups,
                      vocab=args.vocab, prices=args.prices, budget=args.budget)
    try:
        report = train(args.data, args.out, cfg, tiers=args.tiers, log=lambda m: print(m, file=sys.stderr))
    except (DataError, MiniLMNotInstalled, ValueError) as exc:
        return _fail("train-router", str(exc))
    report["command"] = _command_line()
    title = f"held-out split of {Path(args.data).name}"
    write_report(Path(args.out), report, title=title, plot=False)
    print(markdown(report, title), end="")
    h = public(report["heldout"])
    print(json.dumps({k: h[k] for k in ("auc", "apgr", "cpt50", "cpt80", "cost_saved_at_95", "latency_ms_p50")}))
    print(f"model, split and report written to {args.out}", file=sys.stderr)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    try:
        import numpy  # noqa: F401
    except ImportError:
        return _fail("eval-router", f"needs numpy: {_EXTRA}")
    from .data import DataError, load_jsonl, prompt_hash
    from .evaluate import evaluate_model, markdown, public
    from .model import ModelError, TierClassifier

    try:
        clf = TierClassifier.load(args.model)
        ds = load_jsonl(args.data, args.tiers or clf.tiers)
    except (DataError, ModelError) as exc:
        return _fail("eval-router", str(exc))
    split_path = Path(args.model) / "split.json"
    split = json.loads(split_path.read_text()) if split_path.exists() else {}
    sets = {k: set(split.get(k, [])) for k in ("train", "validation", "heldout")}
    hashes = [prompt_hash(ex.prompt) for ex in ds.examples]
    overlap = {k: sum(1 for h in hashes if h in s) for k, s in sets.items()}
    if args.holdout_only:
        if not sets["heldout"]:
            return _fail("eval-router", f"{split_path}: no recorded held-out split")
        keep = [i for i, h in enumerate(hashes) if h in sets["heldout"]]
        if not keep:
            return _fail("eval-router", f"none of the {len(ds)} prompts of {args.data} is in the model's held-out split")
        ds = ds.subset(keep)
        print(f"scoring the {len(ds)} prompts of the model's held-out split", file=sys.stderr)
    elif overlap["train"] or overlap["validation"]:
        print(f"note: {overlap['train']} of these {len(ds)} prompts were used to train the model and "
              f"{overlap['validation']} to calibrate it: the numbers below include them and overstate quality on "
              "unseen prompts. Pass --holdout-only to score only the held-out split.", file=sys.stderr)
    try:
        result = evaluate_model(clf, ds, prices=args.prices, latency=True)
    except ValueError as exc:
        return _fail("eval-router", str(exc))
    result["overlap_with_training"] = overlap if not args.holdout_only else {"heldout": len(ds)}
    result["scored"] = "heldout" if args.holdout_only else "all"
    report = {"command": _command_line(), "evaluation": result}
    print(markdown(report, f"{Path(args.data).name} with {args.model}"), end="")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(public(result), indent=2) + "\n")
    if args.plot:
        from .plot import plot_curve

        args.plot.parent.mkdir(parents=True, exist_ok=True)
        if plot_curve(result, args.plot, title=f"{Path(args.data).name} ({result['scored']})") is None:
            print("note: matplotlib is not installed; no plot written", file=sys.stderr)
    return 0
