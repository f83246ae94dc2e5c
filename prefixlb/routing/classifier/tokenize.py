"""WordPiece tokenization in plain Python, fast enough for the request path.

MiniLM's uncased WordPiece vocabulary (``vocab.txt``), with BERT's basic tokenization
simplified: lowercase, accents stripped, words are runs of letters/digits and every other
non-space character is a token of its own; each word is then split greedily into the longest
vocabulary pieces (``##`` marks a continuation). Whole-word vocabulary entries are looked up
in one dict hit, and other words are split once and remembered in a bounded cache, so a typical
prompt costs a regex pass plus a dict lookup per word. Training and inference use this same
code, so any difference from the reference tokenizer cannot skew the model.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

__all__ = ["WordPiece"]

_WORD = re.compile(r"[^\W_]+|\S")
# CJK ideographs are one token each in BERT's basic tokenizer.
_CJK = re.compile(r"([\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f])")
_MAX_WORD = 100
_CACHE_LIMIT = 200_000


class WordPiece:
    """``encode(text) -> list[int]`` over a WordPiece vocabulary (no special tokens added)."""

    def __init__(self, vocab: Sequence[str], unk: str = "[UNK]"):
        self.vocab = list(vocab)
        self._ids = {tok: i for i, tok in enumerate(self.vocab)}
        if unk not in self._ids:
            raise ValueError(f"vocabulary has no {unk!r} token")
        self.unk_id = self._ids[unk]
        self._base = {tok: (i,) for tok, i in self._ids.items() if not tok.startswith("##")}
        self._cache: dict[str, tuple[int, ...]] = {}

    @classmethod
    def from_file(cls, path) -> WordPiece:
        with open(path, encoding="utf-8") as f:
            return cls([line.rstrip("\n") for line in f])

    def token_id(self, tok: str) -> int:
        return self._ids[tok]

    def __len__(self) -> int:
        return len(self.vocab)

    @staticmethod
    def words(text: str) -> list[str]:
        """Basic tokenization: lowercase, strip accents, split words and single symbols."""
        text = text.lower()
        if not text.isascii():
            text = unicodedata.normalize("NFD", text)
            text = "".join(c for c in text if unicodedata.category(c) not in ("Mn", "Cc", "Cf"))
            text = _CJK.sub(r" \1 ", text)
        return _WORD.findall(text)

    def _split(self, word: str) -> tuple[int, ...]:
        if len(word) > _MAX_WORD:
            return (self.unk_id,)
        ids = self._ids
        out: list[int] = []
        start, n = 0, len(word)
        while start < n:
            end = n
            found = None
            while start < end:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                found = ids.get(piece)
                if found is not None:
                    break
                end -= 1
            if found is None:
                return (self.unk_id,)
            out.append(found)
            start = end
        return tuple(out)

    def encode_words(self, words: Sequence[str]) -> list[int]:
        base = self._base.get
        cache = self._cache
        out: list[int] = []
        for w in words:
            t = base(w) or cache.get(w)
            if t is None:
                t = self._split(w)
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                cache[w] = t
            out.extend(t)
        return out

    def encode(self, text: str) -> list[int]:
        return self.encode_words(self.words(text))
