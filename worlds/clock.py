"""The clocks: `ScaledClock` (real world, wall time x speed), `LoopClock` (sim world) and `ManualClock` (tests)."""

from __future__ import annotations

import asyncio
import time


class ScaledClock:
    """Sim time = wall time elapsed since start x speed; the real world's clock.

    `time.monotonic` is the clock asyncio's loop and uvloop's timers follow on Linux, so timer callbacks and
    `now()` agree, and it can be read before a loop runs.
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

    @property
    def loop_timers(self) -> bool:
        return True

    def restart(self, start: float = 0.0) -> None:
        self._origin_wall = time.monotonic()
        self._origin_sim = start

    def now(self) -> float:
        return self._origin_sim + (time.monotonic() - self._origin_wall) * self._speed

    def to_loop(self, sim_seconds: float) -> float:
        return sim_seconds / self._speed

    def to_sim(self, loop_seconds: float) -> float:
        return loop_seconds * self._speed

    async def sleep(self, sim_seconds: float) -> None:
        await asyncio.sleep(max(0.0, sim_seconds) / self._speed)

    async def sleep_until(self, sim_time: float) -> None:
        # uvloop's timers can fire up to a millisecond early (they round to its cached loop time), so sleep
        # again for the remainder rather than return before the deadline.
        while (remaining := sim_time - self.now()) > 0:  # noqa: ASYNC110 - a deadline, not a condition to poll
            await asyncio.sleep(remaining / self._speed)


class LoopClock:
    """Sim time = the event loop's own time since start; the simulated world's clock (its loop is virtual)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, start: float = 0.0) -> None:
        self._loop = loop
        self._origin_loop = loop.time()
        self._origin_sim = start

    @property
    def loop_timers(self) -> bool:
        return True

    def restart(self, start: float = 0.0) -> None:
        self._origin_loop = self._loop.time()
        self._origin_sim = start

    def now(self) -> float:
        return self._origin_sim + (self._loop.time() - self._origin_loop)

    def to_loop(self, sim_seconds: float) -> float:
        return sim_seconds

    def to_sim(self, loop_seconds: float) -> float:
        return loop_seconds

    async def sleep(self, sim_seconds: float) -> None:
        await asyncio.sleep(max(0.0, sim_seconds))

    async def sleep_until(self, sim_time: float) -> None:
        await asyncio.sleep(max(0.0, sim_time - self.now()))


class ManualClock:
    """A clock that only moves when a test calls `advance`; `sleep` waits for that."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._waiters: list[tuple[float, asyncio.Future[None]]] = []

    @property
    def loop_timers(self) -> bool:
        return False

    def restart(self, start: float = 0.0) -> None:
        self.set(start)

    def now(self) -> float:
        return self._now

    def to_loop(self, sim_seconds: float) -> float:
        return sim_seconds

    def to_sim(self, loop_seconds: float) -> float:
        return loop_seconds

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
