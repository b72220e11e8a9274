"""What the system builder derives from its world: sim seconds per loop second."""

from __future__ import annotations

from scenarios.system import world_speed
from worlds.real import RealWorld


def test_the_world_speed_is_sim_seconds_per_loop_second() -> None:
    assert world_speed(RealWorld(speed=2.5)) == 2.5
