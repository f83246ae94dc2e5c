"""Helpers for the engine tests: a small engine, and a driver that runs it on a virtual clock."""

from __future__ import annotations

from collections.abc import Iterable

from prefixlb.engine import Engine, EngineRequest, StepResult


def small_engine(**overrides) -> Engine:  # type: ignore[no-untyped-def]
    """cpu-tiny-llama with a cache and budget small enough to exercise eviction and chunking."""
    kw = dict(block_size=4, num_gpu_blocks=65, max_num_batched_tokens=64, max_num_seqs=8, max_model_len=128)
    kw.update(overrides)
    return Engine("cpu-tiny-llama", **kw)


def drive(
    eng: Engine,
    arrivals: Iterable[tuple[float, EngineRequest]] = (),
    t: float = 0.0,
    max_steps: int = 100_000,
    check: bool = False,
) -> list[StepResult]:
    """Feed ``arrivals`` (time, request) as the clock passes them; step until all finish."""
    pending = sorted(arrivals, key=lambda a: a[0])
    k = 0
    results: list[StepResult] = []
    for _ in range(max_steps):
        while k < len(pending) and pending[k][0] <= t:
            eng.add_request(pending[k][1], pending[k][0])
            k += 1
        res = eng.step(t)
        if check:
            eng.kv.check_invariants()
        if res is None:
            if k == len(pending):
                return results
            t = pending[k][0]
            continue
        results.append(res)
        t = res.end if res.duration > 0 else t
    raise AssertionError(f"engine did not finish within {max_steps} steps")


def run_one(eng: Engine, req: EngineRequest, t: float = 0.0) -> list[StepResult]:
    """Run one request alone to completion."""
    return drive(eng, [(t, req)], t=t)
