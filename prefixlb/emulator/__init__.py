"""The replica model behind real HTTP: an emulated vLLM fleet.

Each :class:`EmulatedReplica` runs a :class:`prefixlb.engine.Engine` on a scaled wall clock and
serves what vLLM 0.32 serves: the OpenAI-compatible API (``/v1/completions``,
``/v1/chat/completions``, SSE streams, usage with ``cached_tokens``, logprobs), ``/tokenize``,
the render routes, ``/metrics`` with vLLM's names, and KV-cache events over ZMQ in vLLM's wire
format with a replay socket. Faults can be injected per replica. Durations are emulated
seconds; ``time_scale`` X makes everything X times faster in wall time.

Names are imported lazily so that ``import prefixlb.emulator`` (e.g. by the CLI parser) does
not load aiohttp, ZMQ or prometheus-client until something is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .clock import ScaledClock
    from .config import EMULATED_VLLM_VERSION, Faults, ReplicaConfig, endpoint_binds, replica_endpoint
    from .fleet import EmulatedFleet, FleetProcess, start_fleet_process
    from .kv_events import KVEventPublisher, encode_batch, event_to_wire
    from .replica import EmulatedReplica, ReplicaStopped, RequestStream

__all__ = [
    "EMULATED_VLLM_VERSION",
    "EmulatedFleet",
    "EmulatedReplica",
    "Faults",
    "FleetProcess",
    "KVEventPublisher",
    "ReplicaConfig",
    "ReplicaStopped",
    "RequestStream",
    "ScaledClock",
    "encode_batch",
    "endpoint_binds",
    "event_to_wire",
    "replica_endpoint",
    "start_fleet_process",
]

_WHERE = {
    "EMULATED_VLLM_VERSION": "config",
    "Faults": "config",
    "ReplicaConfig": "config",
    "endpoint_binds": "config",
    "replica_endpoint": "config",
    "ScaledClock": "clock",
    "EmulatedFleet": "fleet",
    "FleetProcess": "fleet",
    "start_fleet_process": "fleet",
    "KVEventPublisher": "kv_events",
    "encode_batch": "kv_events",
    "event_to_wire": "kv_events",
    "EmulatedReplica": "replica",
    "ReplicaStopped": "replica",
    "RequestStream": "replica",
}


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'prefixlb.emulator' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
