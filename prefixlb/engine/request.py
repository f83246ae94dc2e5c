"""A request as the engine receives it, and the engine's per-request state."""

from __future__ import annotations

import random
from collections.abc import Callable, MutableSequence, Sequence
from dataclasses import dataclass
from enum import Enum

from .hashing import BlockHash, ExtraKeys
from .quality import QualityOutcome

__all__ = ["EngineRequest", "RequestState", "Status"]


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """One generation request, already tokenized.

    ``max_tokens=None`` means up to ``max_model_len``. ``logprobs=None`` asks for no logprobs,
    ``0`` for the sampled token's only, ``k`` for the top k as well. ``difficulty`` feeds the
    quality model (None: derived from the token ids). ``seed`` fixes the generated tokens
    (None: they follow from the prompt). ``output_token_ids`` scripts the tokens the model
    samples, in order (replaying a recorded trace, so decode-filled blocks hash as they did);
    once they run out, generation continues as usual.
    """

    request_id: str
    prompt_token_ids: Sequence[int]
    max_tokens: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    cache_salt: str | None = None
    lora_name: str | None = None
    lora_path: str | None = None
    difficulty: float | None = None
    output_token_ids: Sequence[int] | None = None


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # back in the waiting queue after losing its blocks
    FINISHED = "finished"


class RequestState:
    """Mutable engine-side state of one request (what the scheduler and cache read)."""

    __slots__ = (
        "req",
        "request_id",
        "all_token_ids",
        "num_prompt_tokens",
        "num_computed_tokens",
        "block_hashes",
        "status",
        "max_tokens",
        "natural_len",
        "eos_at",
        "num_cached_tokens",
        "num_preemptions",
        "arrival",
        "first_scheduled",
        "first_token",
        "finished",
        "rng",
        "seed_material",
        "digest",
        "lp_rng",
        "quality",
        "lora_name",
        "cache_salt",
        "extra_keys",
    )

    def __init__(self, req: EngineRequest, arrival: float, max_tokens: int, digest: bytes, seed_material: bytes,
                 token_ids: MutableSequence[int] | None = None) -> None:
        self.req = req
        self.request_id = req.request_id
        # the prompt, then every generated token; the engine passes an array('I') copy of the
        # prompt when its ids fit (no list of thousands of ints to build), else this list
        self.all_token_ids: MutableSequence[int] = (
            token_ids if token_ids is not None else list(req.prompt_token_ids)
        )
        self.num_prompt_tokens = len(self.all_token_ids)
        self.num_computed_tokens = 0
        self.block_hashes: list[BlockHash] = []
        self.status = Status.WAITING
        self.max_tokens = max_tokens
        self.natural_len = 0
        self.eos_at = -1  # the output length at which the model emits EOS (-1: never, ignore_eos)
        self.num_cached_tokens = -1
        self.num_preemptions = 0
        self.arrival = arrival
        self.first_scheduled: float | None = None
        self.first_token: float | None = None
        self.finished: float | None = None
        self.digest = digest
        self.seed_material = seed_material
        self.rng = random.Random(seed_material)
        self.lp_rng: random.Random | None = None
        self.quality: QualityOutcome | None = None
        self.lora_name = req.lora_name
        self.cache_salt = req.cache_salt
        self.extra_keys = _extra_keys_fn(req)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_prompt_tokens

    def __repr__(self) -> str:
        return (
            f"RequestState({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens})"
        )


def _extra_keys_fn(req: EngineRequest) -> Callable[[int], ExtraKeys] | None:
    """vLLM >= 0.32's per-block extra keys: LoRA on every block, then the salt on block 0."""
    if req.lora_name is None and req.cache_salt is None:
        return None
    lora = ("lora", req.lora_name, req.lora_path) if req.lora_name is not None else None
    salt = ("cache_salt", req.cache_salt) if req.cache_salt is not None else None

    def keys(i: int) -> ExtraKeys:
        ks = [k for k in (lora, salt if i == 0 else None) if k is not None]
        return tuple(ks) if ks else None

    return keys
