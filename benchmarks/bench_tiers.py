"""bench_tiers: tier routing on an emulated three-tier fleet — tier mix, cost per 1K requests and
quality of five configurations: all-large, rules only, classifier, cascade, classifier + cascade.

The fleet (its own process): three emulated tiers answering with the emulator's quality model
(``--expose-quality``: each answer says whether it is correct; token logprobs follow the
answer's hidden confidence, prefixlb/engine/quality.py):

| tier | profile | skill (MMLU 5-shot, Meta model cards) | price $/Mtok in = out |
|---|---|---|---|
| small | a10g-llama3-8b timing, re-labelled llama-3.2-3b | 0.634 (Llama 3.2 3B Instruct) | 0.06 |
| medium | h100-llama3-8b | 0.694 (Llama 3.1 8B Instruct) | 0.18 |
| large | h100-llama3-70b-tp4 | 0.836 (Llama 3.1 70B Instruct) | 0.88 |

Prices are serverless list prices for these models (Together AI's Llama 3.2 3B / 3.1 8B /
3.3 70B Instruct Turbo), taken as assumptions; the 8B/70B pair is DESIGN.md's example config.
prefixlb/engine/profiles.py has two distinct skills only (8B and 70B; a10g-llama3-8b is the same
model as h100-llama3-8b, so it answers identically), so the small tier is a copy of
a10g-llama3-8b with Llama 3.2 3B's skill and model name, registered in the fleet process only
(its step times are the 8B's; this benchmark measures tokens and answers, not latency).

Workload (seeded): prompts from seven families (short facts, explanations, reasoning, code,
word problems with numbers, tables, long documents to summarise), so length and digits vary.
The quality model's difficulty is 70% a hash of the text, 20% length, 10% digits: a text
classifier can predict only part of it; the cascade's logprob features see the realised
confidence of each answer. Two disjoint prompt sets from the same generator:

1. **train** (``--train N``): each prompt asked of every tier directly (no balancer): labels
   (correct per tier) for ``prefixlb train-router``, and per-answer logprob features and tokens
   to choose the thresholds (cascade ``min_mean_logprob``; the classifier's threshold when it
   starts the cascade) by replaying the policies on these answers: the cheapest setting whose
   quality reaches ``--target-quality`` (default 0.96) of all-large. The eval prompts are never
   used to choose anything.
2. **eval** (``--eval N``): every configuration serves the same prompts through a real
   ``prefixlb serve`` process (decision log on); quality is the share of final answers whose
   ``x-emulator-quality`` says ``correct=1``; cost is usage tokens x tier price, every attempt
   paid (a cascade pays for the answers it throws away). Each label is also posted to
   ``/admin/feedback`` and ``prefixlb report`` is run on each decision log as a cross-check.

Target (issue 6): >= 70% cost cut against all-large at >= 95% of all-large quality.

``--overhead``: the balancer's added latency and throughput with tier routing on (the rules; the
rules and the trained classifier; both with the decision log; ``model: auto``) against the same
balancer without a tier_routing section and sglang-router, using bench_overhead.py's fake
replica and client (``--rounds``).

Usage:
  python benchmarks/bench_tiers.py [--train 1500] [--eval 2000] [--quick] [--json OUT] [--markdown OUT]
  python benchmarks/bench_tiers.py --overhead [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RESULTS = HERE / "results"

TIERS = ("small", "medium", "large")
PRICES = {"small": 0.06, "medium": 0.18, "large": 0.88}
MODELS = {"small": "llama-3.2-3b", "medium": "llama-3.1-8b", "large": "llama-3.3-70b"}
SKILL_3B = 0.634  # Llama 3.2 3B Instruct, MMLU 5-shot (Meta model card)
CONFIGS = ("all-large", "rules", "classifier", "cascade", "classifier+cascade")
MAX_TOKENS = 64
TOP_LOGPROBS = 2


# -- workload ------------------------------------------------------------------------------------------

_WORDS = ["system", "data", "model", "value", "network", "market", "energy", "cell", "policy", "signal", "memory", "protein", "climate", "price", "contract", "engine", "river", "language", "theory", "budget", "sensor", "queue", "graph", "vector", "cache", "tenant", "index"]
_TOPICS = ("photosynthesis", "inflation", "TCP congestion control", "the French revolution", "black holes",
           "vaccines", "compound interest", "recursion", "plate tectonics", "supply chains", "public-key cryptography",
           "the immune system", "monetary policy", "neural networks", "ocean currents", "the electoral college",
           "garbage collection", "game theory", "the water cycle", "quantum entanglement", "database indexes")
_COUNTRIES = ("France", "Kenya", "Peru", "Vietnam", "Norway", "Chile", "Egypt", "Canada", "Japan", "Ghana",
              "Portugal", "Mongolia", "Uruguay", "Nepal", "Finland", "Morocco")
_AUDIENCES = ("a ten-year-old", "a first-year student", "a busy manager", "an expert", "my grandmother")


def _sentence(rng: random.Random, numbers: float = 0.0) -> str:
    n = rng.randint(6, 16)
    words = []
    for _ in range(n):
        if rng.random() < numbers:
            words.append(str(rng.randint(2, 99999)))
        else:
            words.append(rng.choice(_WORDS))
    return " ".join(words).capitalize() + "."


def make_prompt(rng: random.Random) -> tuple[str, str]:
    """(family, prompt text) of one seeded prompt."""
    r = rng.random()
    if r < 0.28:
        kind = rng.randrange(4)
        c = rng.choice(_COUNTRIES)
        text = (f"What is the capital of {c}?", f"Name one famous dish from {c}.",
                f"Which language is spoken in {c}?", f"Translate 'good morning' into the main language of {c}.")[kind]
        return "fact", text
    if r < 0.52:
        t = rng.choice(_TOPICS)
        ctx = " ".join(_sentence(rng) for _ in range(rng.randint(0, 4)))
        return "explain", f"{ctx} Explain {t} to {rng.choice(_AUDIENCES)} in {rng.randint(2, 6)} sentences.".strip()
    if r < 0.62:
        a, b, c = rng.sample(_WORDS, 3)
        extra = " ".join(_sentence(rng) for _ in range(rng.randint(0, 3)))
        return "reasoning", (f"All {a}s are {b}s and some {b}s are {c}s. {extra} Does it follow that some {a}s are "
                             f"{c}s? Explain step by step.")
    if r < 0.72:
        lines = [f"def {rng.choice(_WORDS)}_{i}(x, y):\n    return x {rng.choice('+-*/%')} y * {rng.randint(1, 999)}"
                 for i in range(rng.randint(2, 12))]
        return "code", "Find the bug in this code and fix it:\n```python\n" + "\n".join(lines) + "\n```"
    if r < 0.82:
        nums = [rng.randint(10, 99999) for _ in range(rng.randint(3, 14))]
        return "math", ("A company records these amounts: " + ", ".join(map(str, nums))
                        + f". What is the total, and what is {rng.randint(2, 40)}% of it? Show your work.")
    if r < 0.88:
        rows = "\n".join(" | ".join(str(rng.randint(0, 9999)) for _ in range(4)) for _ in range(rng.randint(3, 20)))
        return "table", f"Here is a table (columns A | B | C | D):\n{rows}\nWhich row has the largest B - D?"
    doc = " ".join(_sentence(rng, numbers=rng.choice((0.0, 0.05, 0.2))) for _ in range(rng.randint(10, 60)))
    return "summary", f"{doc}\n\nSummarise the text above in three bullet points."


def workload(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    seen: set[str] = set()
    out = []
    while len(out) < n:
        fam, p = make_prompt(rng)
        if p not in seen:  # the same text would answer identically; keep the sets free of duplicates
            seen.add(p)
            out.append((fam, p))
    return out


def body(prompt: str, model: str, logprobs: bool = False) -> dict:
    b = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS}
    if logprobs:
        b |= {"logprobs": True, "top_logprobs": TOP_LOGPROBS}
    return b


def correct_from(header: str | None) -> bool | None:
    if not header:
        return None
    for part in header.split(";"):
        k, _, v = part.strip().partition("=")
        if k == "correct":
            return v == "1"
    return None


# -- the fleet process -----------------------------------------------------------------------------------


def role_fleet(time_scale: float) -> int:
    import uvloop

    from prefixlb.emulator import EmulatedFleet
    from prefixlb.engine.profiles import PROFILES, get_profile

    small = get_profile("a10g-llama3-8b").replace(
        name="a10g-llama3.2-3b", model=MODELS["small"], skill=SKILL_3B,
        description="a10g-llama3-8b timing with Llama 3.2 3B's skill (bench_tiers only)")
    PROFILES[small.name] = small
    profiles = {"small": small.name, "medium": "h100-llama3-8b", "large": "h100-llama3-70b-tp4"}
    replicas = {"small": 2, "medium": 1, "large": 1}

    async def serve() -> None:
        fleets = []
        try:
            for t in TIERS:
                f = EmulatedFleet(replicas[t], profile=profiles[t], model=MODELS[t], expose_quality=True,
                                  time_scale=time_scale, max_lag=5.0)
                await f.start()
                fleets.append(f)
                for u in f.urls:
                    print(t, u, flush=True)
            print("READY", flush=True)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes our stdin
        finally:
            for f in fleets:
                await f.stop()

    uvloop.run(serve())
    return 0


class Fleet:
    def __init__(self, time_scale: float) -> None:
        self.p = subprocess.Popen([sys.executable, __file__, "--role", "fleet", "--time-scale", str(time_scale)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.urls: dict[str, list[str]] = {t: [] for t in TIERS}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.p.stdout.readline()  # type: ignore[union-attr]
            if not line:
                raise RuntimeError("the fleet process exited during start-up")
            if line.strip() == "READY":
                return
            t, u = line.split()
            self.urls[t].append(u)
        self.stop()
        raise RuntimeError("the fleet did not start in 60 s")

    def stop(self) -> None:
        if self.p.poll() is None:
            try:
                self.p.stdin.close()  # type: ignore[union-attr]
                self.p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, 9)
                self.p.wait(5)


# -- phase 1: labels and features on the train set ------------------------------------------------------


async def _bounded(coros, concurrency: int):
    sem = asyncio.Semaphore(concurrency)

    async def one(c):
        async with sem:
            return await c

    return await asyncio.gather(*(one(c) for c in coros))


async def collect(fleet: Fleet, prompts: list[tuple[str, str]], concurrency: int) -> list[dict]:
    """Each prompt asked of every tier directly: correctness, tokens and logprob features."""
    import aiohttp

    from prefixlb.routing.cascade import logprob_features, parse_answer

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        async def ask(i: int, tier: str, prompt: str) -> tuple[int, str, dict]:
            urls = fleet.urls[tier]
            async with s.post(urls[i % len(urls)] + "/v1/chat/completions",
                              json=body(prompt, MODELS[tier], logprobs=True)) as r:
                data = await r.json()
                ok = correct_from(r.headers.get("x-emulator-quality"))
            if r.status != 200 or ok is None:
                raise RuntimeError(f"{tier} answered {r.status}: {data}")
            a = parse_answer(data, chat=True)
            f = logprob_features(a.logprobs, a.margins)
            u = data["usage"]
            return i, tier, {"correct": ok, "prompt_tokens": u["prompt_tokens"],
                             "completion_tokens": u["completion_tokens"], "mean": f.mean, "min": f.min,
                             "low_fraction": f.low_fraction, "margin": f.margin}

        results = await _bounded([ask(i, t, p) for i, (_, p) in enumerate(prompts) for t in TIERS], concurrency)
    rows = [{"family": fam, "prompt": p, "tiers": {}} for fam, p in prompts]
    for i, t, r in results:
        rows[i]["tiers"][t] = r
    return rows


# -- phase 2: the classifier ------------------------------------------------------------------------------


def train_classifier(rows: list[dict], out: Path, seed: int) -> tuple[Path, dict]:
    data = out.parent / "train.jsonl"
    with open(data, "w") as f:
        f.writelines(json.dumps({"prompt": r["prompt"], "correct": {t: r["tiers"][t]["correct"] for t in TIERS},
                                "source": r["family"]}) + "\n" for r in rows)
    cmd = [sys.executable, "-m", "prefixlb", "train-router", "--data", str(data), "--out", str(out),
           "--tiers", ",".join(TIERS), "--prices", ",".join(str(PRICES[t]) for t in TIERS), "--seed", str(seed)]
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(f"train-router failed ({p.returncode}): {p.stderr[-2000:]}")
    shown = ["prefixlb", *cmd[3:]]
    shown[shown.index(str(data))], shown[shown.index(str(out))] = "TRAIN.jsonl", "MODEL_DIR"
    return out, {"command": " ".join(shown), "seconds": round(time.monotonic() - t0, 1),
                 "summary": p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""}


# -- phase 3: thresholds, chosen on the train set ---------------------------------------------------------


def _cost(r: dict, tier: str) -> float:
    a = r["tiers"][tier]
    return (a["prompt_tokens"] + a["completion_tokens"]) * PRICES[tier] / 1e6


def _table(rows: list[dict]) -> list[tuple]:
    """Per prompt and tier: (cost, correct, mean token logprob) - what a replay needs."""
    return [tuple((_cost(r, t), r["tiers"][t]["correct"], r["tiers"][t]["mean"]) for t in TIERS) for r in rows]


def replay(table: list[tuple], start: list[int], th: tuple[float, float] | None) -> tuple[float, float]:
    """(mean cost, quality) of sending prompt i to tier ``start[i]`` and, with ``th`` (the
    small and medium tiers' ``min_mean_logprob``), escalating while the answer's mean token
    logprob is below its tier's threshold (no cascade when ``th`` is None)."""
    cost = q = 0.0
    last = len(TIERS) - 1
    for row, k in zip(table, start):
        while True:
            c, ok, mean = row[k]
            cost += c
            if th is None or k == last or mean >= th[k]:
                q += ok
                break
            k += 1
    return cost / len(table), q / len(table)


def choose_thresholds(rows: list[dict], clf, target: float) -> dict:
    """The cheapest settings whose replayed quality reaches ``target`` x all-large's, on ``rows``:
    per-tier ``min_mean_logprob`` for the cascade (a grid), then the classifier threshold that
    picks the cascade's first tier together with them (a coarser grid)."""
    table = _table(rows)
    n = len(rows)
    large_cost, large_q = replay(table, [2] * n, None)
    goal = target * large_q
    fine = [x / 50 for x in range(-150, 1)]  # -3.0 .. 0 by 0.02
    coarse = fine[::5]
    out: dict = {"all_large": {"cost": large_cost, "quality": large_q}, "goal_quality": goal}

    def search(start: list[int], grid_a, grid_b):
        best = None
        for a in grid_a:
            for b in grid_b:
                c, q = replay(table, start, (a, b))
                if q >= goal and (best is None or c < best[2]):
                    best = (a, b, c, q)
        return best

    def refine(start: list[int], best):
        if best is None:
            return None
        near = lambda v: [x for x in fine if abs(x - v) <= 0.1 + 1e-9]
        return search(start, near(best[0]), near(best[1])) or best

    zero = [0] * n
    b = refine(zero, search(zero, coarse, coarse))
    out["cascade"] = None if b is None else {"min_mean_logprob": {"small": b[0], "medium": b[1]}, "cost": b[2],
                                              "quality": b[3]}
    if clf is not None:
        probs = [clf.probs(r["prompt"]) for r in rows]
        starts = lambda t: [int(sum(1 for p in ps if p >= t)) for ps in probs]
        best = None
        for t in [x / 100 for x in range(50, 100, 5)]:
            st = starts(t)
            got = search(st, coarse, coarse)
            if got is not None and (best is None or got[2] < best[3]):
                best = (t, got[0], got[1], got[2], got[3])
        if best is not None:
            st = starts(best[0])
            r = refine(st, (best[1], best[2], best[3], best[4]))
            best = (best[0], *r)
        out["classifier+cascade"] = None if best is None else {
            "classifier_threshold": best[0], "min_mean_logprob": {"small": best[1], "medium": best[2]},
            "cost": best[3], "quality": best[4]}
        c, q = replay(table, starts(clf.threshold), None)
        out["classifier"] = {"threshold": clf.threshold, "cost": c, "quality": q}
    return out


# -- phase 4: the five configurations through prefixlb serve ------------------------------------------------

RULES = [
    # what an operator would write without data: long or number-heavy prompts to the largest tier,
    # code and reasoning to the middle one, the rest to the cheapest
    {"name": "long-document", "tier": "large", "when": {"prompt_chars_gt": 1500}},
    {"name": "numbers", "tier": "large", "when": {"last_user_regex": r"(\d+\D+){6,}"}},
    {"name": "code", "tier": "medium", "when": {"keywords_any": ["```", "def ", "bug"]}},
    {"name": "reasoning", "tier": "medium", "when": {"keywords_any": ["step by step", "does it follow"]}},
]


def balancer_config(name: str, fleet: Fleet, model_dir: Path | None, th: dict, log: Path) -> tuple[dict, str]:
    """(config document, the model name clients send) for one configuration."""
    doc: dict = {"listen": {"host": "127.0.0.1", "port": 0}, "admin": {"token": "bench"},
                 "tiers": [{"name": t, "model": MODELS[t], "replicas": fleet.urls[t],
                            "price": {"input_per_mtok": PRICES[t], "output_per_mtok": PRICES[t]}} for t in TIERS]}
    tr: dict = {"decision_log": {"path": str(log), "prompts": True}}
    model = "auto"
    if name == "all-large":
        model = "large"
    elif name == "rules":
        tr["rules"] = RULES
    elif name == "classifier":
        tr["classifier"] = {"model": str(model_dir)}
    elif name in ("cascade", "classifier+cascade"):
        cc = th[name]
        if name == "classifier+cascade":
            tr["classifier"] = {"model": str(model_dir), "threshold": cc["classifier_threshold"]}
        tr["cascade"] = {"top_logprobs": TOP_LOGPROBS,
                         "per_tier": {t: {"min_mean_logprob": v} for t, v in cc["min_mean_logprob"].items()}}
        model = "auto-cascade"
    doc["tier_routing"] = tr
    return doc, model


async def drive(url: str, model: str, prompts: list[tuple[str, str]], concurrency: int) -> list[dict]:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        async def one(fam: str, prompt: str) -> dict:
            async with s.post(url + "/v1/chat/completions", json=body(prompt, model)) as r:
                await r.read()
                h = r.headers
                out = {"family": fam, "status": r.status, "tier": h.get("x-prefixlb-tier"),
                       "step": h.get("x-prefixlb-step"), "escalations": int(h.get("x-prefixlb-escalations", 0)),
                       "correct": correct_from(h.get("x-emulator-quality")),
                       "request_id": h.get("x-prefixlb-request-id")}
            if out["correct"] is not None:
                async with s.post(url + "/admin/feedback", json={"request_id": out["request_id"],
                                                                 "correct": out["correct"]},
                                  headers={"authorization": "Bearer bench"}) as r:
                    await r.read()
            return out

        return await _bounded([one(f, p) for f, p in prompts], concurrency)


def run_config(name: str, fleet: Fleet, model_dir: Path | None, th: dict, prompts, workdir: Path,
               concurrency: int) -> dict:
    from targets import Target

    log = workdir / f"decisions-{name}.jsonl"
    doc, model = balancer_config(name, fleet, model_dir, th, log)
    cfg_path = workdir / f"prefixlb-{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    argv = [sys.executable, "-m", "prefixlb", "serve", "--config", str(cfg_path), "--log-level", "warning"]
    probe = ("/v1/chat/completions", json.dumps(body("ping", "small")).encode())
    t = Target(name, argv, None, probe=probe)
    try:
        t0 = time.monotonic()
        res = asyncio.run(drive(t.url, model, prompts, concurrency))  # type: ignore[arg-type]
        wall = time.monotonic() - t0
    finally:
        t.stop()
    # cost from the decision log (every attempt's usage x price), quality from the emulator's header
    rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    reqs = [r for r in rows if r.get("type") == "request" and r.get("model") != "small"]  # not the probe
    cost_of = {r["request_id"]: r["cost"] for r in reqs}
    n = len(res)
    ok = [r for r in res if r["status"] == 200 and r["correct"] is not None]
    mix = {tier: sum(1 for r in res if r["tier"] == tier) / n for tier in TIERS}
    cost = sum(r["cost"] for r in reqs)
    rep = subprocess.run([sys.executable, "-m", "prefixlb", "report", "--log", str(log), "--json", "--prices",
                          ",".join(f"{t}={PRICES[t]}" for t in TIERS)], capture_output=True, text=True, timeout=120)
    report = json.loads(rep.stdout) if rep.returncode == 0 else {"error": rep.stderr[-500:]}
    return {
        "per_request": {"correct": [bool(r["correct"]) for r in res],
                        "cost": [cost_of.get(r["request_id"], 0.0) for r in res]},
        "requests": n, "errors": n - len(ok), "model": model, "wall_s": round(wall, 1),
        "quality": sum(r["correct"] for r in ok) / len(ok) if ok else 0.0,
        "cost_per_1k": 1000 * cost / len(reqs) if reqs else 0.0,
        "tier_mix": mix,
        "steps": {s: sum(1 for r in res if r["step"] == s) / n for s in sorted({r["step"] for r in res})},
        "escalated": sum(1 for r in res if r["escalations"]) / n,
        "escalations_per_request": sum(r["escalations"] for r in res) / n,
        "decide_us_p50": statistics.median(r["decide_us"] for r in reqs) if reqs else None,
        "report": report,
        "by_family": {fam: {"n": len(v), "quality": sum(x["correct"] for x in v) / len(v),
                            "large_share": sum(1 for x in v if x["tier"] == "large") / len(v)}
                      for fam in sorted({r["family"] for r in ok})
                      for v in [[x for x in ok if x["family"] == fam]]},
    }


def bootstrap(base: dict, other: dict, seed: int, rounds: int = 2000) -> dict:
    """90% intervals of the cost cut and of the quality ratio against all-large, resampling the
    eval prompts (paired: both configurations answered the same prompts)."""
    rng = random.Random(seed)
    n = len(base["correct"])
    cuts, rels = [], []
    for _ in range(rounds):
        idx = [rng.randrange(n) for _ in range(n)]
        bc = sum(base["cost"][i] for i in idx)
        bq = sum(base["correct"][i] for i in idx)
        cuts.append(1 - sum(other["cost"][i] for i in idx) / bc)
        rels.append(sum(other["correct"][i] for i in idx) / bq)
    cuts.sort()
    rels.sort()
    lo, hi = int(0.05 * rounds), int(0.95 * rounds) - 1
    return {"cost_cut": [round(cuts[lo], 4), round(cuts[hi], 4)],
            "quality_vs_all_large": [round(rels[lo], 4), round(rels[hi], 4)]}


# -- the overhead variant ---------------------------------------------------------------------------------


def run_overhead(rounds: int, model_dir: Path | None, quick: bool) -> dict:
    import bench_overhead as bo
    import bench_proxy_core as core
    from targets import Target

    auto = bo.BODY.replace(b'"model":"llama-3.1-8b"', b'"model":"auto"')
    assert auto != bo.BODY
    bo.BODY = auto
    bo.STREAM_BODY = auto[:-1] + b',"stream":true}'
    cfg = dict(core.QUICK if quick else core.FULL)
    cfg["rounds"] = rounds
    replicas, rurls = [], []
    for _ in TIERS:  # one fake replica per tier (a replica belongs to one tier)
        rp, url = bo.start_replica()
        replicas.append(rp)
        rurls.append(url)
    rurl = rurls[0]
    work = Path(tempfile.mkdtemp(prefix="bench-tiers-overhead-"))
    base = {"listen": {"host": "127.0.0.1", "port": 0},
            "tiers": [{"name": "small", "model": "llama-3.1-8b", "replicas": [rurl]}]}
    three = {**base, "tiers": [{"name": t, "model": "llama-3.1-8b", "replicas": [u]} for t, u in zip(TIERS, rurls)]}
    variants = {"prefixlb": base,
                "prefixlb+rules": {**three, "tier_routing": {"rules": RULES}}}
    if model_dir is not None:
        clf = {"rules": RULES, "classifier": {"model": str(model_dir)}}
        variants["prefixlb+classifier-only"] = {**three, "tier_routing": {"classifier": {"model": str(model_dir)}}}
        variants["prefixlb+classifier"] = {**three, "tier_routing": clf}
        variants["prefixlb+classifier+log"] = {**three, "tier_routing": {
            **clf, "decision_log": {"path": str(work / "c.jsonl")}}}
    probe = ("/v1/chat/completions", auto)
    targets = {}
    load_before = os.getloadavg()
    try:
        for name, doc in variants.items():
            p = work / f"{name}.yaml"
            p.write_text(yaml.safe_dump(doc))
            targets[name] = Target(name, [sys.executable, "-m", "prefixlb", "serve", "--config", str(p),
                                          "--log-level", "warning"], None, probe=probe)
        # the throughput half of the overhead target: at least sglang-router's, in the same run
        peer, skipped = bo.start_targets(rurl, ["sglang-router"])
        targets.update(peer)
        for name, why in skipped.items():
            print(f"{name} skipped: {why}", file=sys.stderr)
        urls = {"direct": rurl, **{n: t.url for n, t in targets.items()}}
        names = list(urls)
        res = []
        for i in range(rounds):
            order = names[i % len(names):] + names[: i % len(names)]
            res.append(asyncio.run(bo.one_round(urls, targets, order, cfg)))
            print(f"overhead round {i + 1}/{rounds} done", file=sys.stderr)
    finally:
        for t in targets.values():
            t.stop()
        for rp in replicas:
            rp.stdin.close()  # type: ignore[union-attr]
            rp.wait(5)
        shutil.rmtree(work, ignore_errors=True)
    return {"rounds": rounds, "summary": bo.summarize(res, names), "config": cfg,
            "loadavg_1m": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]}


# -- report -------------------------------------------------------------------------------------------------


def _ci(c: dict) -> str:
    ci = c.get("ci90")
    if not ci:
        return "–"
    a, b = ci["cost_cut"]
    x, y = ci["quality_vs_all_large"]
    return f"{100 * a:.1f}–{100 * b:.1f}% / {100 * x:.1f}–{100 * y:.1f}%"


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = ["## bench_tiers: tier routing on an emulated three-tier fleet", "",
             f"`{r['command']}` — {m['date']}, {m['cpu']} ({m['cores']} cores), Python {m['python']}; "
             f"{r['train_prompts']} train prompts (labels, thresholds), {r['eval_prompts']} eval prompts (below), "
             f"max_tokens {MAX_TOKENS}, seed {r['seed']}.", "",
             "Tiers: small = Llama 3.2 3B skill 0.634 at $0.06/Mtok, medium = Llama 3.1 8B 0.694 at $0.18, "
             "large = Llama 3.3 70B 0.836 at $0.88 (input = output). Quality = share of answers the emulator's "
             "quality model marks correct; cost = every attempt's usage tokens x its tier's price.", ""]
    base = r["configs"]["all-large"]
    lines += ["| configuration | small | medium | large | escalated | cost per 1K req | cost cut | quality | "
              "of all-large | target met | 90% CI: cut / quality ratio |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, c in r["configs"].items():
        cut = 1 - c["cost_per_1k"] / base["cost_per_1k"]
        rel = c["quality"] / base["quality"]
        met = cut >= 0.70 and rel >= 0.95
        mix = c["tier_mix"]
        lines.append(f"| {name} | {100 * mix['small']:.0f}% | {100 * mix['medium']:.0f}% | {100 * mix['large']:.0f}% "
                     f"| {100 * c['escalated']:.0f}% | ${c['cost_per_1k']:.4f} | {100 * cut:.1f}% | "
                     f"{100 * c['quality']:.1f}% | {100 * rel:.1f}% | {'yes' if met else 'no'} | {_ci(c)} |")
    th = r["thresholds"]
    lines += ["", "Chosen on the train prompts only (replaying each policy on every tier's answers), target "
              f"{100 * r['target_quality']:.1f}% of all-large quality there:"]
    if th.get("cascade"):
        lines.append(f"- cascade: per-tier `min_mean_logprob` {th['cascade']['min_mean_logprob']} (replayed cost "
                     f"${1000 * th['cascade']['cost']:.4f}/1K, quality {100 * th['cascade']['quality']:.1f}%)")
    if th.get("classifier"):
        lines.append(f"- classifier alone: its calibrated threshold {th['classifier']['threshold']:.3f} (replayed "
                     f"quality {100 * th['classifier']['quality']:.1f}%)")
    if th.get("classifier+cascade"):
        cc = th["classifier+cascade"]
        lines.append(f"- classifier + cascade: classifier `threshold: {cc['classifier_threshold']}`, cascade "
                     f"per-tier `min_mean_logprob` {cc['min_mean_logprob']} (replayed cost "
                     f"${1000 * cc['cost']:.4f}/1K, quality {100 * cc['quality']:.1f}%)")
    if r.get("classifier_training"):
        lines += ["", f"Classifier: `{r['classifier_training']['command']}` "
                      f"({r['classifier_training']['seconds']} s); held-out: {r['classifier_training']['summary']}"]
    lines += ["", "Cross-check, `prefixlb report --log <decision log>` per configuration (cost per 1K / cut vs "
              "all-largest / quality from the posted feedback labels):", ""]
    for name, c in r["configs"].items():
        rep = c.get("report") or {}
        if "cost_per_1k" in rep:
            lines.append(f"- {name}: ${rep['cost_per_1k']:.4f} per 1K, cut {100 * (rep['cost_cut'] or 0):.1f}%, "
                         f"quality {100 * (rep['quality'] or 0):.1f}% ({rep['labelled']} labels)")
    if r.get("overhead"):
        s = r["overhead"]["summary"]
        la = r["overhead"].get("loadavg_1m")
        lines += ["", f"Overhead (`{r['overhead'].get('command', '')}`: bench_overhead's fake replica and client, "
                      f"`model: auto`, {r['overhead']['rounds']} rounds, medians; added = target minus direct"
                      + (f"; 1-minute load average {la[0]} before, {la[1]} after, on 2 vCPUs" if la else "") + "). "
                      "prefixlb+rules: the benchmark's four rules; prefixlb+classifier-only: the trained classifier "
                      "deciding every request, no rules; prefixlb+classifier: the four rules, then the classifier "
                      "for every request they pass (here all: the probe matches none); "
                      "+log: with the decision log on as well (off by default):", "",
                  "| target | added p50 ms (chat c=1) | added p99 ms | req/s chat c=32 | CPU µs/req chat |",
                  "|---|---|---|---|---|"]
        for name, v in s.items():
            if name == "direct":
                continue
            lines.append(f"| {name} | +{v['chat_c1_p50_added']:.3f} | +{v['chat_c1_p99_added']:.3f} | "
                         f"{v['chat_c32_rps']:.0f} | {v['chat_c32_cpu_us_per_req']:.0f} |")
        for name in ("prefixlb+classifier-only", "prefixlb+classifier"):
            c = s.get(name)
            if not c:
                continue
            lines += ["", f"Overhead target with the classifier on (issue 4's target, issue 6's condition), {name}:",
                      f"- added p50 <= 0.25 ms: {c['chat_c1_p50_added']:.3f} ms — "
                      f"{'met' if c['chat_c1_p50_added'] <= 0.25 else 'not met'}",
                      f"- added p99 <= 1 ms: {c['chat_c1_p99_added']:.3f} ms — "
                      f"{'met' if c['chat_c1_p99_added'] <= 1.0 else 'not met'}"]
            g = s.get("sglang-router")
            if g:
                lines.append(f"- chat c=32 throughput >= sglang-router's: {c['chat_c32_rps']:.0f} vs "
                             f"{g['chat_c32_rps']:.0f} req/s — {'met' if c['chat_c32_rps'] >= g['chat_c32_rps'] else 'not met'}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--role", choices=["fleet"], help=argparse.SUPPRESS)
    ap.add_argument("--time-scale", type=float, default=200.0, help="emulated seconds per wall second (default 200)")
    ap.add_argument("--train", type=int, default=1500, help="train prompts (labels, thresholds); default 1500")
    ap.add_argument("--eval", type=int, default=2000, help="eval prompts per configuration; default 2000")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target-quality", type=float, default=0.96,
                    help="thresholds are chosen for this share of all-large quality on the train prompts")
    ap.add_argument("--quick", action="store_true", help="small sets (smoke run)")
    ap.add_argument("--overhead", action="store_true", help="measure the added latency with tier routing on")
    ap.add_argument("--rounds", type=int, default=3, help="--overhead rounds (default 3)")
    ap.add_argument("--model", type=Path, default=None, help="a trained router to use instead of training one")
    ap.add_argument("--json", type=Path, default=RESULTS / "bench_tiers.json")
    ap.add_argument("--markdown", type=Path, default=RESULTS / "bench_tiers.md")
    args = ap.parse_args(argv)
    if args.role == "fleet":
        return role_fleet(args.time_scale)
    from bench_index import machine

    command = " ".join(["python"] + [Path(sys.argv[0]).as_posix()] + sys.argv[1:])
    if args.quick:
        args.train, args.eval = min(args.train, 300), min(args.eval, 150)
    if args.overhead:
        result = json.loads(args.json.read_text()) if args.json.exists() else {}
        work = Path(tempfile.mkdtemp(prefix="bench-tiers-"))
        try:
            model_dir = args.model
            if model_dir is None:  # a router trained as the main run trains it, on a smaller set
                fleet = Fleet(args.time_scale)
                try:
                    rows = asyncio.run(collect(fleet, workload(min(args.train, 600), args.seed), args.concurrency))
                finally:
                    fleet.stop()
                model_dir, _ = train_classifier(rows, work / "router", args.seed)
            result["overhead"] = run_overhead(args.rounds, model_dir, args.quick)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        result["overhead"]["command"] = command
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        if "configs" in result:
            args.markdown.write_text(markdown(result))
        print(json.dumps({k: {m: round(v[m], 3) for m in ("chat_c1_p50_added", "chat_c1_p99_added")}
                          for k, v in result["overhead"]["summary"].items() if k != "direct"}, indent=2))
        return 0
    train = workload(args.train, args.seed)
    evals = workload(args.train + args.eval, args.seed)[args.train:]  # same generator, disjoint prompts
    assert not {p for _, p in train} & {p for _, p in evals}
    work = Path(tempfile.mkdtemp(prefix="bench-tiers-"))
    fleet = Fleet(args.time_scale)
    try:
        t0 = time.monotonic()
        rows = asyncio.run(collect(fleet, train, args.concurrency))
        print(f"collected {len(rows)} x {len(TIERS)} labelled answers in {time.monotonic() - t0:.0f} s",
              file=sys.stderr)
        training = None
        if args.model is not None:
            model_dir = args.model
        else:
            model_dir, training = train_classifier(rows, work / "router", args.seed)
            print(f"trained the classifier in {training['seconds']} s", file=sys.stderr)
        from prefixlb.routing.classifier import TierClassifier

        clf = TierClassifier.load(model_dir)
        th = choose_thresholds(rows, clf, args.target_quality)
        print(f"thresholds: {json.dumps(th)}", file=sys.stderr)
        configs = {}
        for name in CONFIGS:
            t0 = time.monotonic()
            configs[name] = run_config(name, fleet, model_dir, th, evals, work, args.concurrency)
            c = configs[name]
            print(f"{name}: quality {c['quality']:.3f}, ${c['cost_per_1k']:.4f}/1K, mix {c['tier_mix']} "
                  f"({time.monotonic() - t0:.0f} s)", file=sys.stderr)
    finally:
        fleet.stop()
        shutil.rmtree(work, ignore_errors=True)
    base = configs["all-large"]
    checks = []
    for name, c in configs.items():
        if name == "all-large":
            continue
        cut = 1 - c["cost_per_1k"] / base["cost_per_1k"]
        rel = c["quality"] / base["quality"]
        ci = bootstrap(base["per_request"], c["per_request"], args.seed)
        c["ci90"] = ci
        checks.append({"configuration": name, "cost_cut": round(cut, 4), "quality_vs_all_large": round(rel, 4),
                       "ok": cut >= 0.70 and rel >= 0.95, "ci90": ci})
    for c in configs.values():
        c.pop("per_request")
    result = {"benchmark": "bench_tiers", "command": command, "machine": machine(), "seed": args.seed,
              "train_prompts": len(train), "eval_prompts": len(evals), "max_tokens": MAX_TOKENS,
              "time_scale": args.time_scale, "prices_per_mtok": PRICES, "skills": {"small": SKILL_3B,
                                                                                     "medium": 0.694, "large": 0.836},
              "target_quality": args.target_quality, "thresholds": th, "classifier_training": training,
              "train_set_by_tier": {t: sum(r["tiers"][t]["correct"] for r in rows) / len(rows) for t in TIERS},
              "configs": configs, "targets_check": checks}
    if args.json.exists():
        old = json.loads(args.json.read_text())
        if "overhead" in old:
            result["overhead"] = old["overhead"]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    args.markdown.write_text(md)
    print(md)
    return 0 if any(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
