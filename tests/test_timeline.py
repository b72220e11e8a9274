"""The timeline on a manual clock: events apply in time order (ties in the scenario's order), none before its time."""

from __future__ import annotations

import asyncio

from scenarios.schema import Event, parse_scenario
from scenarios.timeline import in_order, play
from worlds.clock import ManualClock

# Loop iterations a woken task needs to run up to its next await (the clock's future, then the task): a bound,
# not a wait, since a ManualClock only moves when the test advances it.
ITERATIONS = 10

SCENARIO = {
    "name": "order", "speed": 1, "duration_s": 60, "zones": ["a", "b"], "targets_per_zone": 1,
    "timeline": [
        {"at": 20, "zone": "a", "path": {"state": "open"}, "note": "third"},
        {"at": 5, "zone": "a", "path": {"state": "blackhole"}, "note": "first"},
        {"at": 20, "zone": "b", "path": {"state": "refuse"}, "note": "fourth"},
        {"at": 10, "zone": "b", "backend": {"mode": "hang"}, "note": "second"},
    ],
}


def events() -> list[Event]:
    return list(parse_scenario(SCENARIO, "test").timeline)


def test_events_sort_by_time_and_keep_the_scenario_order_at_a_tie() -> None:
    assert [e.note for e in in_order(events())] == ["first", "second", "third", "fourth"]


async def settle() -> None:
    for _ in range(ITERATIONS):
        await asyncio.sleep(0)


async def test_each_event_applies_once_its_time_comes_and_not_before() -> None:
    clock = ManualClock()
    applied: list[tuple[str | None, float]] = []

    async def apply(ev: Event) -> None:
        applied.append((ev.note, clock.now()))

    task = asyncio.create_task(play(events(), clock, apply))
    try:
        await settle()
        assert applied == []
        clock.set(4.99)
        await settle()
        assert applied == []  # not a moment early
        clock.set(5.0)
        await settle()
        assert applied == [("first", 5.0)]
        clock.set(25.0)  # past two times at once: both apply, in order, each once
        await settle()
        assert applied == [("first", 5.0), ("second", 25.0), ("third", 25.0), ("fourth", 25.0)]
        assert task.done() and task.exception() is None
    finally:
        task.cancel()


async def test_an_event_that_fails_ends_the_timeline_there() -> None:
    clock = ManualClock()
    applied: list[str | None] = []

    async def apply(ev: Event) -> None:
        applied.append(ev.note)
        if ev.note == "second":
            raise RuntimeError("refused")

    task = asyncio.create_task(play(events(), clock, apply))
    clock.set(60.0)
    await settle()
    assert task.done() and isinstance(task.exception(), RuntimeError)
    assert applied == ["first", "second"]
