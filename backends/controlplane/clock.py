"""The clock the control plane's asyncio shells read: a structural protocol, so `backends/` needs no `lb/` import.

Everything in the control plane is in sim-seconds. The scenario runner passes the load balancer's clock (any
object with these three methods fits); tests pass `lb.clock.ScaledClock` or their own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol


class SimClock(Protocol):
    def now(self) -> float: ...

    async def sleep(self, sim_seconds: float) -> None: ...

    async def sleep_until(self, sim_time: float) -> None: ...

    def to_wall(self, sim_seconds: float) -> float: ...


# How a control-plane client finds a service by name: the addresses the name resolves to now (an empty list
# when the record is empty, NXDOMAIN or the DNS server does not answer). The resolver honours TTLs on its own.
Resolve = Callable[[str], Awaitable[list[str]]]
