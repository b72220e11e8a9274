"""The pure probe schedule, driven step by step with a manual `now`: interval, jitter, capacity, lateness."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.checker import CheckConfig, CheckerCapacity, DueProbe, ProbeSchedule


def make(
    interval: float = 10.0,
    timeout: float = 2.0,
    jitter: float = 0.0,
    max_in_flight: int = 1000,
    rate: float = 1000.0,
    burst: float | None = None,
    seed: int = 1,
) -> ProbeSchedule:
    return ProbeSchedule(interval, timeout, jitter, max_in_flight, rate, burst, random.Random(seed))


@dataclass
class Sim:
    """Drives a schedule like the asyncio shell does, in virtual time: jump to each wakeup (or to the next
    probe completion), pop what is due, finish each started probe `duration` later."""

    schedule: ProbeSchedule
    duration: float = 0.0
    now: float = 0.0
    started: list[tuple[float, DueProbe]] = field(default_factory=list)
    ends: list[tuple[float, str]] = field(default_factory=list)
    max_in_flight_seen: int = 0

    def run_until(self, end: float) -> None:
        while True:
            self._finish_ended()
            for item in self.schedule.pop_due(self.now):
                self.started.append((self.now, item))
                if not item.late:
                    self.ends.append((self.now + self.duration, item.target_id))
            self.max_in_flight_seen = max(self.max_in_flight_seen, self.schedule.in_flight)
            wake = self.schedule.next_wakeup(self.now)
            candidates = [t for t in (wake, min((e for e, _ in self.ends), default=None)) if t is not None]
            nxt = min(candidates, default=math.inf)
            if nxt > end:
                self.now = end
                self._finish_ended()
                return
            assert nxt >= self.now, "a wakeup in the past would make the shell spin"
            self.now = nxt

    def _finish_ended(self) -> None:
        done = [e for e in self.ends if e[0] <= self.now]
        self.ends = [e for e in self.ends if e[0] > self.now]
        for _, target in done:
            self.schedule.finish(target)

    def starts_of(self, target: str) -> list[tuple[float, DueProbe]]:
        return [(t, p) for t, p in self.started if p.target_id == target]


def test_first_due_is_uniform_within_one_interval() -> None:
    s = make(interval=10.0, seed=3)
    dues = [s.add(f"t{i}", now=100.0) for i in range(2000)]
    assert all(100.0 <= d < 110.0 for d in dues)
    # spread, not clumped: each tenth of the interval gets a fair share
    buckets = [0] * 10
    for d in dues:
        buckets[int(d - 100.0)] += 1
    assert min(buckets) > 120 and max(buckets) < 280


def test_interval_respected_without_jitter() -> None:
    sim = Sim(make(interval=10.0, jitter=0.0), duration=0.5)
    sim.schedule.add("a", 0.0)
    sim.run_until(200.0)
    starts = sim.starts_of("a")
    assert len(starts) >= 19
    dues = [p.due for _, p in starts]
    assert all(math.isclose(b - a, 10.0) for a, b in itertools.pairwise(dues))
    assert all(t == p.due and not p.late for t, p in starts)  # capacity to spare: never late


def test_jitter_bounds_and_spread() -> None:
    interval, jitter = 10.0, 0.2
    sim = Sim(make(interval=interval, jitter=jitter, seed=7), duration=0.1)
    for i in range(20):
        sim.schedule.add(f"t{i}", 0.0)
    sim.run_until(2000.0)
    gaps: list[float] = []
    for i in range(20):
        dues = [p.due for _, p in sim.starts_of(f"t{i}")]
        gaps += [b - a for a, b in itertools.pairwise(dues)]
    assert len(gaps) > 3000
    assert all(interval * (1 - jitter) - 1e-9 <= g <= interval * (1 + jitter) + 1e-9 for g in gaps)
    # uniform: the mean is the interval and both ends of the range are reached
    assert abs(sum(gaps) / len(gaps) - interval) < 0.05
    assert min(gaps) < interval * (1 - 0.9 * jitter) and max(gaps) > interval * (1 + 0.9 * jitter)


def test_same_seed_same_schedule() -> None:
    def dues(seed: int) -> list[float]:
        sim = Sim(make(jitter=0.3, seed=seed), duration=0.2)
        for i in range(5):
            sim.schedule.add(f"t{i}", 0.0)
        sim.run_until(100.0)
        return [p.due for _, p in sim.started]

    assert dues(11) == dues(11)
    assert dues(11) != dues(12)


def test_in_flight_limit_and_late_timeouts_without_slots() -> None:
    s = make(interval=10.0, timeout=2.0, max_in_flight=5)
    for i in range(50):
        s.add(f"t{i}", 0.0)
    first = s.pop_due(10.0)  # all 50 are due; only 5 slots, nobody is late yet (lateness <= 10 - due < ...)
    running = [p for p in first if not p.late]
    assert len(running) == 5 and s.in_flight == 5
    assert all(10.0 - p.due < 2.0 for p in running)
    # the rest had lateness >= timeout: they came back as late timeouts, taking no slot
    late = [p for p in first if p.late]
    assert all(10.0 - p.due >= 2.0 for p in late)
    assert len(first) == len(running) + len(late)
    # nothing changes until a slot frees or the next head becomes late
    wake = s.next_wakeup(10.0)
    assert wake is not None and wake > 10.0
    assert s.pop_due(10.0) == []
    assert s.finish(running[0].target_id) is True  # a slot freed while probes were waiting
    again = s.pop_due(10.0)
    assert len([p for p in again if not p.late]) == 1 and s.in_flight == 5


def test_wakeup_when_saturated_is_when_the_head_turns_late() -> None:
    s = make(interval=1.0, timeout=2.0, max_in_flight=1)  # both first dues fall within 1 s: neither is late
    s.add("a", 0.0)
    s.add("b", 0.0)
    due_a, due_b = s.due_of("a"), s.due_of("b")
    first, second = sorted([("a", due_a), ("b", due_b)], key=lambda x: x[1])
    assert [p.target_id for p in s.pop_due(second[1])] == [first[0]]
    assert s.next_wakeup(second[1]) == pytest.approx(second[1] + 2.0)
    out = s.pop_due(second[1] + 2.0)
    assert out == [DueProbe(second[0], second[1], True)]
    assert s.in_flight == 1


def test_rate_limit_spaces_starts() -> None:
    s = make(interval=10.0, timeout=100.0, rate=2.0, burst=1.0)
    for i in range(10):
        s.add(f"t{i}", 0.0)
    now, starts = 10.0, []
    for _ in range(10):
        got = s.pop_due(now)
        for p in got:
            s.finish(p.target_id)
        starts += [now] * len(got)
        wake = s.next_wakeup(now)
        assert wake is not None
        now = wake
    assert starts[:3] == [10.0, 10.5, 11.0]  # one start per 1/rate once the burst of 1 is spent


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 60),
    max_in_flight=st.integers(1, 10),
    rate=st.floats(0.5, 50.0),
    burst=st.one_of(st.none(), st.floats(1.0, 20.0)),
    duration=st.floats(0.0, 5.0),
    seed=st.integers(0, 2**16),
)
def test_capacity_never_exceeded(
    n: int, max_in_flight: int, rate: float, burst: float | None, duration: float, seed: int
) -> None:
    sched = make(interval=3.0, timeout=1.0, jitter=0.3, max_in_flight=max_in_flight, rate=rate, burst=burst, seed=seed)
    sim = Sim(sched, duration=duration)
    rng = random.Random(seed)
    for i in range(n):
        sim.schedule.add(f"t{i}", rng.uniform(0, 1))
    sim.run_until(30.0)
    assert sim.max_in_flight_seen <= max_in_flight
    depth = sched.burst
    times = sorted(t for t, _ in sim.started)
    # token bucket: any window [a, b] holds at most burst + rate * (b - a) starts (late ones included)
    for i, a in enumerate(times):
        for j in range(i, len(times)):
            assert j - i + 1 <= depth + rate * (times[j] - a) + 1e-6
    for t, p in sim.started:
        assert t >= p.due
        assert p.late == (t - p.due >= 1.0 - 1e-9)


def test_saturation_grows_lateness_then_late_timeouts() -> None:
    # 40 targets every 10 s need 4 starts/s; the checker can do 3.5/s, so lateness grows by about 1/8 s per
    # second until probes start past their 6 s timeout (near t = 50) and turn into late timeouts. Late ones
    # still take a token, so from then on the backlog never drains: the congestive collapse of research 2.3.
    sim = Sim(make(interval=10.0, timeout=6.0, jitter=0.1, rate=3.5, burst=1.0), duration=0.1)
    for i in range(40):
        sim.schedule.add(f"t{i}", 0.0)
    sim.run_until(120.0)
    lateness = [(t, t - p.due) for t, p in sim.started]
    early = [lat for t, lat in lateness if t < 15.0]
    middle = [lat for t, lat in lateness if 30.0 <= t < 40.0]
    assert max(early) < 3.0 and min(middle) > max(early)  # lateness keeps growing
    late = [(t, p) for t, p in sim.started if p.late]
    assert late, "a saturated checker must produce late timeouts"
    assert all(t - p.due >= 6.0 for t, p in late)
    assert min(t for t, _ in late) > 30.0
    assert all(p.late for t, p in sim.started if t > 80.0)
    # the memory stays one planned probe per target, however far behind
    assert len(sim.schedule) == 40
    # and the rate limit still holds over the whole run
    assert len(sim.started) <= 1.0 + 3.5 * 120.0


def test_charge_delays_probes() -> None:
    s = make(interval=10.0, timeout=100.0, rate=1.0, burst=1.0)
    s.add("a", 0.0)
    due = s.due_of("a")
    s.charge(5.0, due)  # 1 token - 5 = -4: a probe needs 5 s of refill
    assert s.pop_due(due) == []
    assert s.next_wakeup(due) == pytest.approx(due + 5.0)
    assert s.pop_due(due + 4.9) == []
    out = s.pop_due(due + 5.0)
    assert [p.target_id for p in out] == ["a"]
    with pytest.raises(ValueError):
        s.charge(-1.0, due)


def test_no_second_probe_while_one_runs() -> None:
    s = make(interval=1.0, timeout=5.0)  # a timeout longer than the interval makes overlap possible
    s.add("a", 0.0)
    due = s.due_of("a")
    assert [p.target_id for p in s.pop_due(due)] == ["a"]
    nxt = s.due_of("a")
    assert nxt == pytest.approx(due + 1.0)
    # the next probe is due but the first still runs: it waits, it does not pile up
    assert s.pop_due(due + 3.5) == []
    assert len(s) == 1 and s.in_flight == 1
    assert s.finish("a") is True  # its own probe ended: the waiting one may go
    out = s.pop_due(due + 3.5)
    assert out == [DueProbe("a", nxt, False)]
    assert (due + 3.5) - nxt == pytest.approx(2.5)  # and it started late by the overlap


def test_remove_and_readd() -> None:
    s = make(interval=10.0)
    s.add("a", 0.0)
    s.add("b", 0.0)
    s.remove("a")
    assert "a" not in s and len(s) == 1
    out = s.pop_due(10.0)
    assert [p.target_id for p in out] == ["b"]
    assert s.add("a", 50.0) >= 50.0
    assert s.add("a", 70.0) == s.due_of("a")  # re-adding a known target changes nothing
    # a removed target's running probe still holds its slot until finished
    s2 = make(interval=10.0, max_in_flight=1)
    s2.add("x", 0.0)
    due = s2.due_of("x")
    assert s2.pop_due(due) == [DueProbe("x", due, False)]
    s2.remove("x")
    assert s2.in_flight == 1
    s2.finish("x")
    assert s2.in_flight == 0
    assert s2.finish("x") is False  # idempotent


def test_next_wakeup_cases() -> None:
    s = make(interval=10.0, rate=1.0, burst=1.0)
    assert s.next_wakeup(0.0) is None
    s.add("a", 0.0)
    assert s.next_wakeup(0.0) == s.due_of("a")
    s.remove("a")
    assert s.next_wakeup(0.0) is None  # stale entries are skipped


def test_unlimited_rate() -> None:
    s = make(interval=10.0, rate=math.inf, max_in_flight=10_000)
    for i in range(5000):
        s.add(f"t{i}", 0.0)
    assert len(s.pop_due(10.0)) == 5000
    s.charge(1e9, 10.0)
    assert s.tokens(10.0) == math.inf


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"interval_s": 0.0}, "interval_s"),
        ({"interval_s": math.inf}, "interval_s"),
        ({"timeout_s": -1.0}, "timeout_s"),
        ({"jitter": 1.0}, "jitter"),
        ({"jitter": -0.1}, "jitter"),
        ({"protocol": "udp"}, "protocol"),
        ({"port": 0}, "port"),
        ({"path": "health"}, "path"),
        ({"path": "/a b"}, "path"),
        ({"path": "/x\r\nEvil: 1"}, "path"),
        ({"host_header": "a b"}, "host_header"),
        ({"interval_s": "10s"}, "interval_s"),
        ({"jitter": True}, "jitter"),
        ({"success_codes": frozenset()}, "success_codes"),
        ({"success_codes": frozenset({99})}, "success_codes"),
    ],
)
def test_check_config_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CheckConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_in_flight": 0}, "max_in_flight"),
        ({"max_per_second": 0.0}, "max_per_second"),
        ({"burst": 0.5}, "burst"),
        ({"transition_cost": -1.0}, "transition_cost"),
        ({"transition_cost": math.nan}, "transition_cost"),
    ],
)
def test_capacity_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CheckerCapacity(**kwargs)  # type: ignore[arg-type]


def test_defaults_are_aws_http_defaults() -> None:
    c = CheckConfig()
    assert (c.protocol, c.interval_s, c.timeout_s, c.path) == ("http", 30.0, 6.0, "/health")
    assert c.success_codes == frozenset(range(200, 400))
    assert CheckerCapacity().effective_burst == 1000.0
    assert CheckerCapacity(max_per_second=0.5).effective_burst == 1.0
    assert CheckConfig(success_codes={200, 204}).success_codes == frozenset({200, 204})  # type: ignore[arg-type]
