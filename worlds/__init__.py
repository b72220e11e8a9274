"""Worlds: what every lbsim component gets its clock, network and seeded randomness from.

A world is the only place that reads a wall clock, creates a socket or converts `speed`. Two exist:

* `RealWorld` (`worlds.real`): loopback sockets, uvloop where installed, sim time = wall time x speed.
* `SimWorld` (`worlds.sim`): a virtual-time event loop and an in-memory TCP/UDP network; a run is a pure
  function of its seed and takes as little wall time as the CPU needs.

The load balancer, backends, control plane, traffic and recorder are the same code in both.
"""

from __future__ import annotations

from worlds.base import Clock, Network, World
from worlds.clock import LoopClock, ManualClock, ScaledClock

__all__ = ["Clock", "LoopClock", "ManualClock", "Network", "ScaledClock", "World"]
