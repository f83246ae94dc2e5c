"""Featurization of one prompt: WordPiece ids for the static embedding, plus cheap request
features that predict how hard a prompt is for a weaker model (length, numbers, the shape of a
multiple-choice question, negations, ...). Pure Python; a few microseconds per prompt.

Only the prompt text is used: a source or subject field in the training data never reaches
these features (it may only serve as a training target, see ``train.py``).
"""

from __future__ import annotations

import math
import re

from .tokenize import WordPiece

__all__ = ["FEATURE_NAMES", "TEXT_CAP", "Featurizer", "request_features"]

#: characters of the prompt that are tokenized for the embedding (bounds the cost of long prompts)
TEXT_CAP = 2000

FEATURE_NAMES = (
    "log_chars",
    "log_words",
    "digit_fraction",
    "log_numbers",
    "log_longest_number",
    "multiple_choice",
    "log_question_chars",
    "log_options_chars",
    "statement_pair",
    "log_math_symbols",
    "log_question_marks",
    "log_newlines",
    "log_distinct_numbers",
    "log_mean_option_chars",
    "log_option_length_spread",
    "numeric_option_fraction",
    "negated_question",
    "all_none_of_the_above",
    "log_question_sentences",
    "percent_in_question",
    "dollar_in_question",
    "log_numbers_in_question",
)

_MATH = frozenset("+-*/=^$%<>")
_NEG = re.compile(r"\b(?:not|except|least|false|incorrect)\b")
_DIGITS = re.compile(r"\d+")
_ABOVE = ("all of the above", "none of the above", "both of the above", "all of the following",
          "none of the following", "both of the following")
_OPTION_MARKS = ("\nA. ", "\nB. ", "\nC. ", "\nD. ")


def _is_number_option(s: str) -> bool:
    digits = sum(ch.isdigit() for ch in s)
    return digits > 0 and digits * 2 >= len(s.strip())


def request_features(prompt: str, words: list[str]) -> list[float]:
    """The :data:`FEATURE_NAMES` values of ``prompt`` (``words``: its basic tokens)."""
    log = math.log1p
    n = len(prompt)
    a = prompt.find(_OPTION_MARKS[0])
    mc = a >= 0 and prompt.rstrip().endswith("Answer:") and all(m in prompt[a:] for m in _OPTION_MARKS[1:])
    if mc:
        q = prompt[:a]
        rest = prompt[a:]
        cuts = [rest.find(m) for m in _OPTION_MARKS] + [rest.rfind("\nAnswer:")]
        opts = [rest[cuts[i] + 4 : cuts[i + 1]] for i in range(4) if 0 <= cuts[i] < cuts[i + 1]]
    else:
        q, rest, opts = prompt, "", []
    nums = [w for w in words if w.isdigit()]
    ol = [len(o) for o in opts]
    pl = prompt.lower()
    ql = pl[: len(q)]
    sentences = ql.count(". ") + ql.count("? ") + ql.count("! ") + (1 if ql.rstrip()[-1:] in (".", "?", "!") else 0)
    return [
        log(n),
        log(len(words)),
        sum(len(w) for w in nums) / max(1, n),
        log(len(nums)),
        log(max((len(w) for w in nums), default=0)),
        1.0 if mc else 0.0,
        log(len(q)),
        log(len(rest)),
        1.0 if "Statement 1" in prompt else 0.0,
        log(sum(1 for w in words if w in _MATH)),
        log(prompt.count("?")),
        log(prompt.count("\n")),
        log(len(set(nums))),
        log(sum(ol) / len(ol)) if ol else 0.0,
        log(max(ol) - min(ol)) if ol else 0.0,
        sum(1 for o in opts if _is_number_option(o)) / 4.0,
        1.0 if _NEG.search(ql) else 0.0,
        1.0 if any(s in pl for s in _ABOVE) else 0.0,
        log(sentences),
        1.0 if "%" in q else 0.0,
        1.0 if "$" in q else 0.0,
        log(len(set(_DIGITS.findall(q)))) if mc else log(len(set(nums))),
    ]


class Featurizer:
    """Prompt → (WordPiece ids of its first :data:`TEXT_CAP` characters, request features)."""

    def __init__(self, tokenizer: WordPiece, text_cap: int = TEXT_CAP):
        self.tokenizer = tokenizer
        self.text_cap = text_cap

    def __call__(self, prompt: str) -> tuple[list[int], list[float]]:
        words = WordPiece.words(prompt[: self.text_cap])
        return self.tokenizer.encode_words(words), request_features(prompt, words)
