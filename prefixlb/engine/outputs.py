"""What the engine hands back: per-request outputs and one result per step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .events import KVEvent
from .timing import StepComposition

if TYPE_CHECKING:
    from .quality import QualityOutcome

__all__ = ["FinishReason", "RequestOutput", "RequestTimes", "StepResult", "TokenLogprob"]

#: vLLM's ``finished_reason`` label values the engine produces.
FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """Log-probability of one generated token and the top candidates at its position.

    ``top`` holds up to ``logprobs`` ``(token_id, logprob)`` pairs, most likely first; the
    sampled token is among them only if it ranks that high.
    """

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class RequestTimes:
    """Engine-clock timestamps of a request (None until reached)."""

    arrival: float
    first_scheduled: float | None
    first_token: float | None
    finished: float | None


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """New tokens of one request from one step (or its end, on abort)."""

    request_id: str
    new_token_ids: list[int]
    first_token: bool  # these include the request's first output token
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int  # total so far, including these
    num_cached_tokens: int  # prefix-cache hit when first scheduled (0 if never scheduled)
    num_preemptions: int
    times: RequestTimes
    logprobs: list[TokenLogprob] | None = None  # one per new token, when the request asked
    quality: QualityOutcome | None = None  # on the finishing output, when the engine grades


@dataclass(frozen=True, slots=True)
class StepResult:
    """One engine step, planned at ``start``; outputs and events take effect at ``end``."""

    start: float
    duration: float
    composition: StepComposition
    scheduled: dict[str, int]  # request id -> tokens computed in this step
    outputs: list[RequestOutput]
    events: list[KVEvent]  # one KV event batch (may be empty)
    preempted: list[str]

    @property
    def end(self) -> float:
        return self.start + self.duration

    @property
    def num_prefill_tokens(self) -> int:
        return self.composition.prefill_tokens

    @property
    def num_decode_seqs(self) -> int:
        return self.composition.decode_seqs
