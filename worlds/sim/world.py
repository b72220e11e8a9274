"""`SimWorld`: a seeded, virtual-time world: a `SimLoop` on a `SimNetwork`, its `LoopClock`, and the wall-clock
reads of aiohttp and dnspython pointed at virtual time while it runs."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import random
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, Final, TypeVar

import aiohttp

from worlds.base import WorldName
from worlds.clock import LoopClock
from worlds.sim.loop import SimLoop
from worlds.sim.net import DEFAULT_LATENCY_S, SimNetwork

T = TypeVar("T")

# What a patched library's time.time() reads at virtual time 0: 2026-01-01T00:00:00Z, so HTTP Date headers and
# cookie expiry look like dates, the same ones in every run.
SIM_EPOCH: Final = 1_767_225_600.0


class VirtualTime:
    """Stands in for the `time` module inside a library: `time()`, `monotonic()` and `perf_counter()` read the
    loop's virtual time (plus `epoch` for `time()`); everything else (gmtime, strftime, ...) is the real module."""

    def __init__(self, loop: SimLoop, epoch: float) -> None:
        self._loop = loop
        self._epoch = epoch

    def time(self) -> float:
        return self._epoch + self._loop._now

    def time_ns(self) -> int:
        return int(self.time() * 1e9)

    def monotonic(self) -> float:
        return self._loop._now

    def monotonic_ns(self) -> int:
        return int(self._loop._now * 1e9)

    perf_counter = monotonic
    perf_counter_ns = monotonic_ns

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


class SimWorld:
    """Virtual time on an in-memory loopback network; a run is a function of its seed and its code alone.

    One loop per world: `run` runs a coroutine to completion on it as `asyncio.run` would (then the loop is
    closed), so a world runs once. While it runs, these library reads of the wall clock or of the global RNG
    read the world instead, and are put back afterwards (also when the run fails):

    * aiohttp: the connector pool's `monotonic` (keep-alive expiry, DNS cache) and its `random.shuffle` of
      waiters; the cookie jar's and the `Date` header's `time.time()` (virtual time from `SIM_EPOCH`); the
      access log's clock.
    * dnspython: `time.time()` in `dns.query`, `dns.asyncquery`, `dns.resolver` and `dns.asyncresolver` (query
      deadlines are computed from it, then waited for on the loop), and `dns.entropy.random_16` (query ids).
    """

    name: WorldName = "sim"

    def __init__(self, seed: int | str = 0, latency_s: float = DEFAULT_LATENCY_S) -> None:
        self.seed = seed
        self.network = SimNetwork(latency_s=latency_s)
        self.loop = SimLoop(self.network)
        self.clock = LoopClock(self.loop)
        self._ran = False

    def __repr__(self) -> str:
        return f"<SimWorld seed={self.seed!r} t={self.loop.time():.6f} {self.network!r}>"

    def rng(self, name: str) -> random.Random:
        return random.Random(f"{name}/{self.seed}")

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return self.loop

    def run(self, main: Coroutine[Any, Any, T]) -> T:
        if self._ran or self.loop.is_closed():
            main.close()
            raise RuntimeError("a SimWorld runs once (its loop is closed after the run): make a new SimWorld")
        self._ran = True
        with self.library_clocks(), asyncio.Runner(loop_factory=self.new_event_loop) as runner:
            return runner.run(main)

    def http_connector(self, **kwargs: Any) -> aiohttp.TCPConnector:
        """A connector on this world's network (see `SimNetwork.http_connector`); call it inside `run`."""
        return self.network.http_connector(**kwargs)

    @contextlib.contextmanager
    def library_clocks(self) -> Iterator[None]:
        """Point the libraries' wall-clock and global-RNG reads (class docstring) at this world, then restore."""
        wall = VirtualTime(self.loop, SIM_EPOCH)
        deadlines = VirtualTime(self.loop, 0.0)  # dnspython only subtracts these: keep them exact
        dns_ids = self.rng("dns.entropy")
        patches: list[tuple[str, str, object]] = [
            ("aiohttp.connector", "monotonic", wall.monotonic),
            ("aiohttp.connector", "random", self.rng("aiohttp.connector")),
            ("aiohttp.cookiejar", "time", wall),
            ("aiohttp.helpers", "time", wall),
            ("aiohttp.web_log", "time_mod", wall),
            ("dns.query", "time", deadlines),
            ("dns.asyncquery", "time", deadlines),
            ("dns.resolver", "time", deadlines),
            ("dns.asyncresolver", "time", deadlines),
            ("dns.entropy", "random_16", _random_16(dns_ids)),
        ]
        saved: list[tuple[object, str, object]] = []
        try:
            for module_name, attr, value in patches:
                try:
                    module = importlib.import_module(module_name)
                except ImportError:
                    continue
                if hasattr(module, attr):
                    saved.append((module, attr, getattr(module, attr)))
                    setattr(module, attr, value)
            yield
        finally:
            for owner, name, original in reversed(saved):
                setattr(owner, name, original)


def _random_16(rng: random.Random) -> Callable[[], int]:
    def random_16() -> int:
        return rng.getrandbits(16)

    return random_16
