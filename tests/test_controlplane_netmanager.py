"""The network manager: the pure propagation queue step by step, then the shell opening a real target's path."""

from __future__ import annotations

import math
import random

import pytest
from prometheus_client import CollectorRegistry
from support import LOOPS, open_sockets, run_on, wait_for

from backends.controlplane.netmanager import (
    DEFAULT_HARD_CAP,
    Item,
    ItemKind,
    NetEvent,
    NetworkManager,
    NetworkManagerConfig,
    PropagationQueue,
)
from backends.fleet import Targets
from backends.netpath import PathState
from worlds.clock import ManualClock, ScaledClock

pytestmark = [pytest.mark.timeout(30), pytest.mark.filterwarnings("error::ResourceWarning")]

SPEED = 100.0


def launch(iid: str, at: float) -> Item:
    return Item(iid, ItemKind.LAUNCH, at)


def fill(q: PropagationQueue, n: int, at: float = 0.0, prefix: str = "i") -> None:
    for k in range(n):
        assert q.enqueue(launch(f"{prefix}{k}", at), at)


# -- the pure queue --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("rate", "step"), [(3.0, 0.1), (2.0, 0.25), (0.7, 0.33), (10.0, 0.01)])
def test_rate_is_exact_over_a_long_horizon(rate: float, step: float) -> None:
    q = PropagationQueue(rate)
    fill(q, 100_000)
    served = 0
    for k in range(1, 20_001):
        now = k * step
        served += len(q.advance(now))
        # Never ahead of the elapsed time, never more than one item behind it.
        assert math.floor(rate * now + 1e-6) - 1 <= served <= math.floor(rate * now + 1e-6)
    assert served == math.floor(rate * 20_000 * step + 1e-6)


def test_irregular_steps_give_the_same_total_as_one_big_step() -> None:
    rng = random.Random(4)
    q, ref = PropagationQueue(1.7), PropagationQueue(1.7)
    fill(q, 10_000)
    fill(ref, 10_000)
    now, served = 0.0, 0
    for _ in range(5_000):
        now += rng.uniform(0, 0.5)
        served += len(q.advance(now))
    assert served == len(ref.advance(now)) == math.floor(1.7 * now + 1e-9)


def test_fractional_credit_carries_between_calls() -> None:
    q = PropagationQueue(2.0)
    fill(q, 5)
    assert q.advance(0.3) == []  # 0.6 items of credit
    assert len(q.advance(0.5)) == 1  # 1.0
    assert q.advance(0.7) == []  # 0.4
    assert len(q.advance(1.0)) == 1  # 1.0
    assert len(q.advance(2.0)) == 2
    assert q.depth == 1


def test_no_burst_after_idle() -> None:
    q = PropagationQueue(2.0)
    fill(q, 1)
    assert len(q.advance(0.5)) == 1
    assert q.advance(100.0) == []  # idle: the empty queue earns nothing
    fill(q, 5, at=100.0, prefix="late")
    assert q.advance(100.0) == []
    assert len(q.advance(100.4)) == 0
    assert len(q.advance(100.5)) == 1  # one item per 1/r of busy time, as for the very first item
    assert len(q.advance(101.5)) == 2


def test_credit_left_when_the_queue_drains_is_dropped() -> None:
    q = PropagationQueue(1.0)
    fill(q, 1)
    assert len(q.advance(1.9)) == 1  # 0.9 of credit left over, but the queue is empty
    fill(q, 1, at=1.9, prefix="n")
    assert q.advance(2.5) == []  # a fresh start at 1.9: due at 2.9, not 2.0
    assert len(q.advance(2.9)) == 1


def test_fifo_across_kinds() -> None:
    q = PropagationQueue(1.0)
    order = [("a", ItemKind.LAUNCH), ("b", ItemKind.TERMINATE), ("c", ItemKind.LAUNCH), ("d", ItemKind.TERMINATE)]
    for iid, kind in order:
        q.enqueue(Item(iid, kind, 0.0), 0.0)
    assert [i.instance_id for i in q.items()] == ["a", "b", "c", "d"]
    out = [p.item for t in range(1, 5) for p in q.advance(float(t))]
    assert [(i.instance_id, i.kind) for i in out] == order
    assert q.processed == {ItemKind.LAUNCH: 2, ItemKind.TERMINATE: 2}


def test_admission_control_rejects_at_max_depth() -> None:
    q = PropagationQueue(1.0, max_depth=2)
    assert q.enqueue(launch("a", 0), 0) and q.enqueue(launch("b", 0), 0)
    assert not q.enqueue(launch("c", 0), 0)
    assert not q.enqueue(Item("d", ItemKind.TERMINATE, 0), 0)
    assert q.depth == 2 and q.rejected == 2
    assert [p.item.instance_id for p in q.advance(1.0)] == ["a"]
    assert q.enqueue(launch("e", 1.0), 1.0)  # room again
    q.set_max_depth(None)
    fill(q, 50, at=1.0)
    assert q.depth == 52 and q.rejected == 2
    q.set_max_depth(1)
    assert not q.enqueue(launch("f", 1.0), 1.0)
    with pytest.raises(ValueError, match="max_depth"):
        q.set_max_depth(0)  # the settings' rule: admission control admits at least one item


def test_hard_cap_drops_new_items_and_counts_them_apart_from_admission() -> None:
    q = PropagationQueue(1.0, hard_cap=3)
    fill(q, 3)
    assert not q.enqueue(launch("x", 0), 0) and not q.enqueue(Item("y", ItemKind.TERMINATE, 0), 0)
    assert (q.depth, q.dropped, q.rejected) == (3, 2, 0)
    assert [i.instance_id for i in q.items()] == ["i0", "i1", "i2"]  # what was queued stays, in order
    assert [p.item.instance_id for p in q.advance(1.0)] == ["i0"]
    assert q.enqueue(launch("z", 1.0), 1.0) and q.depth == 3  # room again
    q.set_max_depth(3)  # both apply at depth 3: the modelled admission control is what is counted
    assert not q.enqueue(launch("w", 1.0), 1.0) and (q.rejected, q.dropped) == (1, 2)
    with pytest.raises(ValueError, match="hard_cap"):
        PropagationQueue(1.0, hard_cap=0)


def test_depth_never_exceeds_the_hard_cap_under_any_arrivals() -> None:
    rng = random.Random(7)
    cap = 50
    q = PropagationQueue(2.0, hard_cap=cap)
    accepted = now = 0
    for k in range(5_000):
        now += 0.1
        for _ in range(rng.randrange(4)):  # up to 3 arrivals per 0.1 s against 0.2 served: overload
            accepted += q.enqueue(launch(f"i{k}-{accepted}", now), now)
        q.advance(now)
        assert q.depth <= cap
    assert q.dropped > 0 and q.rejected == 0
    assert accepted == q.depth + sum(q.processed.values())  # nothing accepted is lost


def test_below_the_hard_cap_nothing_changes() -> None:
    capped, default = PropagationQueue(1.5, partial_s=2.0, hard_cap=200), PropagationQueue(1.5, partial_s=2.0)
    assert default.hard_cap == DEFAULT_HARD_CAP
    out = []
    for q in (capped, default):
        fill(q, 200)
        out.append([(p.item.instance_id, p.at, p.partial_until) for t in range(1, 150) for p in q.advance(t * 0.7)])
        assert q.dropped == 0 and q.depth == 200 - len(out[-1])
    assert out[0] == out[1] and len(out[0]) == math.floor(1.5 * 149 * 0.7 + 1e-9)


def test_delay_is_time_from_enqueue_to_service() -> None:
    q = PropagationQueue(1.0)
    for k in range(4):
        q.enqueue(launch(f"i{k}", 0.5 * k), 0.5 * k)
    out = [p for t in (1.0, 2.0, 3.0, 4.0) for p in q.advance(t)]
    assert [p.at for p in out] == [1.0, 2.0, 3.0, 4.0]
    assert [p.delay for p in out] == pytest.approx([1.0, 1.5, 2.0, 2.5])


def test_partial_window_follows_a_launch_and_ends_after_partial_s() -> None:
    q = PropagationQueue(1.0, partial_s=5.0)
    q.enqueue(launch("a", 0), 0)
    q.enqueue(Item("t", ItemKind.TERMINATE, 0), 0)
    q.enqueue(launch("b", 0), 0)
    (pa,) = q.advance(1.0)
    assert pa.partial_until == 6.0 and q.partial_until("a") == 6.0
    (pt,) = q.advance(2.0)
    assert pt.partial_until is None and q.partial_until("t") is None  # terminates have no window
    (pb,) = q.advance(3.0)
    assert pb.partial_until == 8.0
    assert q.partial_due(5.9) == []
    assert q.partial_due(6.0) == ["a"]
    assert q.partial_until("a") is None and q.partial_due(6.5) == []
    q.enqueue(Item("b", ItemKind.TERMINATE, 7.0), 7.0)  # terminating b ends its window
    assert q.partial_until("b") is None and q.partial_due(100.0) == []


def test_no_partial_window_when_partial_s_is_zero() -> None:
    q = PropagationQueue(1.0)
    q.enqueue(launch("a", 0), 0)
    (p,) = q.advance(1.0)
    assert p.partial_until is None and q.partial_until("a") is None


def test_rate_change_credits_elapsed_time_at_the_old_rate() -> None:
    q = PropagationQueue(1.0)
    fill(q, 100)
    q.set_rate(10.0, now=1.5)  # 1.5 items earned at 1/s
    assert len(q.advance(1.5)) == 1
    assert len(q.advance(1.6)) == 1  # 0.5 carried + 0.1 * 10
    q.set_rate(0.0, now=1.6)
    assert q.advance(1000.0) == []  # stalled
    q.set_rate(2.0, now=1000.0)
    assert len(q.advance(1001.0)) == 2
    with pytest.raises(ValueError, match="rate"):
        q.set_rate(-1.0)


@pytest.mark.parametrize(
    "kwargs",
    [{"rate_per_s": -1}, {"rate_per_s": math.inf}, {"max_depth": -2}, {"partial_s": -1}, {"partial_loss": 1.5},
     {"partial_period_s": -1}, {"partial_period_s": math.nan}, {"partial_period_s": 1e-9}, {"tick_s": 0},
     {"backlog_threshold": 0}, {"hard_cap": 0}],
)
def test_bad_config_is_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        NetworkManagerConfig(**kwargs)  # type: ignore[arg-type]


# -- the shell on a real target --------------------------------------------------------------------------------


def sample(registry: CollectorRegistry, name: str, labels: dict[str, str] | None = None) -> float | None:
    return registry.get_sample_value(name, labels or {})


@pytest.mark.parametrize("period_s", [0.0, 2.0])  # flap per connection, or per 2 s slot of sim time
@pytest.mark.parametrize("loop_kind", list(LOOPS))
def test_partial_propagation_flaps_the_path_then_opens_it(loop_kind: str, period_s: float) -> None:
    partial_s, tick_s = 4.0, 0.25

    async def body() -> None:
        before = open_sockets()
        clock = ScaledClock(SPEED)
        registry = CollectorRegistry()
        targets = Targets(clock=ScaledClock(SPEED))
        applied: list[tuple[float, str, dict[str, float], PathState]] = []

        async def apply(iid: str, state: str, params: dict[str, float]) -> None:
            t = clock.now()
            await targets.set_path(iid, state, **params)  # type: ignore[arg-type]
            path = targets.info(iid).path
            applied.append((t, state, params, path.state))
            if state == "flap":
                flap_periods.append(path.period_s)

        events: list[NetEvent] = []
        flap_periods: list[float] = []
        cfg = NetworkManagerConfig(
            rate_per_s=10.0, partial_s=partial_s, partial_loss=0.4, partial_period_s=period_s, tick_s=tick_s
        )
        flap_params = {"loss": 0.4} | ({"period_s": period_s} if period_s else {})
        net = NetworkManager(clock, cfg, registry, apply, on_event=events.append)
        try:
            await targets.add("a-i1", "a")
            await targets.set_path("a-i1", "blackhole")
            await net.start()
            submitted = clock.now()
            assert net.submit_launch("a-i1")
            assert net.depth == 1 and sample(registry, "lbsim_netmanager_backlog") == 1
            await wait_for(lambda: len(applied) == 2, within=5.0)
            (t_flap, s1, p1, seen1), (t_open, s2, p2, seen2) = applied
            assert (s1, p1, seen1) == ("flap", flap_params, PathState.FLAP)
            assert flap_periods == [period_s]  # the path took the slot length
            assert (s2, p2, seen2) == ("open", {}, PathState.OPEN)
            # Served one 1/r after submission (at a tick), open partial_s after that (at a tick). The lower
            # bound of the window allows for the clock moving on between the tick and our reading it in apply.
            assert 0.1 - 1e-6 <= t_flap - submitted <= 0.1 + tick_s + 1.0
            assert partial_s - tick_s <= t_open - t_flap <= partial_s + tick_s + 1.0
            assert [e.kind for e in events] == ["backlog-started", "backlog-cleared"]
            assert sample(registry, "lbsim_netmanager_processed_total", {"kind": "launch"}) == 1
            assert sample(registry, "lbsim_netmanager_processed_total", {"kind": "terminate"}) == 0
            assert sample(registry, "lbsim_netmanager_propagation_delay_seconds_count") == 1
            assert sample(registry, "lbsim_netmanager_backlog") == 0
            assert sample(registry, "lbsim_netmanager_rate_per_second") == 10.0
            # A terminate consumes throughput and applies nothing.
            assert net.submit_terminate("a-i1")
            await wait_for(lambda: sample(registry, "lbsim_netmanager_processed_total", {"kind": "terminate"}) == 1)
            assert len(applied) == 2
        finally:
            await net.close()
            await targets.close()
        assert open_sockets() == before

    run_on(loop_kind, body)


def test_admission_and_rate_controls_of_the_shell() -> None:
    async def body() -> None:
        clock = ScaledClock(SPEED)
        registry = CollectorRegistry()
        opened: list[str] = []

        async def apply(iid: str, state: str, params: dict[str, float]) -> None:
            if state == "open":
                opened.append(iid)

        net = NetworkManager(clock, NetworkManagerConfig(rate_per_s=0.0, max_depth=3), registry, apply)
        async with net:
            results = [net.submit_launch(f"i{k}") for k in range(5)]
            assert results == [True, True, True, False, False]
            assert sample(registry, "lbsim_netmanager_rejected_total") == 2
            net.set_admission(None)
            assert net.submit_launch("i5")
            await clock.sleep(2.0)
            assert opened == []  # rate 0: nothing moves
            net.set_rate(50.0)
            await wait_for(lambda: len(opened) == 4, within=3.0)
            assert opened == ["i0", "i1", "i2", "i5"]
            assert sample(registry, "lbsim_netmanager_rate_per_second") == 50.0

    run_on("asyncio", body)


def test_the_shell_refuses_past_the_hard_cap_and_exports_the_drops() -> None:
    registry = CollectorRegistry()
    net = NetworkManager(ManualClock(), NetworkManagerConfig(rate_per_s=1.0, hard_cap=2), registry)
    assert [net.submit_launch(f"i{k}") for k in range(4)] == [True, True, False, False]
    assert not net.submit_terminate("i0")
    assert net.depth == 2
    assert sample(registry, "lbsim_netmanager_dropped_total") == 3
    assert sample(registry, "lbsim_netmanager_rejected_total") == 0
    assert sample(registry, "lbsim_netmanager_backlog") == 2


def test_a_failing_apply_does_not_stop_the_queue() -> None:
    async def body() -> None:
        clock = ScaledClock(SPEED)
        opened: list[str] = []

        async def apply(iid: str, state: str, params: dict[str, float]) -> None:
            if iid == "bad":
                raise RuntimeError("boom")
            opened.append(iid)

        async with NetworkManager(clock, NetworkManagerConfig(rate_per_s=20.0), CollectorRegistry(), apply) as net:
            net.submit_launch("bad")
            net.submit_launch("good")
            await wait_for(lambda: opened == ["good"], within=3.0)

    run_on("asyncio", body)


def test_start_needs_an_apply_callback() -> None:
    async def body() -> None:
        net = NetworkManager(ScaledClock(SPEED), registry=CollectorRegistry())
        with pytest.raises(RuntimeError, match="apply"):
            await net.start()
        await net.close()

    run_on("asyncio", body)
