"""Helpers for tier-routing tests: three emulated tiers of increasing skill behind a balancer on
127.0.0.1, and a tiny real tier-classifier model. Every server is stopped in ``finally``."""

from __future__ import annotations

import dataclasses
from contextlib import asynccontextmanager

import aiohttp
import orjson

from prefixlb.config import parse_config
from prefixlb.emulator import EmulatedFleet
from prefixlb.server import Balancer

#: small: random weights (skill 0: low confidence, low logprobs); medium/large: Llama 8B / 70B skills
PROFILES = {"small": "cpu-tiny-llama", "medium": "h100-llama3-8b", "large": "h100-llama3-70b-tp4"}
PRICES = {"small": 0.06, "medium": 0.18, "large": 0.88}
TOKEN = "secret-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@asynccontextmanager
async def tiered(tier_routing: dict | None, *, urls: dict[str, list[str]] | None = None, tiers=("small", "medium", "large"),
                 tier_extra: dict[str, dict] | None = None, **changes):
    """A balancer over emulated tiers (``urls`` replaces a tier's replicas, e.g. a scripted one)."""
    fleets = []
    urls = dict(urls or {})
    try:
        for name in tiers:
            if name not in urls:
                f = EmulatedFleet(1, profile=PROFILES[name], model=f"m-{name}", expose_quality=True, time_scale=50)
                await f.start()
                fleets.append(f)
                urls[name] = f.urls
        raw = {"listen": {"port": 0}, "admin": {"token": TOKEN},
               "tiers": [{"name": n, "model": f"m-{n}", "replicas": urls[n],
                          "price": {"input_per_mtok": PRICES[n], "output_per_mtok": PRICES[n]},
                          **(tier_extra or {}).get(n, {})} for n in tiers]}
        if tier_routing is not None:
            raw["tier_routing"] = tier_routing
        cfg = dataclasses.replace(parse_config(raw), **{"health_interval_s": 0.1, "scrape_interval_s": 0.2,
                                                         "first_byte_timeout_s": 10.0, **changes})
        b = Balancer(cfg)
        await b.start()
        try:
            yield b, f"http://127.0.0.1:{b.port}"
        finally:
            await b.stop()
    finally:
        for f in fleets:
            await f.stop()


def chat(content: str, model: str = "auto", max_tokens: int = 16, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **extra}


async def call(s: aiohttp.ClientSession, base: str, body: dict, headers: dict | None = None,
               path: str = "/v1/chat/completions"):
    """(status, headers, raw body) of one request through the balancer."""
    async with s.post(base + path, data=orjson.dumps(body),
                      headers={"content-type": "application/json", **(headers or {})}) as r:
        return r.status, r.headers, await r.read()


async def metric_lines(s: aiohttp.ClientSession, base: str, prefix: str) -> dict[str, float]:
    async with s.get(base + "/metrics") as r:
        text = await r.text()
    out = {}
    for line in text.splitlines():
        if line.startswith(prefix) and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def keyword_model(directory, tiers=("small", "medium", "large"), hard_word: str = "difficult",
                  threshold: float = 0.5):
    """A real TierClassifier model directory whose weights send prompts containing ``hard_word``
    to the largest tier and everything else to the cheapest (scores ~0.99 vs ~0.01)."""
    import numpy as np

    from prefixlb.routing.classifier.features import FEATURE_NAMES
    from prefixlb.routing.classifier.model import save_model

    vocab = ["[PAD]", "[UNK]", hard_word, "the", "a", "is", "what"]
    K, G, F, H = len(tiers), 2, len(FEATURE_NAMES), 4
    table = np.zeros((len(vocab), G), np.float32)
    table[2, 1] = 200.0  # the hard word pulls the prompt into group 1 even averaged over many tokens
    rates = np.zeros((G, K - 1), np.float32)
    rates[1, :] = 1.0
    mean = np.zeros(K - 1 + F, np.float32)
    std = np.ones(K - 1 + F, np.float32)
    w1 = np.zeros((H, K - 1 + F), np.float32)
    w1[0, 0] = 1.0
    w2 = np.full((K - 1, H), 0.0, np.float32)
    w2[:, 0] = 10.0
    b2 = np.full(K - 1, -5.0, np.float32)
    cfg = {"tiers": list(tiers), "prices": [1.0, 5.0, 25.0][: K], "feature_names": list(FEATURE_NAMES),
           "calibration": {"default_threshold": threshold}, "text_cap": 2000}
    save_model(directory, cfg, {"group_table": table, "group_bias": np.array([5.0, 0.0], np.float32), "rates": rates,
                                "feat_mean": mean, "feat_std": std, "w1": w1, "b1": np.zeros(H, np.float32),
                                "w2": w2, "b2": b2}, vocab)
    return str(directory)
