"""The real world: loopback sockets from the kernel, uvloop where installed, sim time = wall time x speed."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar

import aiohttp

from worlds.base import WorldName
from worlds.clock import ScaledClock

T = TypeVar("T")
LoopKind = Literal["uvloop", "asyncio"]


class RealNetwork:
    """The kernel's network; lbsim only ever uses its loopback addresses."""

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
        return socket.socket(family, type)

    def http_connector(self, **kwargs: Any) -> aiohttp.TCPConnector:
        return aiohttp.TCPConnector(**kwargs)


def uvloop_available() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


class RealWorld:
    """Wall time scaled by `speed` (sim seconds per wall second), on the kernel's loopback network."""

    name: WorldName = "real"

    def __init__(self, speed: float = 1.0, seed: int | str = 0, loop: LoopKind = "uvloop") -> None:
        self.speed = speed
        self.seed = seed
        self.clock = ScaledClock(speed)
        self.network = RealNetwork()
        # uvloop is the default where it is installed; otherwise asyncio's own loop (the caller may warn).
        self.loop_kind: LoopKind = loop if loop == "asyncio" or uvloop_available() else "asyncio"

    def rng(self, name: str) -> random.Random:
        return random.Random(f"{name}/{self.seed}")

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        if self.loop_kind == "uvloop":
            import uvloop

            return uvloop.new_event_loop()
        return asyncio.new_event_loop()

    def run(self, main: Coroutine[Any, Any, T]) -> T:
        with asyncio.Runner(loop_factory=self.new_event_loop) as runner:
            return runner.run(main)


class Stopwatch:
    """Wall time since it was made: what a run or a bench costs, reported beside sim results, never in them."""

    def __init__(self) -> None:
        self._started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self._started
