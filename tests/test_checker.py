"""The asyncio checker shell: real loopback backends on a scaled clock, a scripted prober on a manual one.

Timing tolerances: a probe may start later than its due by the event loop's scheduling slack. Asyncio rounds
timer waits up to 1 ms; the measured p99 lateness on this 2-core VM is 1-2.3 ms with rare 15-36 ms spikes
(docs/sources.md#performance); here the backend shares the loop with the checker, and CI may share the
cores with other jobs (with two CPU hogs running we saw 65 ms stalls). So we allow SLACK_WALL_S = 100 ms of
wall time, i.e. SLACK_WALL_S x speed in sim seconds, on top of the schedule's own jitter bounds, which are
checked exactly. Speeds are chosen so that this slack stays well under one interval: a scheduler that missed
a wake-up and slept a whole extra interval would still fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
from collections import Counter
from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp import web

from lb.checker import CheckConfig, CheckerCapacity, NodeChecker, ProbeReport
from lb.targets import ProbeOutcome, Target
from worlds.clock import ManualClock, ScaledClock
from worlds.sim import SimWorld

HOST = "127.0.0.1"
SLACK_WALL_S = 0.100

pytestmark = pytest.mark.timeout(30)


class Reports:
    """Collects reports; tests wait on it for a condition (event-driven, with a deadline)."""

    def __init__(self) -> None:
        self.items: list[ProbeReport] = []
        self._changed = asyncio.Event()

    def __call__(self, report: ProbeReport) -> None:
        self.items.append(report)
        self._changed.set()

    async def wait_for(self, pred: Callable[[list[ProbeReport]], bool], limit_s: float = 10.0) -> None:
        async with asyncio.timeout(limit_s):
            while not pred(self.items):
                self._changed.clear()
                await self._changed.wait()

    def of(self, target_id: str) -> list[ProbeReport]:
        return [r for r in self.items if r.target_id == target_id]


async def until(pred: Callable[[], bool], limit_s: float = 5.0) -> None:
    """Poll a condition that has no event of its own (fd counts, in-flight gauges), with a deadline."""
    async with asyncio.timeout(limit_s):
        while not pred():  # noqa: ASYNC110 - there is no event to wait on for these conditions
            await asyncio.sleep(0.002)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextlib.asynccontextmanager
async def aiohttp_backends(n: int) -> AsyncIterator[tuple[list[int], Counter[int]]]:
    """One aiohttp app serving GET /health on `n` ports; yields the ports and a per-port request count."""
    hits: Counter[int] = Counter()

    async def health(request: web.Request) -> web.Response:
        hits[request.transport.get_extra_info("sockname")[1]] += 1  # type: ignore[union-attr]
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        for _ in range(n):
            await web.TCPSite(runner, HOST, 0).start()
        ports = [addr[1] for addr in runner.addresses]
        yield ports, hits
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def raw_backend(answer: bytes | None) -> AsyncIterator[int]:
    """An asyncio server that answers every request with `answer`, or hangs when it is None."""
    conns: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        conns.add(task)
        try:
            await reader.readuntil(b"\r\n\r\n")
            if answer is None:
                await reader.read()
            else:
                writer.write(answer)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the probe resets connections once it has its verdict
        except asyncio.CancelledError:
            pass  # shutting the test server down; asyncio's stream callback would log a cancelled handler
        finally:
            conns.discard(task)
            writer.transport.abort()

    server = await asyncio.start_server(handle, HOST, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for t in list(conns):
            t.cancel()
        await asyncio.gather(*conns, return_exceptions=True)
        await server.wait_closed()


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


def targets(ports: list[int]) -> list[Target]:
    return [Target(f"t{i}", "a", HOST, p) for i, p in enumerate(ports)]


async def test_probes_follow_the_interval_against_aiohttp_backends() -> None:
    speed, interval, jitter, n, rounds = 2.5, 1.0, 0.1, 5, 6  # an interval is 400 ms of wall time
    slack = SLACK_WALL_S * speed
    clock = ScaledClock(speed=speed)
    reports = Reports()
    config = CheckConfig(interval_s=interval, timeout_s=0.9, jitter=jitter)
    async with aiohttp_backends(n) as (ports, hits):
        checker = NodeChecker("a", clock, config, CheckerCapacity(), reports, seed=1)
        added_at = clock.now()
        for t in targets(ports):
            checker.add_target(t)
        added_by = clock.now()
        checker.start()
        try:

            def enough(items: list[ProbeReport]) -> bool:
                per_target = Counter(r.target_id for r in items)
                return len(per_target) == n and min(per_target.values()) >= rounds

            await reports.wait_for(enough)
        finally:
            await checker.stop()
    assert all(r.outcome == ProbeOutcome.SUCCESS and not r.late for r in reports.items)
    assert sum(hits.values()) == len(reports.items)  # each probe reached a real server, exactly once
    assert set(hits) == set(ports)
    for i in range(n):
        rs = reports.of(f"t{i}")
        assert added_at <= rs[0].due < added_by + interval  # the first probe is due within one interval
        for a, b in itertools.pairwise(rs):
            # planned gaps obey the jitter exactly; actual starts add at most the loop's slack
            assert interval * (1 - jitter) - 1e-9 <= b.due - a.due <= interval * (1 + jitter) + 1e-9
            assert interval * (1 - jitter) - slack <= b.started - a.started <= interval * (1 + jitter) + slack
        for r in rs:
            # a probe may start up to one wake-up tick early (the checker batches wake-ups), never later than slack
            assert -checker.lookahead_s - 1e-9 <= r.lateness_s <= slack
            assert r.finished >= r.started and r.duration_s == pytest.approx(r.finished - r.started)


async def test_too_small_start_rate_reports_growing_lateness_and_late_timeouts() -> None:
    speed, interval, timeout, rate = 4.0, 1.0, 0.8, 10.0  # the timeout is 200 ms of wall time
    clock = ScaledClock(speed=speed)
    reports = Reports()
    config = CheckConfig(interval_s=interval, timeout_s=timeout, jitter=0.0)
    capacity = CheckerCapacity(max_per_second=rate, burst=1.0)  # 15 targets need 15 starts/s
    async with raw_backend(OK) as port:
        checker = NodeChecker("a", clock, config, capacity, reports, seed=2)
        for i in range(15):
            checker.add_target(Target(f"t{i}", "a", HOST, port))
        checker.start()
        try:
            await reports.wait_for(lambda items: sum(r.late for r in items) >= 10)
        finally:
            await checker.stop()
    items = reports.items
    late = [r for r in items if r.late]
    sent = [r for r in items if not r.late]
    assert all(r.outcome == ProbeOutcome.TIMEOUT and r.lateness_s >= timeout - 1e-9 for r in late)
    assert all(r.duration_s == 0.0 and r.started == r.finished for r in late)
    assert all(r.lateness_s < timeout for r in sent)
    # (a sent probe may itself time out if the machine stalls for its 200 ms of wall time)
    assert sum(r.outcome == ProbeOutcome.SUCCESS for r in sent) >= len(sent) // 2
    # lateness grows while the checker falls behind: from about zero to past the timeout
    sent.sort(key=lambda r: r.started)
    assert max(r.lateness_s for r in sent) > min(r.lateness_s for r in sent[:5]) + timeout / 2
    # and the start rate holds exactly: the bucket is refilled from the same sim clock the reports use
    starts = sorted(r.started for r in items)
    for i, a in enumerate(starts):
        for j in range(i, len(starts)):
            assert j - i + 1 <= 1.0 + rate * (starts[j] - a) + 1e-6


async def test_in_flight_limit_with_hanging_backend() -> None:
    speed, timeout = 10.0, 0.3
    clock = ScaledClock(speed=speed)
    reports = Reports()
    config = CheckConfig(interval_s=1.0, timeout_s=timeout, jitter=0.1)
    peak = 0

    def on_report(r: ProbeReport) -> None:
        nonlocal peak
        peak = max(peak, checker.in_flight)
        reports(r)

    async with raw_backend(None) as port:
        checker = NodeChecker("a", clock, config, CheckerCapacity(max_in_flight=2), on_report, seed=3)
        for i in range(10):  # 10 probes per sim second; 2 slots x 1/0.3 s can only do ~6.7
            checker.add_target(Target(f"t{i}", "a", HOST, port))
        checker.start()
        try:

            async def sample() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, checker.in_flight)
                    await asyncio.sleep(0.001)

            sampler = asyncio.create_task(sample())
            await reports.wait_for(lambda items: sum(r.late for r in items) >= 5 and len(items) >= 10)
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
        finally:
            await checker.stop()
    assert peak <= 2
    sent = [r for r in reports.items if not r.late]
    assert all(r.outcome == ProbeOutcome.TIMEOUT for r in reports.items)
    # (uvloop's millisecond timers can fire up to 1 ms of wall time early)
    assert all(timeout - 0.002 * speed <= r.duration_s <= timeout + SLACK_WALL_S * speed for r in sent)


async def test_stop_leaves_no_tasks_and_no_sockets() -> None:
    clock = ScaledClock(speed=10.0)
    async with raw_backend(None) as port:
        before_tasks = asyncio.all_tasks()
        before_fds = open_fds()
        checker = NodeChecker("a", clock, CheckConfig(interval_s=1.0, timeout_s=0.9), CheckerCapacity(), Reports())
        for i in range(10):
            checker.add_target(Target(f"t{i}", "a", HOST, port))
        checker.start()
        with pytest.raises(RuntimeError):
            checker.start()
        await until(lambda: checker.in_flight >= 3)
        await checker.stop()
        assert not checker.running
        # (the backend's own handler tasks may still be processing the probes' resets)
        new_tasks = asyncio.all_tasks() - before_tasks
        leftover = [t for t in new_tasks if "NodeChecker" in getattr(t.get_coro(), "__qualname__", "")]
        assert leftover == []
        assert checker.in_flight == 0
        # probe sockets are closed at once; the backend's side closes when it has read their resets
        await until(lambda: open_fds() <= before_fds, limit_s=2.0)
        await checker.stop()  # idempotent


async def test_adding_a_target_wakes_an_idle_scheduler() -> None:
    speed, interval = 2.5, 1.0
    clock = ScaledClock(speed=speed)
    reports = Reports()
    async with raw_backend(OK) as port:
        checker = NodeChecker("a", clock, CheckConfig(interval_s=interval, timeout_s=0.9), CheckerCapacity(), reports)
        checker.start()  # no targets: the scheduler sleeps with no deadline at all
        await asyncio.sleep(0)
        added_at = clock.now()
        checker.add_target(Target("x", "a", HOST, port))
        try:
            await reports.wait_for(lambda items: len(items) >= 1, limit_s=5.0)
        finally:
            await checker.stop()
    r = reports.items[0]
    assert r.outcome == ProbeOutcome.SUCCESS
    assert added_at <= r.due < added_at + interval
    assert r.lateness_s <= SLACK_WALL_S * speed


async def test_remove_target_cancels_its_probe_without_a_report() -> None:
    clock = ScaledClock(speed=10.0)
    reports = Reports()
    async with raw_backend(None) as port:
        fds = open_fds()
        checker = NodeChecker("a", clock, CheckConfig(interval_s=1.0, timeout_s=0.9), CheckerCapacity(), reports)
        checker.add_target(Target("x", "a", HOST, port))
        checker.start()
        try:
            await until(lambda: checker.in_flight == 1)
            checker.remove_target("x")
            checker.remove_target("x")  # unknown ids are ignored
            await until(lambda: checker.in_flight == 0)
            await until(lambda: open_fds() <= fds, limit_s=2.0)
        finally:
            await checker.stop()
    assert reports.items == []


async def test_tcp_checks_on_the_health_port() -> None:
    clock = ScaledClock(speed=4.0)
    reports = Reports()
    with socket.socket() as closed:
        closed.bind((HOST, 0))  # the traffic port refuses connections...
        traffic_port = closed.getsockname()[1]
        async with raw_backend(None) as health_port:  # ...the health port accepts them
            config = CheckConfig(protocol="tcp", port=health_port, interval_s=1.0, timeout_s=0.9)
            checker = NodeChecker("a", clock, config, CheckerCapacity(), reports)
            checker.add_target(Target("x", "a", HOST, traffic_port))
            checker.add_target(Target("y", "a", "localhost", traffic_port))  # a name: resolved per probe
            checker.start()
            try:
                await reports.wait_for(lambda items: len(items) >= 4 and {r.target_id for r in items} == {"x", "y"})
            finally:
                await checker.stop()
    assert {r.outcome for r in reports.of("x")} == {ProbeOutcome.SUCCESS}
    # the prober connects to the name's first address; our listener only has 127.0.0.1
    first = socket.getaddrinfo("localhost", None, type=socket.SOCK_STREAM)[0][4][0]
    expected = ProbeOutcome.SUCCESS if first == HOST else ProbeOutcome.REFUSED
    assert {r.outcome for r in reports.of("y")} == {expected}


def test_checker_argument_validation() -> None:
    with pytest.raises(ValueError, match="wake_grid_s_loop"):
        NodeChecker("a", ScaledClock(), CheckConfig(), CheckerCapacity(), Reports(), wake_grid_s_loop=-1.0)


# -- manual clock and a scripted prober: exact, deterministic shell behaviour -------------------------------


class Gate:
    """A scripted prober: every probe waits until the test releases it with an outcome."""

    def __init__(self) -> None:
        self.waiting: list[tuple[int, asyncio.Future[ProbeOutcome]]] = []

    async def __call__(self, host: str, port: int, timeout_s_loop: float) -> ProbeOutcome:
        fut: asyncio.Future[ProbeOutcome] = asyncio.get_running_loop().create_future()
        self.waiting.append((port, fut))
        return await fut

    def release(self, outcome: ProbeOutcome = ProbeOutcome.SUCCESS) -> None:
        _, fut = self.waiting.pop(0)
        fut.set_result(outcome)


async def test_manual_clock_late_timeouts_and_durations() -> None:
    clock = ManualClock()
    reports = Reports()
    gate = Gate()
    config = CheckConfig(interval_s=10.0, timeout_s=2.0, jitter=0.0)
    checker = NodeChecker("z", clock, config, CheckerCapacity(max_in_flight=1), reports, prober=gate)
    checker.add_target(Target("a", "z", HOST, 1))
    checker.add_target(Target("b", "z", HOST, 2))
    due = {t: checker.schedule.due_of(t) for t in ("a", "b")}
    first, second = sorted(due, key=due.__getitem__)
    checker.start()
    try:
        clock.set(max(due.values()))
        await until(lambda: len(gate.waiting) == 1)  # one slot: the second probe waits
        assert checker.in_flight == 1
        clock.set(due[second] + 2.0)  # the waiting probe is now as late as its timeout
        await reports.wait_for(lambda items: len(items) == 1)
        late = reports.items[0]
        assert (late.target_id, late.outcome, late.late) == (second, ProbeOutcome.TIMEOUT, True)
        assert late.lateness_s == pytest.approx(2.0) and late.duration_s == 0.0
        clock.advance(0.5)
        gate.release(ProbeOutcome.FAILURE)
        await reports.wait_for(lambda items: len(items) == 2)
        done = reports.items[1]
        assert (done.target_id, done.outcome, done.late) == (first, ProbeOutcome.FAILURE, False)
        assert done.started == pytest.approx(max(due.values()))
        assert done.finished == pytest.approx(due[second] + 2.5)
        # jitter 0: each target's next probe is due exactly one interval after the previous one
        assert checker.schedule.due_of(first) == pytest.approx(due[first] + 10.0)
        assert checker.schedule.due_of(second) == pytest.approx(due[second] + 10.0)
    finally:
        await checker.stop()
    assert not gate.waiting or all(f.cancelled() for _, f in gate.waiting)


async def test_a_freed_slot_wakes_the_scheduler_at_once() -> None:
    clock = ManualClock()
    reports = Reports()
    gate = Gate()
    config = CheckConfig(interval_s=10.0, timeout_s=5.0, jitter=0.0)
    checker = NodeChecker("z", clock, config, CheckerCapacity(max_in_flight=1), reports, prober=gate)
    checker.add_target(Target("a", "z", HOST, 1))
    checker.add_target(Target("b", "z", HOST, 2))
    both_due = max(checker.schedule.due_of("a"), checker.schedule.due_of("b"))
    checker.start()
    try:
        clock.set(both_due)
        await until(lambda: len(gate.waiting) == 1)
        clock.advance(1.0)  # the waiting probe is 1 s late, not yet late enough to be a late timeout
        gate.release()
        # the clock stands still: only the finish's wake-up can start the second probe
        await until(lambda: len(gate.waiting) == 1)
        gate.release()
        await reports.wait_for(lambda items: len(items) == 2)
    finally:
        await checker.stop()
    second = reports.items[1]
    assert not second.late and second.started == pytest.approx(both_due + 1.0)


async def test_manual_clock_charge_delays_the_next_probe() -> None:
    clock = ManualClock()
    reports = Reports()
    gate = Gate()
    config = CheckConfig(interval_s=10.0, timeout_s=100.0, jitter=0.0)
    capacity = CheckerCapacity(max_per_second=1.0, burst=1.0, transition_cost=15.0)
    checker = NodeChecker("z", clock, config, capacity, reports, prober=gate)
    checker.add_target(Target("a", "z", HOST, 1))
    due = checker.schedule.due_of("a")
    checker.start()
    try:
        clock.set(due)
        await until(lambda: len(gate.waiting) == 1)
        gate.release()
        await reports.wait_for(lambda items: len(items) == 1)
        checker.charge(capacity.transition_cost)  # 0 tokens - 15: the next start needs 16 s of refill
        assert checker.schedule.next_wakeup(clock.now()) == pytest.approx(due + 16.0)
        clock.set(due + 10.0)  # the next probe's due: no token yet
        clock.set(due + 16.0)
        await until(lambda: len(gate.waiting) == 1)
        gate.release()
        await reports.wait_for(lambda items: len(items) == 2)
    finally:
        await checker.stop()
    assert reports.items[1].due == pytest.approx(due + 10.0)
    assert reports.items[1].started == pytest.approx(due + 16.0)
    assert reports.items[1].lateness_s == pytest.approx(6.0)


async def test_callback_and_prober_errors_do_not_stop_the_checker(caplog: pytest.LogCaptureFixture) -> None:
    clock = ManualClock()
    seen: list[ProbeReport] = []
    calls = 0

    async def flaky(host: str, port: int, timeout_s_loop: float) -> ProbeOutcome:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("scripted prober bug")
        return ProbeOutcome.SUCCESS

    def on_report(r: ProbeReport) -> None:
        seen.append(r)
        if len(seen) == 1:
            raise ValueError("callback bug")

    config = CheckConfig(interval_s=10.0, timeout_s=5.0, jitter=0.0)
    checker = NodeChecker("z", clock, config, CheckerCapacity(), on_report, prober=flaky)
    checker.add_target(Target("a", "z", HOST, 1))
    due = checker.schedule.due_of("a")
    checker.start()
    try:
        with caplog.at_level(logging.ERROR, logger="lb.checker"):
            for k in range(3):
                clock.set(due + 10.0 * k)
                await until(lambda k=k: calls == k + 1 and checker.in_flight == 0)  # type: ignore[misc]
        await until(lambda: len(seen) == 2)
    finally:
        await checker.stop()
    assert "scripted prober bug" in caplog.text and "callback bug" in caplog.text
    assert [r.outcome for r in seen] == [ProbeOutcome.SUCCESS, ProbeOutcome.SUCCESS]


@pytest.mark.timeout(30)
def test_with_every_slot_held_the_next_probe_is_a_late_timeout_on_time_in_virtual_time() -> None:
    """One slot, held by a probe that never ends: the other target's probes can only be reported as late
    timeouts, one timeout after they were due (plus at most the wake-up grid's tick). The scheduler wakes a
    lookahead early and finds nothing to start; it must then sleep until the head is late, not look again at
    once: on a virtual clock, which moves only while everyone waits, that would spin at one instant forever
    (this test would then hang)."""
    world = SimWorld(seed=1)
    config = CheckConfig(interval_s=1.0, timeout_s=0.5, jitter=0.0)
    reports = Reports()
    lookahead: list[float] = []

    async def holds_forever(host: str, port: int, timeout_loop_s: float) -> ProbeOutcome:
        await asyncio.get_running_loop().create_future()
        raise AssertionError("unreachable")

    async def body() -> None:
        checker = NodeChecker("z", world.clock, config, CheckerCapacity(max_in_flight=1), reports,
                              prober=holds_forever)
        lookahead.append(checker.lookahead_s)
        for t in targets([1, 2]):
            checker.add_target(t)
        checker.start()
        try:
            await reports.wait_for(lambda items: len(items) >= 5, limit_s=30.0)
        finally:
            await checker.stop()

    world.run(body())
    assert lookahead[0] > 0  # the scheduler does wake early, which is what could spin
    assert len({r.target_id for r in reports.items}) == 1  # the other target holds the only slot
    assert all(r.late and r.outcome is ProbeOutcome.TIMEOUT for r in reports.items)
    assert all(config.timeout_s <= r.lateness_s < config.timeout_s + lookahead[0] for r in reports.items)
