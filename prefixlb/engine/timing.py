"""Step-time model: how long one forward pass takes, from the step's composition alone.

    duration = base
             + prefill_tokens / prefill_tokens_per_s      (weights x tokens: compute-bound)
             + decode_seqs   * decode_seq_s               (per decoding sequence: MLP + sampling)
             + context_tokens * context_token_s           (KV read: every scheduled sequence
                                                           reads its whole context once)
             + attention_pairs * attention_pair_s         (attention FLOPs: query x key pairs)

``base`` is the fixed cost of a step (reading the weights once, launch and scheduler overhead).
``context_tokens`` sums, over the step's sequences, the tokens in their KV after the step;
``attention_pairs`` sums, over the new tokens, the context each one attends to (causal), so a
prefill of n tokens on c cached ones adds ``n*c + n*(n+1)/2``, a decode adds its context length,
and a prompt costs the same pairs whether or not it is chunked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = ["StepComposition", "StepCosts", "chunk_pairs", "step_duration", "step_seconds"]


class StepCosts(Protocol):
    """The coefficients :func:`step_duration` reads (a :class:`~prefixlb.engine.profiles.Profile`)."""

    @property
    def step_base_s(self) -> float: ...
    @property
    def prefill_tokens_per_s(self) -> float: ...
    @property
    def decode_seq_s(self) -> float: ...
    @property
    def context_token_s(self) -> float: ...
    @property
    def attention_pair_s(self) -> float: ...


@dataclass(frozen=True, slots=True)
class StepComposition:
    """What one step computes."""

    prefill_tokens: int = 0
    decode_seqs: int = 0
    context_tokens: int = 0
    attention_pairs: int = 0

    @property
    def num_tokens(self) -> int:
        """Tokens scheduled in the step (vLLM's ``iteration_tokens``)."""
        return self.prefill_tokens + self.decode_seqs


def chunk_pairs(num_new: int, num_computed: int) -> int:
    """Causal query x key pairs of ``num_new`` tokens appended after ``num_computed``."""
    return num_new * num_computed + num_new * (num_new + 1) // 2


def step_duration(costs: StepCosts, comp: StepComposition) -> float:
    """Seconds one step of composition ``comp`` takes; 0 for an empty step."""
    return step_seconds(costs, comp.prefill_tokens, comp.decode_seqs, comp.context_tokens, comp.attention_pairs)


def step_seconds(costs: StepCosts, prefill_tokens: int, decode_seqs: int, context_tokens: int,
                 attention_pairs: int) -> float:
    """:func:`step_duration` of a composition given as its four numbers (no object built)."""
    if prefill_tokens == 0 and decode_seqs == 0:
        return 0.0
    return (
        costs.step_base_s
        + prefill_tokens / costs.prefill_tokens_per_s
        + decode_seqs * costs.decode_seq_s
        + context_tokens * costs.context_token_s
        + attention_pairs * costs.attention_pair_s
    )
