"""Tests of the passive tracker (lb.passive) and the `passive` policy that reads its stats (pure, no I/O)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.passive import PassiveTracker
from lb.policies import FlapDamping, MaxEjection, PassiveChecks
from lb.policy import PassiveStats, Policy, PolicyEngine, RoutingPlan, Snapshot, TargetView
from lb.targets import TargetState

H, U = TargetState.HEALTHY, TargetState.UNHEALTHY

# ---------------------------------------------------------------------------------------------------------
# PassiveTracker


def test_tracker_counts_outcomes() -> None:
    tr = PassiveTracker()
    assert tr.stats("t") == PassiveStats()
    for at, ok in [(1, True), (2, False), (3, False), (4, True), (5, False), (6, False), (7, False)]:
        tr.record("t", ok, at)
    s = tr.stats("t")
    assert (s.consecutive_failures, s.successes, s.failures) == (3, 2, 5)
    assert (s.last_success_at, s.last_failure_at) == (4, 7)
    assert s.recent_success_times == (1, 4)


def test_tracker_keeps_a_bounded_number_of_recent_success_times() -> None:
    tr = PassiveTracker(keep_success_times=3)
    for at in range(10):
        tr.record("t", True, at)
    assert tr.stats("t").recent_success_times == (7, 8, 9)
    assert tr.stats("t").successes == 10


def test_tracker_drops_success_times_past_the_horizon() -> None:
    tr = PassiveTracker(horizon_s=60)
    tr.record("t", True, 0)
    tr.record("t", True, 50)
    assert tr.stats("t", now=100).recent_success_times == (50,)
    assert tr.stats("t", now=100).last_success_at == 50  # totals and last times are kept


def test_tracker_tolerates_out_of_order_reports_and_forgets() -> None:
    tr = PassiveTracker()
    tr.record("t", True, 5)
    tr.record("t", True, 4)
    assert tr.stats("t").last_success_at == 5
    assert tr.stats("t").recent_success_times == (4, 5)
    assert set(tr.snapshot()) == {"t"}
    tr.forget("t")
    assert tr.stats("t") == PassiveStats()
    tr.record("u", False, 1)
    tr.reset()
    assert tr.snapshot() == {}


def test_tracker_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        PassiveTracker(keep_success_times=-1)
    with pytest.raises(ValueError):
        PassiveTracker(horizon_s=0)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.booleans(), max_size=60))
def test_tracker_consecutive_failures_is_the_trailing_run(outcomes: list[bool]) -> None:
    tr = PassiveTracker()
    for i, ok in enumerate(outcomes):
        tr.record("t", ok, float(i))
    s = tr.stats("t")
    trailing = len(outcomes) - len("".join("s" if ok else "f" for ok in outcomes).rstrip("f"))
    assert s.consecutive_failures == trailing
    assert s.successes + s.failures == len(outcomes)


# ---------------------------------------------------------------------------------------------------------
# The `passive` policy, driven by a tracker as the proxy would


class Bench:
    """One zone of targets whose probe states the test sets, with a tracker standing in for the proxy."""

    def __init__(self, policies: Sequence[Policy], ids: tuple[str, ...] = ("a0", "a1", "a2", "a3")) -> None:
        self.engine = PolicyEngine(policies)
        self.tracker = PassiveTracker()
        self.states = dict.fromkeys(ids, H)
        self.since = dict.fromkeys(ids, 0.0)

    def probe(self, target: str, state: TargetState, now: float) -> None:
        if self.states[target] != state:
            self.states[target] = state
            self.since[target] = now

    def serve(self, target: str, ok: bool, now: float, n: int = 1) -> None:
        for _ in range(n):
            self.tracker.record(target, ok, now)

    def step(self, now: float) -> RoutingPlan:
        views = tuple(
            TargetView(tid, "a", st_, self.since[tid], self.tracker.stats(tid, now))
            for tid, st_ in sorted(self.states.items())
        )
        return self.engine.step(Snapshot(now, ("a",), views))


def test_passive_ejects_on_consecutive_failures_with_growing_ejection_time() -> None:
    p = PassiveChecks()
    b = Bench([p])
    b.step(0)
    b.serve("a0", False, 1, n=4)
    assert "a0" in b.step(1).in_service  # 4 < 5
    b.serve("a0", False, 2)
    plan = b.step(2)
    assert "a0" not in plan.in_service and plan.ejected == ("a0",)
    assert "a0" not in plan.excluded  # an outlier counts as unhealthy in panic, as in Envoy
    assert "a0" not in b.step(31).in_service
    assert "a0" in b.step(32).in_service  # base 30 s x 1
    assert "a0" in b.step(33).in_service  # old failures do not eject it again
    b.serve("a0", False, 34, n=5)
    plan = b.step(34)
    assert "a0" not in plan.in_service and p.multiplier("a0") == 2
    assert "a0" not in b.step(93).in_service
    assert "a0" in b.step(94).in_service  # 30 s x 2


def test_passive_success_breaks_the_streak() -> None:
    b = Bench([PassiveChecks()])
    b.step(0)
    b.serve("a0", False, 1, n=4)
    b.serve("a0", True, 1)
    b.serve("a0", False, 1, n=4)
    assert "a0" in b.step(1).in_service


def test_passive_ejection_time_is_capped_and_multiplier_decays() -> None:
    p = PassiveChecks(base_ejection_s=30, max_ejection_s=60, decay_interval_s=10)
    b = Bench([p])
    now = 0.0
    for expected in (30, 60, 60):  # base x 1, base x 2, then capped at 60
        b.serve("a0", False, now, n=5)
        b.step(now)
        assert p.is_ejected("a0")
        b.step(now + expected - 0.5)
        assert p.is_ejected("a0")
        b.step(now + expected)
        assert not p.is_ejected("a0")
        now += expected
    assert p.multiplier("a0") == 3
    b.step(now + 25)  # two whole decay intervals out of ejection
    assert p.multiplier("a0") == 1
    b.step(now + 100)
    assert p.multiplier("a0") == 0


def test_passive_keeps_a_probe_failing_target_that_serves_real_traffic() -> None:
    """The outage's case: probes fail on a target that serves its connections fine."""
    b = Bench([PassiveChecks()])
    b.step(0)
    b.serve("a1", True, 9, n=3)
    b.probe("a1", U, 10)
    plan = b.step(10)
    assert "a1" in plan.in_service
    assert plan.withheld == {"passive": 1}
    assert "a1" not in b.step(40).in_service  # its successes are now older than 30 s
    b.serve("a1", True, 41, n=3)
    assert "a1" in b.step(41).in_service  # serving again (e.g. through fail-open): kept again
    b.serve("a1", False, 42)
    assert "a1" not in b.step(42).in_service  # a failure since: the probes may be right


def test_passive_keep_serving_needs_enough_successes_and_can_be_off() -> None:
    b = Bench([PassiveChecks()])
    b.serve("a1", True, 9, n=2)
    b.probe("a1", U, 10)
    assert "a1" not in b.step(10).in_service
    b = Bench([PassiveChecks(keep_serving=False)])
    b.serve("a1", True, 9, n=10)
    b.probe("a1", U, 10)
    assert "a1" not in b.step(10).in_service


def test_passive_does_not_undo_flap_damping() -> None:
    f = FlapDamping()
    for policies in ([PassiveChecks(), f], [f, PassiveChecks()]):
        b = Bench(policies)
        for t in range(4):
            b.probe("a1", U if t % 2 == 0 else H, float(t))
            b.step(float(t))
        b.probe("a1", U, 4)
        b.serve("a1", True, 4, n=5)
        plan = b.step(4)
        assert "a1" not in plan.in_service and "a1" in plan.excluded
        assert "passive" not in plan.withheld


def test_passive_ejections_are_capped_by_max_ejection() -> None:
    b = Bench([MaxEjection(max_percent=50), PassiveChecks()])
    b.step(0)
    for tid in ("a0", "a1", "a2"):
        b.serve(tid, False, 1, n=5)
    plan = b.step(1)
    assert plan.ejected == ("a0", "a1")  # 2 of 4 at 50%
    assert plan.withheld == {"max-ejection": 1}


def test_passive_forgets_deregistered_targets() -> None:
    p = PassiveChecks()
    b = Bench([p])
    b.serve("a0", False, 1, n=5)
    b.step(1)
    assert p.is_ejected("a0")
    b.states["a0"] = TargetState.DRAINING
    b.step(2)
    assert not p.is_ejected("a0") and p.multiplier("a0") == 0
