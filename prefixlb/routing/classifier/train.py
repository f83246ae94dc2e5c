"""Training the tier classifier (torch; the ``classifier`` extra). Deterministic in the seed.

Pipeline (each step chosen on inner validation folds; the variants tried are in README.md):

1. **Split.** A stratified held-out split (``holdout``, by prompt hash, never used for
   training, model selection or calibration), then a validation split of the rest (used only
   to calibrate thresholds and report validation numbers). Both are recorded in ``split.json``.
2. **Embedding.** A static token table distilled from MiniLM (each vocabulary token's mean
   pooled MiniLM output, cached on disk); a prompt's embedding is the mean of its tokens' rows.
3. **Groups.** A softmax-regression head predicts a prompt's group from the embedding: the
   data's ``subject`` field when every row has one (a training target only, never an input),
   otherwise k-means clusters of the embeddings. Each group gets a smoothed rate of "a dearer
   tier is needed" per ordinal level. Training rows get out-of-fold group probabilities
   (cross-fitting), so the next stage sees them as it will at inference.
4. **Ordinal head.** A one-hidden-layer MLP over [expected group rates, request features]
   predicts, for each level k, the soft label "the best tier above k beats tier k" (1 when it
   wins, 0 when it loses, 1/2 when they tie) — with two tiers, P(strong beats weak). Ranking by
   it ranks by expected quality gain, which is what APGR rewards; ``label="needed"`` trains on
   the strict "tier k wrong and a dearer tier right" instead.
5. **Folding.** The group head's weights are multiplied into the static table, so inference
   averages G-wide rows and runs in numpy (``model.py``).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .data import Dataset, load_jsonl, prompt_hash, stratified_split
from .features import FEATURE_NAMES, TEXT_CAP, Featurizer
from .tokenize import WordPiece

__all__ = ["TrainConfig", "default_prices", "soft_labels", "train"]


def _torch():
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise RuntimeError(
            "training the tier classifier needs torch: pip install 'prefixlb[classifier]' "
            "(or pip install torch==2.13.0; an unpinned torch pulls a multi-GB CUDA build)"
        ) from exc
    torch.set_num_threads(int(os.environ.get("PREFIXLB_TORCH_THREADS", "1")))
    return torch


@dataclass
class TrainConfig:
    seed: int = 0
    holdout: float = 0.2
    validation: float = 0.15
    epochs: int = 40  # ordinal head
    group_epochs: int = 30  # group head
    hidden: int = 32
    label: str = "win"  # win | needed
    groups: str = "auto"  # auto | subject | kmeans
    clusters: int = 0  # k-means groups; 0 = one per ~60 training prompts, at most 128
    crossfit: int = 5
    smoothing: float = 10.0
    vocab: str = "full"  # full | corpus (distil only tokens seen in the data: fast, for tests)
    prices: list[float] | None = None
    budget: float | None = None  # default threshold: this call fraction; None = 95% of strongest quality
    budgets: list[float] = field(default_factory=lambda: [round(0.05 * i, 2) for i in range(1, 20)])

    def check(self) -> None:
        if self.label not in ("win", "needed"):
            raise ValueError(f"label: {self.label!r} (choose win or needed)")
        if self.groups not in ("auto", "subject", "kmeans"):
            raise ValueError(f"groups: {self.groups!r} (choose auto, subject or kmeans)")
        if self.vocab not in ("full", "corpus"):
            raise ValueError(f"vocab: {self.vocab!r} (choose full or corpus)")
        if not 0 < self.holdout < 1 or not 0 < self.validation < 1:
            raise ValueError("holdout and validation must be fractions in (0, 1)")
        if self.budget is not None and not 0 <= self.budget <= 1:
            raise ValueError("budget must be a call fraction in [0, 1]")


def default_prices(k: int) -> list[float]:
    """Relative tier prices when none are given: 5× per tier (DESIGN.md's small/large: 0.18 vs 0.88)."""
    return [float(5**i) for i in range(k)]


def soft_labels(correct: np.ndarray, label: str) -> np.ndarray:
    """Per-level targets, shape (n, K-1), from per-tier correctness (n, K)."""
    c = correct.astype(np.float64)
    K = c.shape[1]
    out = np.zeros((c.shape[0], K - 1))
    for k in range(K - 1):
        best_above = c[:, k + 1 :].max(axis=1)
        if label == "win":
            out[:, k] = (1.0 + best_above - c[:, k]) / 2.0
        else:
            out[:, k] = (1.0 - c[:, k]) * best_above
    return out


# -- static embedding --------------------------------------------------------------------------


def _cache_dir() -> Path:
    base = os.environ.get("PREFIXLB_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "prefixlb"
    )
    return Path(base)


def static_table(vocab: list[str], tokens: set[int] | None, log=print) -> tuple[np.ndarray, str]:
    """(MiniLM's distilled static table (V, 384), "full" or "corpus"). With ``tokens`` and no
    cached full table, only those rows are distilled and the others get the mean row. The full
    table is cached on disk and used whenever it is there."""
    from . import minilm

    d = minilm.minilm_dir()
    st = (d / "model.safetensors").stat()
    key = hashlib.sha256(f"{st.st_size}:{int(st.st_mtime)}:{len(vocab)}:v1".encode()).hexdigest()[:16]
    path = _cache_dir() / f"minilm-static-{key}.npy"
    if path.exists():
        return np.load(path, allow_pickle=False), "full"
    torch = _torch()
    bert = minilm.load_bert(d)
    cls_id, sep_id = vocab.index("[CLS]"), vocab.index("[SEP]")
    t0 = time.perf_counter()
    if tokens is None:
        log(f"distilling MiniLM's static table over {len(vocab)} tokens (once; cached in {path.parent})")
        table = minilm.distil_static_table(bert, len(vocab), cls_id, sep_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, table)
        os.replace(tmp, path)
    else:
        ids = sorted(tokens)
        rows = []
        with torch.inference_mode():
            for lo in range(0, len(ids), 1024):
                tok = torch.tensor(ids[lo : lo + 1024], dtype=torch.int64)
                x = torch.stack([torch.full_like(tok, cls_id), tok, torch.full_like(tok, sep_id)], dim=1)
                rows.append(bert(x, torch.ones_like(x)).mean(1).numpy())
        part = np.concatenate(rows).astype(np.float32)
        table = np.tile(part.mean(0), (len(vocab), 1)).astype(np.float32)
        table[ids] = part
    log(f"static table ready in {time.perf_counter() - t0:.1f}s")
    return table, "full" if tokens is None else "corpus"


def _embed(table: np.ndarray, ids: list[list[int]]) -> np.ndarray:
    out = np.zeros((len(ids), table.shape[1]), dtype=np.float64)
    for i, x in enumerate(ids):
        if x:
            out[i] = table[x].sum(0, dtype=np.float64) / len(x)
    return out


# -- groups ------------------------------------------------------------------------------------


def _kmeans(Z: np.ndarray, k: int, seed: int, iters: int = 30) -> np.ndarray:
    rng = np.random.default_rng(seed)
    C = Z[rng.choice(len(Z), size=k, replace=False)].copy()
    a = np.zeros(len(Z), dtype=np.int64)
    for _ in range(iters):
        d = (Z**2).sum(1)[:, None] - 2 * Z @ C.T + (C**2).sum(1)[None]
        a = d.argmin(1)
        for j in range(k):
            m = a == j
            if m.any():
                C[j] = Z[m].mean(0)
    return a


def _fit_softmax(torch, X: np.ndarray, y: np.ndarray, G: int, epochs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression (input dropout, AdamW); returns (W (G, D), b (G,))."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    xt = torch.tensor(X, dtype=torch.float32)
    yt = torch.tensor(y, dtype=torch.int64)
    lin = torch.nn.Linear(X.shape[1], G)
    drop = torch.nn.Dropout(0.1)
    opt = torch.optim.AdamW(lin.parameters(), lr=3e-3, weight_decay=1e-2)
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for b in range(0, len(xt), 256):
            j = perm[b : b + 256]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(lin(drop(xt[j])), yt[j])
            loss.backward()
            opt.step()
    return lin.weight.detach().double().numpy(), lin.bias.detach().double().numpy()


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _fit_head(torch, Z: np.ndarray, Y: np.ndarray, hidden: int, epochs: int, seed: int) -> dict[str, np.ndarray]:
    """One-hidden-layer MLP, K-1 sigmoid outputs, BCE on soft targets. Z is standardised."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    xt = torch.tensor(Z, dtype=torch.float32)
    yt = torch.tensor(Y, dtype=torch.float32)
    l1 = torch.nn.Linear(Z.shape[1], hidden)
    l2 = torch.nn.Linear(hidden, Y.shape[1])
    net = torch.nn.Sequential(torch.nn.Dropout(0.1), l1, torch.nn.ReLU(), torch.nn.Dropout(0.2), l2)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-2)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for b in range(0, len(xt), 256):
            j = perm[b : b + 256]
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(xt[j]), yt[j])
            loss.backward()
            opt.step()
    d = lambda t: t.detach().double().numpy()  # noqa: E731
    return {"w1": d(l1.weight), "b1": d(l1.bias), "w2": d(l2.weight), "b2": d(l2.bias)}


# -- the whole run -----------------------------------------------------------------------------


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def train(data: str | Path | Dataset, out: str | Path, cfg: TrainConfig | None = None,
          tiers: list[str] | None = None, log=print) -> dict:
    """Train on ``data``, write the model directory ``out``, evaluate the held-out split there.

    Returns the report (also written to ``out/report.json``).
    """
    from . import minilm
    from .evaluate import evaluate_model, write_report
    from .model import TierClassifier, save_model

    cfg = cfg or TrainConfig()
    cfg.check()
    torch = _torch()
    t_start = time.perf_counter()
    ds = data if isinstance(data, Dataset) else load_jsonl(data, tiers)
    K = len(ds.tiers)
    prices = [float(p) for p in (cfg.prices or default_prices(K))]
    if len(prices) != K:
        raise ValueError(f"prices: {len(prices)} given for {K} tiers {ds.tiers}")
    rest, held = stratified_split(ds, cfg.holdout, cfg.seed)
    sub = ds.subset(rest)
    tr_local, va_local = stratified_split(sub, cfg.validation, cfg.seed + 1)
    tr = [rest[i] for i in tr_local]
    va = [rest[i] for i in va_local]
    if len(tr) < 20 or not va or not held:
        raise ValueError(f"{len(ds)} rows are too few to train, validate and hold out ({len(tr)}/{len(va)}/{len(held)})")
    log(f"{len(ds)} rows, tiers {ds.tiers}: {len(tr)} train, {len(va)} validation, {len(held)} held out (seed {cfg.seed})")

    vocab = WordPiece.from_file(minilm.minilm_dir() / "vocab.txt").vocab
    feat = Featurizer(WordPiece(vocab), TEXT_CAP)
    ids, F = [], []
    for ex in ds.examples:
        i, f = feat(ex.prompt)
        ids.append(i)
        F.append(f)
    F = np.asarray(F, dtype=np.float64)
    tokens = None
    if cfg.vocab == "corpus":
        tokens = {t for i in tr + va for t in ids[i]}
    table, table_kind = static_table(vocab, tokens, log=log)
    E = _embed(table, ids)
    correct = np.array([ex.correct for ex in ds.examples], dtype=np.float64)
    Y = soft_labels(correct, cfg.label)

    # Groups: subject labels when every row has one, else k-means over the training embeddings.
    tr_a = np.asarray(tr)
    mu_e, sd_e = E[tr_a].mean(0), E[tr_a].std(0) + 1e-6
    Es = (E - mu_e) / sd_e
    use_subject = cfg.groups == "subject" or (cfg.groups == "auto" and all(ex.subject for ex in ds.examples))
    if use_subject:
        names = sorted({ds.examples[i].subject for i in tr if ds.examples[i].subject})
        index = {n: j for j, n in enumerate(names)}
        if cfg.groups == "subject" and any(ds.examples[i].subject not in index for i in tr):
            raise ValueError('groups=subject: every training row needs a "subject" field')
        g_tr = np.array([index[ds.examples[i].subject] for i in tr])
        group_source = "subject"
    else:
        k = cfg.clusters or int(min(128, max(2, len(tr) // 60)))
        Zn = Es[tr_a] / (np.linalg.norm(Es[tr_a], axis=1, keepdims=True) + 1e-9)
        g_tr = _kmeans(Zn, k, cfg.seed)
        names = [f"cluster-{j}" for j in range(k)]
        group_source = "kmeans"
    G = len(names)
    log(f"groups: {G} from {group_source}")

    # Group head: out-of-fold probabilities for the training rows, a full fit for everything else.
    rng = np.random.default_rng(cfg.seed)
    fold = np.arange(len(tr)) % cfg.crossfit
    rng.shuffle(fold)
    P_tr = np.zeros((len(tr), G))
    for f in range(cfg.crossfit):
        m = fold == f
        W, b = _fit_softmax(torch, Es[tr_a][~m], g_tr[~m], G, cfg.group_epochs, cfg.seed + 10 + f)
        P_tr[m] = _softmax(Es[tr_a][m] @ W.T + b)
    W_g, b_g = _fit_softmax(torch, Es[tr_a], g_tr, G, cfg.group_epochs, cfg.seed + 10)

    prior = Y[tr_a].mean(0)
    rates = np.zeros((G, K - 1))
    for j in range(G):
        m = g_tr == j
        rates[j] = (Y[tr_a][m].sum(0) + cfg.smoothing * prior) / (m.sum() + cfg.smoothing)

    Z_tr = np.concatenate([P_tr @ rates, F[tr_a]], axis=1)
    mu_z, sd_z = Z_tr.mean(0), Z_tr.std(0) + 1e-6
    head = _fit_head(torch, (Z_tr - mu_z) / sd_z, Y[tr_a], cfg.hidden, cfg.epochs, cfg.seed + 20)

    # Fold the standardisation and the group head into the token table.
    Wn = W_g / sd_e  # (G, D)
    arrays = {
        "group_table": table.astype(np.float64) @ Wn.T,
        "group_bias": b_g - Wn @ mu_e,
        "rates": rates,
        "feat_mean": mu_z,
        "feat_std": sd_z,
        **head,
    }
    out = Path(out)
    config = {
        "tiers": ds.tiers,
        "prices": prices,
        "text_cap": TEXT_CAP,
        "feature_names": list(FEATURE_NAMES),
        "groups": names,
        "group_source": group_source,
        "embedding": {"source": minilm.MINILM_PACKAGE, "kind": "static table distilled from MiniLM, mean of tokens",
                      "vocab": table_kind},
        "train": asdict(cfg),
        "data": {"path": str(ds.path) if ds.path else None,
                 "sha256": _sha256(ds.path) if ds.path and Path(ds.path).exists() else None,
                 "rows": len(ds), "train": len(tr), "validation": len(va), "heldout": len(held)},
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "torch": torch.__version__,
    }
    save_model(out, config, arrays, vocab)
    split = {
        "seed": cfg.seed,
        "holdout_fraction": cfg.holdout,
        "validation_fraction": cfg.validation,
        "hash": "sha256(prompt utf-8)[:16]",
        "heldout": sorted({prompt_hash(ds.examples[i].prompt) for i in held}),
        "validation": sorted({prompt_hash(ds.examples[i].prompt) for i in va}),
        "train": sorted({prompt_hash(ds.examples[i].prompt) for i in tr}),
    }
    (out / "split.json").write_text(json.dumps(split) + "\n")

    # Calibrate thresholds on the validation split with the saved (numpy) model itself.
    clf = TierClassifier.load(out)
    val = evaluate_model(clf, ds.subset(va), prices=prices, latency=False)
    calibration = _calibrate(val["_curve"], cfg)
    config["calibration"] = calibration
    (out / "config.json").write_text(json.dumps({"format": clf.config["format"], "version": clf.config["version"],
                                                 **config}, indent=2) + "\n")
    clf = TierClassifier.load(out)
    heldout = evaluate_model(clf, ds.subset(held), prices=prices, latency=True)
    report = {
        "command": None,
        "heldout": heldout,
        "validation": val,
        "calibration": calibration,
        "train_seconds": round(time.perf_counter() - t_start, 1),
    }
    write_report(out, report, title=f"held-out split of {Path(ds.path).name if ds.path else 'data'}")
    return report


def _calibrate(curve, cfg: TrainConfig) -> dict:
    """Thresholds for call-fraction budgets and for 95% of the strongest tier's quality, on validation."""

    def thr(t: float) -> float:
        return 2.0 if t == float("inf") else float(t)  # 2.0: above any probability (all cheapest)

    budgets = {}
    for b in cfg.budgets:
        pt = next((p for p in curve if p.call_fraction >= b - 1e-12), curve[-1])
        budgets[f"{b:.2f}"] = thr(pt.threshold)
    q95 = 0.95 * curve[-1].quality
    pt95 = next((p for p in curve if p.quality >= q95), curve[-1])
    if cfg.budget is not None:
        pt = next((p for p in curve if p.call_fraction >= cfg.budget - 1e-12), curve[-1])
        default, policy = thr(pt.threshold), f"call fraction {cfg.budget:.2f} on validation"
    else:
        default, policy = thr(pt95.threshold), "95% of the strongest tier's quality on validation"
    return {
        "default_threshold": default,
        "default_policy": policy,
        "quality95_threshold": thr(pt95.threshold),
        "quality95_call_fraction": round(pt95.call_fraction, 6),
        "budgets": budgets,
    }
