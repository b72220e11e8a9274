"""The simulated world: a virtual-time asyncio loop (`SimLoop`) on an in-memory loopback network (`SimNetwork`).

See `worlds.sim.loop` for the loop's rules (time, order, no threads) and `worlds.sim.net` for the network's
kernel semantics (handshake, accept queue and SYN retransmits, FIN/RST, buffers, UDP).
"""

from __future__ import annotations

from worlds.sim.loop import SimDeadlock, SimLoop, SimSelector, SimTimerHandle
from worlds.sim.net import DEFAULT_LATENCY_S, SimNetwork, SimSocket
from worlds.sim.world import SIM_EPOCH, SimWorld, VirtualTime

__all__ = [
    "DEFAULT_LATENCY_S",
    "SIM_EPOCH",
    "SimDeadlock",
    "SimLoop",
    "SimNetwork",
    "SimSelector",
    "SimSocket",
    "SimTimerHandle",
    "SimWorld",
    "VirtualTime",
]
