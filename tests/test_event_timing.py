"""A timeline event's changes take effect together at its `at`, on every target, at a high speed, on real sockets.

"At its `at`" is measured in loop iterations rather than in a fixed number of milliseconds: at 20 sim seconds per
wall second one blocked iteration of a busy (or CPU-starved) loop is easily a sim second long, and no change can
land inside an iteration that has not run. What the runner must not do is take further iterations, or wall time,
per target. A callback that reschedules itself with call_soon stamps every iteration's sim time.
"""

from __future__ import annotations

import asyncio
import bisect
import json
from pathlib import Path
from typing import Any

import pytest
from support import LOOPS, run_on, wait_for

from backends.fleet import TargetInfo
from scenarios.runner import ScenarioRun
from scenarios.schema import parse_scenario
from worlds.base import Clock

pytestmark = pytest.mark.timeout(60)

HOST = "127.0.0.1"
SPEED = 20
TARGETS = ["a-0", "a-1", "a-2", "b-0", "b-1", "b-2"]
AT = 1.0
# The loop clock's tick, wall s: uvloop counts whole milliseconds and rounds each delay to one, so a timer
# fires up to 1.5 ms after its time (clock.sleep_until sleeps again for the rest of an early one); asyncio's
# epoll waits are rounded up to a millisecond.
CLOCK_TICK_WALL_S = 0.002
# Loop iterations from the first one past `at` + a clock tick until every change has taken effect: the timer
# may be seen one iteration late (the loop checks timers before it runs the iteration's callbacks), asyncio
# wakes the timeline's task one iteration after its timer (a future's callbacks are scheduled), the timeline
# starts every change of the event in the next one, and the changes' own iteration ends at the next stamp.
ITERATIONS = 4
BASE: dict[str, Any] = {
    "name": "timing",
    "speed": SPEED,
    # Long: the test stops the run once it has checked the wire, so a lagging loop cannot end the run first.
    "duration_s": 60,
    "zones": ["a", "b"],
    "targets_per_zone": 3,
    "health_check": {"interval_s": 1, "timeout_s": 0.5, "healthy_threshold": 2, "unhealthy_threshold": 2},
    "traffic": {"rate_per_s": 10, "timeout_s": 1, "dns_ttl_s": 2},
}


class LoopTicks:
    """The sim time of every loop iteration while it runs."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.stamps: list[float] = []
        self._handle: asyncio.Handle | None = None

    def start(self) -> None:
        self._handle = asyncio.get_running_loop().call_soon(self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        self.stamps.append(self.clock.now())
        self._handle = asyncio.get_running_loop().call_soon(self._tick)

    def deadline(self, at: float, iterations: int) -> float:
        """The sim time by which `iterations` loop iterations have passed since `at` (and a clock tick)."""
        first = bisect.bisect_left(self.stamps, at + self.clock.to_sim(CLOCK_TICK_WALL_S))
        assert first + iterations < len(self.stamps), "the loop stopped being stamped too early"
        return self.stamps[first + iterations]


async def connect_outcome(port: int, timeout_s: float) -> str:
    """How a TCP connect to the port ends within `timeout_s` wall seconds: connected, refused or timeout."""
    try:
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(HOST, port)
    except TimeoutError:
        return "timeout"
    except ConnectionRefusedError:
        return "refused"
    writer.close()
    return "connected"


@pytest.mark.parametrize("loop_kind", list(LOOPS))
@pytest.mark.parametrize(("path", "on_the_wire"), [
    ({"state": "blackhole"}, "timeout"),
    ({"state": "refuse"}, "refused"),
    ({"state": "flap", "loss": 1.0}, "connected"),  # lost after the handshake
    ({"state": "latency", "latency_s": 0.5}, "connected"),
])
def test_every_target_of_an_event_changes_at_its_time(
    loop_kind: str, path: dict[str, Any], on_the_wire: str, tmp_path: Path
) -> None:
    """Six targets' paths change at t = 1 at speed 20, while the load balancer probes them (a probe's connect
    taking the blackhole's only queue slot first is what made the change wait 0.2 s per target)."""
    sc = parse_scenario({**BASE, "timeline": [{"at": AT, "targets": TARGETS, "path": path}]}, "timing")
    run = ScenarioRun(sc, source="timing")
    seen: list[str] = []
    infos: list[TargetInfo] = []

    async def body() -> None:
        stop = asyncio.Event()
        ticks: list[LoopTicks] = []

        def started(_ports: dict[str, Any]) -> None:
            ticks.append(LoopTicks(run.clock))
            ticks[0].start()

        async def check_the_wire() -> None:
            # Bounded by the run's set-up, which ends before t = 0, plus AT sim seconds.
            await wait_for(lambda: "applied_at" in run.last_applied, within=30.0)
            assert run.system is not None
            infos.extend(run.system.fleet.info(t) for t in TARGETS)
            ports = [info.port for info in infos]
            # A connect that a health check would give up on (its timeout) must not get through.
            timeout = run.clock.to_loop(sc.health_check.timeout_s)
            seen.extend(await asyncio.gather(*(connect_outcome(p, timeout) for p in ports)))
            stop.set()

        run.on_started = started
        checker = asyncio.create_task(check_the_wire())
        try:
            summary = await run.run(stop)
        except BaseException:
            checker.cancel()
            raise
        finally:
            if ticks:
                ticks[0].stop()
        await checker
        run.write(tmp_path, summary)

        [event] = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()
                   if json.loads(line)["kind"] == "timeline"]
        assert event["at"] == AT and event["targets"] == TARGETS
        assert {info.path.state.value for info in infos} == {path["state"]}
        assert list(event["applied_at"]) == TARGETS
        deadline = ticks[0].deadline(AT, ITERATIONS)
        late = {t: applied for t, applied in event["applied_at"].items() if not AT <= applied <= deadline}
        assert not late, f"applied outside [{AT}, {deadline:.4f}] ({ITERATIONS} loop iterations): {late}"

    run_on(loop_kind, body)
    assert seen == [on_the_wire] * len(TARGETS)
