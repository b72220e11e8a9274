"""The clock the runner hands lb/ and backends/: the world's own clock behind the interface they take today."""

from __future__ import annotations

import pytest

from lb.clock import ScaledClock as LbScaledClock
from scenarios.system import ComponentClock, world_speed
from worlds.clock import ManualClock, ScaledClock
from worlds.real import RealWorld


def test_it_reads_and_restarts_the_world_clock_and_converts_as_it_does() -> None:
    world_clock = ScaledClock(speed=4.0, start=100.0)
    clock = ComponentClock(world_clock)
    # The checker runs its probes on loop timers only for an lb ScaledClock.
    assert isinstance(clock, LbScaledClock)
    assert clock.speed == 4.0
    assert clock.to_wall(8.0) == world_clock.to_loop(8.0) == 2.0
    assert clock.to_sim(0.5) == 2.0
    clock.restart(50.0)  # one time for everyone: restarting it restarts the world's clock
    a, b = world_clock.now(), clock.now()
    assert 50.0 <= a <= b < 100.0


async def test_its_sleeps_are_the_world_clock_s() -> None:
    world_clock = ManualClock()
    with pytest.raises(ValueError, match="loop's timers"):
        ComponentClock(world_clock)  # sim time that does not follow the loop cannot drive the checker's timers
    real = ScaledClock(speed=1000.0)
    clock = ComponentClock(real)
    await clock.sleep_until(5.0)  # 5 ms of wall time
    assert real.now() >= 5.0


def test_the_world_speed_is_sim_seconds_per_loop_second() -> None:
    assert world_speed(RealWorld(speed=2.5)) == 2.5
