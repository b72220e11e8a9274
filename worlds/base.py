"""The three protocols a world provides: `Clock` (sim time), `Network` (sockets) and `World` (both, plus seeds)."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Coroutine
from typing import Any, Literal, Protocol, TypeVar

import aiohttp

T = TypeVar("T")
WorldName = Literal["real", "sim"]


class Clock(Protocol):
    """Sim time in seconds. Every interval, timeout and metric in lbsim is read through one of these.

    Asyncio timers and timeouts run on loop time; `to_loop` converts a sim duration into loop seconds for them
    (wall seconds in the real world, sim seconds in the simulated one). `loop_timers` says whether sim time
    follows the running loop's clock, so a loop timer may stand in for `sleep` (false for a `ManualClock`).
    """

    @property
    def loop_timers(self) -> bool: ...

    def now(self) -> float: ...

    def restart(self, start: float = 0.0) -> None:
        """Make sim time `start` now (before a run begins, so set-up time is not scenario time)."""

    def to_loop(self, sim_seconds: float) -> float: ...

    def to_sim(self, loop_seconds: float) -> float: ...

    async def sleep(self, sim_seconds: float) -> None: ...

    async def sleep_until(self, sim_time: float) -> None: ...


class Network(Protocol):
    """Where sockets come from. Asyncio's own calls (create_server, create_connection, ...) reach the same
    network through the world's event loop; components that drive a raw socket ask for one here."""

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket: ...

    def http_connector(self, **kwargs: Any) -> aiohttp.TCPConnector:
        """An aiohttp connector whose sockets come from this network."""


class World(Protocol):
    """A clock, a network, a root seed and the event loop they belong to.

    The members are read-only properties so that a world may hold a subtype (a `SimNetwork`, a `LoopClock`).
    """

    @property
    def name(self) -> WorldName: ...

    @property
    def seed(self) -> int | str: ...

    @property
    def clock(self) -> Clock: ...

    @property
    def network(self) -> Network: ...

    def rng(self, name: str) -> random.Random:
        """A random stream for one component, derived from the root seed and `name` alone."""

    def new_event_loop(self) -> asyncio.AbstractEventLoop: ...

    def run(self, main: Coroutine[Any, Any, T]) -> T:
        """Run `main` to completion on a fresh event loop of this world."""
