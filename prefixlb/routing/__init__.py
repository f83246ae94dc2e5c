"""Routing: which replica (and, later, which tier) answers a request. Pure decisions over a
snapshot of state; no sockets, no clocks of its own (``now`` is passed in)."""

from .policies import POLICIES, CacheAware, ConsistentHash, LeastLoaded, Pick, Policy, RoundRobin, make_policy
from .precise import EventIndex
from .prompt import PromptError, PromptKey, prompt_key, token_key
from .router import Decision, NoReplicaAvailable, TierRouter
from .state import CostParams, ReplicaState

__all__ = [
    "POLICIES",
    "CacheAware",
    "ConsistentHash",
    "CostParams",
    "EventIndex",
    "Decision",
    "LeastLoaded",
    "NoReplicaAvailable",
    "Pick",
    "Policy",
    "PromptError",
    "PromptKey",
    "ReplicaState",
    "RoundRobin",
    "TierRouter",
    "make_policy",
    "prompt_key",
    "token_key",
]
