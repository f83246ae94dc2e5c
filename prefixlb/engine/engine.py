"""One vLLM replica as pure logic: continuous batching over a paged, prefix-cached KV cache.

The caller owns the clock. ``add_request(req, now)`` queues a request; ``step(now)`` plans one
forward pass the way vLLM v1's scheduler does (FCFS), commits it, and returns a
:class:`StepResult` whose outputs and KV events take effect at ``result.end``. Call ``step``
again at or after that time. ``advance(now)`` is the same step for a caller that needs only
when it ends and which requests got their first token or finished (the simulator: building an
output object for every streamed token is most of a step's cost). Nothing here does I/O or
reads a clock.

Scheduling (``vllm/v1/core/sched/scheduler.py``, FCFS policy):

1. Running requests first, in order, within the token budget ``max_num_batched_tokens``: a
   decode takes one token, an unfinished prefill takes the rest of its prompt (chunked to the
   budget left). When a request cannot get its blocks, the last running request is preempted
   (recompute mode: its blocks are freed, it goes back to the *front* of the waiting queue)
   until the request fits or is itself the one preempted.
2. Then, only if nobody was preempted in this step, waiting requests in order while the
   budget, ``max_num_seqs`` and free blocks allow. Each queries the prefix cache first (a
   preempted one re-queries it, but is not counted in ``prefix_cache_queries``); the first one
   that does not fit stops the loop.
3. At the end of the step, every request whose tokens are all computed gets one new token; a
   request that reached ``max_tokens``/``max_model_len`` (``length``) or sampled EOS after
   ``min_tokens`` (``stop``) finishes and frees its blocks.

Generated tokens are drawn from the tokenizer's sample pool by a ``random.Random`` seeded from
the prompt, the request's seed and the served model name; without ``ignore_eos`` an answer has
a natural length (geometric, mean ``profile.mean_output_tokens``) and ends with EOS.
"""

from __future__ import annotations

import hashlib
import math
import random
import sys
from array import array
from collections import deque
from collections.abc import Sequence

from .events import KVEvent
from .hashing import BlockHasher
from .kv_cache import KVCacheManager
from .outputs import FinishReason, RequestOutput, RequestTimes, StepResult, TokenLogprob
from .profiles import Profile, get_profile
from .quality import QualityOutcome, assess, difficulty_from_digest, token_logprob
from .request import EngineRequest, RequestState, Status
from .stats import EngineCounters, MetricsSnapshot
from .timing import StepComposition, step_duration, step_seconds
from .tokenizer import Tokenizer, default_tokenizer

__all__ = ["Engine"]

#: vLLM's default ``--max-logprobs``.
DEFAULT_MAX_LOGPROBS = 20
_LITTLE = sys.byteorder == "little"
_BYTES_BELOW = [bytes(range(k)) for k in range(256)]  # _BYTES_BELOW[k]: the bytes 0 .. k-1


class Engine:
    """A model of one vLLM replica (see the module docstring for the contract).

    ``profile`` gives the defaults; keyword arguments override them. The KV capacity is
    ``num_gpu_blocks`` if given, else ``kv_capacity_tokens // block_size``, else the profile's
    capacity in tokens re-cut into blocks of ``block_size``.
    """

    def __init__(
        self,
        profile: Profile | str = "h100-llama3-8b",
        *,
        model: str | None = None,
        block_size: int | None = None,
        num_gpu_blocks: int | None = None,
        kv_capacity_tokens: int | None = None,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        max_model_len: int | None = None,
        hash_algo: str = "sha256",
        hash_seed: str | None = None,
        enable_prefix_caching: bool = True,
        enable_kv_events: bool = True,
        tokenizer: Tokenizer | None = None,
        grade_quality: bool = True,
        max_logprobs: int = DEFAULT_MAX_LOGPROBS,
    ) -> None:
        p = get_profile(profile) if isinstance(profile, str) else profile
        bs = block_size if block_size is not None else p.block_size
        if bs < 1:
            raise ValueError(f"block_size must be >= 1, got {bs}")
        if num_gpu_blocks is None:
            tokens = kv_capacity_tokens if kv_capacity_tokens is not None else p.kv_capacity_tokens
            num_gpu_blocks = tokens // bs
        p = p.replace(
            model=model if model is not None else p.model,
            block_size=bs,
            num_gpu_blocks=num_gpu_blocks,
            max_num_seqs=max_num_seqs if max_num_seqs is not None else p.max_num_seqs,
            max_num_batched_tokens=(
                max_num_batched_tokens if max_num_batched_tokens is not None else p.max_num_batched_tokens
            ),
            max_model_len=max_model_len if max_model_len is not None else p.max_model_len,
        )
        if p.max_num_seqs < 1 or p.max_num_batched_tokens < 1 or p.max_model_len < 2:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1, max_model_len >= 2")
        if num_gpu_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks (one is reserved), got {num_gpu_blocks}")
        need = -(-p.max_model_len // bs)
        if need > num_gpu_blocks - 1:
            # vLLM refuses to start when one max-length request cannot fit
            raise ValueError(
                f"max_model_len {p.max_model_len} needs {need} KV blocks of {bs} tokens, but the cache "
                f"has {num_gpu_blocks - 1} usable blocks; lower max_model_len or raise the KV capacity"
            )
        self.profile = p
        self.hash_algo = hash_algo
        self.hasher = BlockHasher(hash_algo, bs, hash_seed)
        self.enable_prefix_caching = enable_prefix_caching
        self.kv = KVCacheManager(
            num_gpu_blocks,
            bs,
            max_model_len=p.max_model_len,
            enable_caching=enable_prefix_caching,
            enable_events=enable_kv_events,
        )
        self.tokenizer: Tokenizer = tokenizer if tokenizer is not None else default_tokenizer()
        self.grade_quality = grade_quality
        self.max_logprobs = max_logprobs
        self.counters = EngineCounters()
        self._requests: dict[str, RequestState] = {}
        self._waiting: deque[RequestState] = deque()
        self._running: list[RequestState] = []
        self._model_key = p.model.encode()

    # -- configuration and state -------------------------------------------------------------

    @property
    def model(self) -> str:
        return self.profile.model

    @property
    def block_size(self) -> int:
        return self.profile.block_size

    @property
    def num_gpu_blocks(self) -> int:
        return self.profile.num_gpu_blocks

    @property
    def max_model_len(self) -> int:
        return self.profile.max_model_len

    @property
    def num_requests_running(self) -> int:
        return len(self._running)

    @property
    def num_requests_waiting(self) -> int:
        return len(self._waiting)

    @property
    def kv_cache_usage(self) -> float:
        return self.kv.usage

    def has_unfinished(self) -> bool:
        """Whether any request is waiting or running."""
        return bool(self._running or self._waiting)

    def metrics(self) -> MetricsSnapshot:
        """Counters (a copy) and gauges now."""
        return MetricsSnapshot(
            counters=self.counters.copy(),
            num_requests_running=len(self._running),
            num_requests_waiting=len(self._waiting),
            kv_cache_usage_perc=self.kv.usage,
            num_gpu_blocks=self.profile.num_gpu_blocks,
            block_size=self.profile.block_size,
            prefix_caching_hash_algo=self.hash_algo,
        )

    def take_events(self) -> list[KVEvent]:
        """KV events produced outside a step (e.g. by :meth:`reset_prefix_cache`); steps drain them too."""
        return self.kv.take_events()

    def reset_prefix_cache(self) -> bool:
        """Drop all cached blocks (``AllBlocksCleared``); False while requests hold blocks."""
        return self.kv.reset_prefix_cache()

    # -- requests ------------------------------------------------------------------------------

    def add_request(self, req: EngineRequest, now: float) -> None:
        """Queue a request that arrived at ``now``.

        Raises ValueError, with vLLM's wording where vLLM has one, for a duplicate id, an empty
        prompt, token ids outside the vocabulary, bad sampling limits, or a prompt that leaves
        no room in ``max_model_len``.
        """
        rid = req.request_id
        if rid in self._requests:
            raise ValueError(f"request id {rid!r} is already in the engine")
        prompt = req.prompt_token_ids
        n = len(prompt)
        if n == 0:
            raise ValueError("The decoder prompt cannot be empty")
        packed = self._packed_ids(prompt)
        if packed is None:
            lo, hi = min(prompt), max(prompt)
            if lo < 0 or hi >= self.tokenizer.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"Token id {bad} is out of vocabulary")
        if req.max_tokens is not None and req.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {req.max_tokens}.")
        if req.min_tokens < 0 or (req.max_tokens is not None and req.min_tokens > req.max_tokens):
            raise ValueError(f"min_tokens must be in [0, max_tokens], got {req.min_tokens}.")
        if req.logprobs is not None and not 0 <= req.logprobs <= self.max_logprobs:
            raise ValueError(
                f"Requested sample logprobs of {req.logprobs}, which is greater than max allowed: {self.max_logprobs}"
            )
        limit = self.profile.max_model_len
        out = req.max_tokens if req.max_tokens is not None else 0
        if n >= limit or n + out > limit:
            raise ValueError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{out} output tokens and your prompt contains at least {n} input tokens, for a total "
                f"of at least {n + out} tokens. Please reduce the length of the input prompt or the "
                f"number of requested output tokens."
            )
        max_tokens = req.max_tokens if req.max_tokens is not None else limit - n
        digest = hashlib.blake2b((packed if packed is not None else array("I", prompt)).tobytes(),
                                 digest_size=16).digest()
        seed_material = hashlib.blake2b(
            self._model_key + b"\0" + digest + b"\0" + (b"-" if req.seed is None else str(req.seed).encode()),
            digest_size=16,
        ).digest()
        r = RequestState(req, now, max_tokens, digest, seed_material,
                         array("I", packed) if packed is not None else None)
        r.natural_len = max(_natural_length(r.rng, self.profile.mean_output_tokens), req.min_tokens)
        r.eos_at = -1 if req.ignore_eos else r.natural_len
        if self.enable_prefix_caching:
            self.hasher.extend(r.block_hashes, packed if packed is not None else r.all_token_ids, r.extra_keys)
        self._requests[rid] = r
        self._waiting.append(r)

    def _packed_ids(self, prompt) -> array | None:
        """The prompt as array('I') when every id is a valid token id, else None (the caller
        then finds the bad one). Checks the top byte of each id first: one C-speed pass over
        bytes instead of boxing thousands of ints for min() and max()."""
        try:
            packed = prompt if isinstance(prompt, array) and prompt.typecode == "I" else array("I", prompt)
        except (OverflowError, TypeError):
            return None  # negative, >= 2**32, or not an int
        if not packed:
            return None
        limit = self.tokenizer.vocab_size - 1  # the largest valid id
        if limit >= 0xFFFFFFFF:
            return packed
        if limit >= 0x1000000:
            raw = packed.tobytes()
            # delete every top byte below the limit's; nothing left: every id is below the limit
            if not (raw[3::4] if _LITTLE else raw[0::4]).translate(None, _BYTES_BELOW[limit >> 24]):
                return packed
        return packed if max(packed) <= limit else None

    def abort(self, request_id: str, now: float) -> RequestOutput | None:
        """Stop a request now and free its blocks; None if it is unknown or already finished."""
        r = self._requests.pop(request_id, None)
        if r is None:
            return None
        if r.status is Status.RUNNING:
            self._running.remove(r)
        else:
            self._waiting.remove(r)
        self.kv.free(request_id)
        return self._finish(r, "abort", now, [], None)

    # -- the step --------------------------------------------------------------------------------

    def step(self, now: float) -> StepResult | None:
        """Plan and commit one step starting at ``now``; None when there is nothing to run."""
        plan = self._plan(now)
        if plan is None:
            return None
        scheduled, preempted, prefill, decode, context, pairs = plan
        comp = StepComposition(prefill, decode, context, pairs)
        duration = step_duration(self.profile, comp)
        end = now + duration
        outputs = self._commit(scheduled, end, True)
        return StepResult(
            start=now,
            duration=duration,
            composition=comp,
            scheduled={r.request_id: n for r, n, _ in scheduled},
            outputs=outputs,
            events=self.kv.take_events(),
            preempted=[r.request_id for r in preempted],
        )

    def advance(self, now: float) -> tuple[float, list[RequestOutput]] | None:
        """:meth:`step` for a caller that only needs when the step ends and which requests got
        their first token or finished in it (the simulator): the same plan and commit, the same
        state afterwards, but no :class:`StepResult` and no outputs for the tokens in between.
        KV events stay queued for :meth:`take_events`. None when there is nothing to run."""
        plan = self._plan(now)
        if plan is None:
            return None
        scheduled, _preempted, prefill, decode, context, pairs = plan
        end = now + step_seconds(self.profile, prefill, decode, context, pairs)
        return end, self._commit(scheduled, end, False)

    # -- internals -------------------------------------------------------------------------------

    def _plan(self, now: float):
        """Schedule one step (see the module docstring): (scheduled, preempted, prefill tokens,
        decode sequences, context tokens, attention pairs), or None with nothing to run."""
        running = self._running
        if not running and not self._waiting:
            return None
        p = self.profile
        kv = self.kv
        allocate = kv.allocate_slots
        budget = p.max_num_batched_tokens
        last = p.max_model_len - 1
        scheduled: list[tuple[RequestState, int, int]] = []  # (request, new tokens, computed before)
        preempted: list[RequestState] = []
        prefill = decode = context = pairs = 0  # the step's composition

        for r in running:  # a preemption pops the list's tail: the loop then ends sooner
            if budget <= 0:
                break
            c0 = r.num_computed_tokens
            total = len(r.all_token_ids)
            n = total - c0
            if budget < n:
                n = budget
            if last - c0 < n:
                n = last - c0
            if n <= 0:
                continue
            if allocate(r, n) is None:
                fits = False
                while not fits:
                    victim = running.pop()  # the lowest-priority running request under FCFS
                    self._preempt(victim)
                    preempted.append(victim)
                    if victim is r:
                        break
                    fits = allocate(r, n) is not None
                if not fits:
                    break
            scheduled.append((r, n, c0))
            budget -= n
            context += c0 + n
            pairs += n * c0 + n * (n + 1) // 2  # chunk_pairs(n, c0)
            if n == 1 and c0 == total - 1 and c0 >= r.num_prompt_tokens:
                decode += 1  # one new token after the whole prompt and >= 1 output token
            else:
                prefill += n

        if not preempted:
            waiting = self._waiting
            counters = self.counters
            while waiting and budget > 0 and len(running) < p.max_num_seqs:
                r = waiting[0]
                prefix = kv.get_computed_blocks(r.block_hashes, r.num_tokens)
                n = min(r.num_tokens - prefix.num_tokens, budget)
                if allocate(r, n, prefix) is None:
                    break  # FCFS: nobody overtakes the head of the queue
                waiting.popleft()
                if self.enable_prefix_caching and r.num_preemptions == 0:
                    counters.prefix_cache_queries += r.num_tokens
                    counters.prefix_cache_hits += prefix.num_tokens
                r.num_computed_tokens = prefix.num_tokens
                if r.num_cached_tokens < 0:
                    r.num_cached_tokens = prefix.num_tokens
                if r.first_scheduled is None:
                    r.first_scheduled = now
                r.status = Status.RUNNING
                running.append(r)
                c0 = prefix.num_tokens
                scheduled.append((r, n, c0))
                budget -= n
                context += c0 + n
                pairs += n * c0 + n * (n + 1) // 2
                if n == 1 and c0 == len(r.all_token_ids) - 1 and c0 >= r.num_prompt_tokens:
                    decode += 1
                else:
                    prefill += n
        return scheduled, preempted, prefill, decode, context, pairs

    def _preempt(self, r: RequestState) -> None:
        self.kv.free(r.request_id)
        r.status = Status.PREEMPTED
        r.num_computed_tokens = 0
        r.num_preemptions += 1
        self.counters.num_preemptions += 1
        self._waiting.appendleft(r)

    def _commit(self, scheduled: list[tuple[RequestState, int, int]], end: float, every: bool) -> list[RequestOutput]:
        """Apply a planned step at ``end``: one token for each request whose prompt is done.
        Returns an output per such request (``every``), or only first tokens and finishes."""
        counters = self.counters
        outputs: list[RequestOutput] = []
        any_finished = False
        caching = self.enable_prefix_caching
        hasher = self.hasher
        bs = hasher.block_size
        max_len = self.profile.max_model_len
        eos = self.tokenizer.eos_token_id
        pool: Sequence[int] = ()
        npool = bits = generated = 0
        for r, n, c0 in scheduled:
            computed = c0 + n
            r.num_computed_tokens = computed
            ids = r.all_token_ids
            if computed < len(ids):
                continue  # a prefill chunk: the sampled token is discarded
            n_out = len(ids) - r.num_prompt_tokens  # output tokens before this one
            # the next token: scripted, else EOS at the natural length, else from the sample pool
            req = r.req
            scripted = req.output_token_ids
            if scripted is not None and n_out < len(scripted):
                token = scripted[n_out]
            elif n_out + 1 == r.eos_at:
                token = eos
            else:
                if not npool:
                    pool = self.tokenizer.sample_pool
                    npool = len(pool)
                    bits = npool.bit_length()
                # rng.randrange(npool), inlined: CPython's Random._randbelow_with_getrandbits
                # (tests/sim pins the equality)
                getrandbits = r.rng.getrandbits
                x = getrandbits(bits)
                while x >= npool:
                    x = getrandbits(bits)
                token = pool[x]
            try:
                ids.append(token)
            except (OverflowError, TypeError):  # a scripted id that is no uint32: keep a list from now on
                r.all_token_ids = ids = list(ids)
                ids.append(token)
            n_out += 1
            if caching and len(ids) // bs > len(r.block_hashes):
                hasher.extend(r.block_hashes, ids, r.extra_keys)
            first = r.first_token is None
            if first:
                r.first_token = end
                counters.prompt_tokens += r.num_prompt_tokens
            generated += 1
            lps = None
            if req.logprobs is not None:
                lps = [self._logprob(r, token)]
            # vLLM's check_stop order: length first, then min_tokens, then EOS
            if len(ids) >= max_len or n_out >= r.max_tokens:
                reason: FinishReason | None = "length"
            elif n_out < req.min_tokens or token != eos or req.ignore_eos:
                reason = None
            else:
                reason = "stop"
            if reason is None:
                if every or first:
                    outputs.append(self._output(r, [token], first, None, lps))
            else:
                any_finished = True
                del self._requests[r.request_id]
                self.kv.free(r.request_id)
                outputs.append(self._finish(r, reason, end, [token], lps, first))
        counters.generation_tokens += generated
        if any_finished:
            self._running = [r for r in self._running if r.status is Status.RUNNING]
        return outputs

    def _grade(self, r: RequestState) -> QualityOutcome:
        if r.quality is None:
            d = r.req.difficulty
            if d is None:
                d = difficulty_from_digest(r.digest, r.num_prompt_tokens)
            r.quality = assess(d, self.profile.skill, random.Random(r.seed_material + b"quality"))
        return r.quality

    def _logprob(self, r: RequestState, token: int) -> TokenLogprob:
        if r.lp_rng is None:
            r.lp_rng = random.Random(r.seed_material + b"logprobs")
        k = r.req.logprobs or 0
        return token_logprob(token, self._grade(r).confidence, k, r.lp_rng, self.tokenizer.sample_pool)

    def _output(
        self,
        r: RequestState,
        tokens: list[int],
        first: bool,
        reason: FinishReason | None,
        lps: list[TokenLogprob] | None,
        quality: QualityOutcome | None = None,
    ) -> RequestOutput:
        return RequestOutput(
            request_id=r.request_id,
            new_token_ids=tokens,
            first_token=first,
            finished=reason is not None,
            finish_reason=reason,
            num_prompt_tokens=r.num_prompt_tokens,
            num_output_tokens=r.num_output_tokens,
            num_cached_tokens=max(r.num_cached_tokens, 0),
            num_preemptions=r.num_preemptions,
            times=RequestTimes(r.arrival, r.first_scheduled, r.first_token, r.finished),
            logprobs=lps,
            quality=quality,
        )

    def _finish(
        self,
        r: RequestState,
        reason: FinishReason,
        at: float,
        tokens: list[int],
        lps: list[TokenLogprob] | None,
        first: bool = False,
    ) -> RequestOutput:
        r.status = Status.FINISHED
        r.finished = at
        self.counters.request_success[reason] += 1
        quality = self._grade(r) if self.grade_quality else None
        return self._output(r, tokens, first, reason, lps, quality)

    def __repr__(self) -> str:
        return (
            f"Engine({self.profile.name!r}, model={self.model!r}, blocks={self.num_gpu_blocks}x{self.block_size}, "
            f"running={len(self._running)}, waiting={len(self._waiting)})"
        )


def _natural_length(rng: random.Random, mean: float) -> int:
    """A geometric answer length >= 1 with the given mean."""
    if mean <= 1.0:
        return 1
    u = rng.random()
    return 1 + int(math.log1p(-u) / math.log1p(-1.0 / mean))
