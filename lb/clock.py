"""Sim-time clocks: the scaled wall clock used by runs and a manual clock for unit tests."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    """Sim time in seconds. Every interval, timeout and metric in lbsim is read through one of these."""

    @property
    def speed(self) -> float: ...

    def now(self) -> float: ...

    async def sleep(self, sim_seconds: float) -> None: ...

    def to_wall(self, sim_seconds: float) -> float: ...


class ScaledClock:
    """Sim time = wall time elapsed since start x speed.

    The loop's monotonic clock is the wall reference so that timer callbacks and `now()` agree; before a
    loop runs we fall back to `time.monotonic`, which is the same clock asyncio uses on Linux.
    """

    def __init__(self, speed: float = 1.0, start: float = 0.0) -> None:
        if speed <= 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        self._speed = speed
        self._origin_wall = time.monotonic()
        self._origin_sim = start

    @property
    def speed(self) -> float:
        return self._speed

    def restart(self, start: float = 0.0) -> None:
        """Make sim time `start` now (before a run begins, so set-up time is not scenario time)."""
        self._origin_wall = time.monotonic()
        self._origin_sim = start

    def now(self) -> float:
        return self._origin_sim + (time.monotonic() - self._origin_wall) * self._speed

    def to_wall(self, sim_seconds: float) -> float:
        return sim_seconds / self._speed

    def to_sim(self, wall_seconds: float) -> float:
        return wall_seconds * self._speed

    def wall_deadline(self, sim_time: float) -> float:
        """The `time.monotonic()` value at which sim time reaches `sim_time`."""
        return self._origin_wall + (sim_time - self._origin_sim) / self._speed

    async def sleep(self, sim_seconds: float) -> None:
        await asyncio.sleep(max(0.0, sim_seconds) / self._speed)

    async def sleep_until(self, sim_time: float) -> None:
        # uvloop's timers can fire up to a millisecond early (they round to its cached loop time), so sleep
        # again for the remainder rather than return before the deadline.
        while (remaining := sim_time - self.now()) > 0:  # noqa: ASYNC110 - a deadline, not a condition to poll
            await asyncio.sleep(remaining / self._speed)


class ManualClock:
    """A clock that only moves when a test calls `advance`; `sleep` waits for that."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._waiters: list[tuple[float, asyncio.Future[None]]] = []

    @property
    def speed(self) -> float:
        return 1.0

    def now(self) -> float:
        return self._now

    def to_wall(self, sim_seconds: float) -> float:
        return sim_seconds

    def advance(self, sim_seconds: float) -> None:
        if sim_seconds < 0:
            raise ValueError("a clock never goes back")
        self._now += sim_seconds
        due = [w for w in self._waiters if w[0] <= self._now]
        self._waiters = [w for w in self._waiters if w[0] > self._now]
        for _, fut in due:
            if not fut.done():
                fut.set_result(None)

    def set(self, sim_time: float) -> None:
        self.advance(sim_time - self._now)

    async def sleep(self, sim_seconds: float) -> None:
        if sim_seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((self._now + sim_seconds, fut))
        await fut

    async def sleep_until(self, sim_time: float) -> None:
        await self.sleep(sim_time - self._now)
