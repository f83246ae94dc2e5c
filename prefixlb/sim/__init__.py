"""The discrete-event simulator: the engine and the routing core on a virtual clock."""

from .core import SimConfig, SimResult, Simulation, simulate

__all__ = ["SimConfig", "SimResult", "Simulation", "simulate"]
