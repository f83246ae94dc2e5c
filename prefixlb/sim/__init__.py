"""The discrete-event simulator: the engine and the routing core on a virtual clock.

``simulate(specs, SimConfig(...))`` runs a workload (a list or a lazy iterator of
:class:`prefixlb.loadgen.RequestSpec`, in arrival order) through a simulated fleet;
:mod:`prefixlb.sim.run` is ``prefixlb sim`` (named workloads, several policies, the live
benchmark's metrics and bounds); :mod:`prefixlb.sim.workloads` sizes the named workloads.
"""

from .core import SimConfig, SimResult, Simulation, simulate

__all__ = ["SimConfig", "SimResult", "Simulation", "simulate"]
