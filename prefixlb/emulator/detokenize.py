"""Incremental detokenization with stop strings, as vLLM's output processor does it.

Each new token's text is the growth of ``decode(ids[prefix:])`` over ``decode(ids[prefix:read])``
(vLLM's prefix/read offsets), so a multi-byte character split across tokens is held back until
it is complete (and dropped if the output ends first), and the cost per token stays constant.
With stop strings, text that could still be the start of a stop string is held back from
streaming (as vLLM does), and the first match ends the output: the text is cut before the stop
string (or after it, with ``include_stop_str_in_output``).
"""

from __future__ import annotations

from collections.abc import Sequence

from prefixlb.engine import Tokenizer

__all__ = ["IncrementalText"]

_REPLACEMENT = "\ufffd"


class IncrementalText:
    """Text of one request's output, fed token ids as they arrive."""

    __slots__ = (
        "_hold",
        "_ids",
        "_include_stop",
        "_prefix",
        "_read",
        "_skip_special",
        "_stops",
        "_tok",
        "emitted",
        "stop_reason",
        "text",
    )

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self._skip_special = skip_special_tokens
        self._stops = list(stop)
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._include_stop = include_stop_str_in_output
        self.text = ""  # everything decoded so far (cut at a stop string once one matched)
        self.emitted = 0  # characters of ``text`` already handed out as deltas
        self.stop_reason: str | None = None

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip_special)

    def add(self, token_ids: Sequence[int], final: bool = False) -> str:
        """Feed new token ids; returns the text that may be emitted now.

        ``final`` releases text held back for stop strings. A multi-byte character left
        incomplete by the last token is dropped, as vLLM's detokenizer does. After a stop
        string matched, :attr:`stop_reason` is set and further tokens are ignored.
        """
        if self.stop_reason is None:
            for t in token_ids:
                self._ids.append(t)
                prefix_text = self._decode(self._ids[self._prefix : self._read])
                new_text = self._decode(self._ids[self._prefix :])
                if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
                    self.text += new_text[len(prefix_text) :]
                    self._prefix = self._read
                    self._read = len(self._ids)
                if self._stops and self._check_stop():
                    break
        limit = len(self.text)
        if self._stops and self.stop_reason is None and not final:
            limit = max(self.emitted, limit - self._hold)
        delta = self.text[self.emitted : limit]
        self.emitted = limit
        return delta

    def _check_stop(self) -> bool:
        # only the tail that could contain a new match needs scanning
        start = max(0, self.emitted - self._hold)
        best: tuple[int, str] | None = None
        for s in self._stops:
            i = self.text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return False
        i, s = best
        self.text = self.text[: i + len(s)] if self._include_stop else self.text[:i]
        self.stop_reason = s
        return True
