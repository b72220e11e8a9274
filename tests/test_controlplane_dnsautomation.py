"""The DNS automation's pure timing core, stepped by hand or on a virtual clock: both race modes and protections."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.controlplane.dnsautomation import (
    AutomationConfig,
    DnsAutomation,
    Phase,
    RaceConfig,
    RaceMode,
)
from backends.controlplane.dnsplan import EnactorState, Protections, StartOutcome, WriteOutcome

ENDPOINTS = {
    "ddb.cp.lbsim": {"10.0.0.1": 1, "10.0.0.2": 1},
    "leasestore.cp.lbsim": {"10.0.1.1": 1},
    "netconfig.cp.lbsim": {"10.0.2.1": 1, "10.0.2.2": 0},
}
FIRST = "ddb.cp.lbsim"  # sorts first: the first write of every pass
CONFIG = AutomationConfig()  # planner every 5 s, enactors a b c, 0.5 s a write, poll 1 s, keep 3 generations
EMERGENT = RaceConfig(mode=RaceMode.EMERGENT)  # a write hangs with p = 0.05 for Exp(mean 15 s) <= 120 s
# Seeds of the emergent mode with these endpoints and defaults: RACING empties a record at t = 31.7 (also the
# real-socket test's seed in test_controlplane_dnsservice.py); QUIET empties nothing within 200 s.
RACING, QUIET = 68, 0
# The endpoints a scenario's control plane serves (scenarios/controlplane.py): the lease store's own name sorts
# last. With them, LEASE_RACING empties the lease store's record at t = 31.7 in the emergent mode.
LEASE_STORE = "leasestore.cp.lbsim"
SCENARIO_ENDPOINTS = {
    name: {"10.0.1.1": 1} for name in ("leasestore-fips.cp.lbsim", "leasestore-ipv6.cp.lbsim", LEASE_STORE)
}
LEASE_RACING = 35
WRITE_OUTCOMES = frozenset(o.value for o in WriteOutcome)


class Notices:
    def __init__(self) -> None:
        self.items: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, kind: str, fields: dict[str, Any]) -> None:
        self.items.append((kind, fields))

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [f for k, f in self.items if k == kind]


def make(
    race: RaceConfig | None = None, protections: Protections | None = None, seed: int | None = None, **kw: Any
) -> tuple[DnsAutomation, Notices]:
    notices = Notices()
    config = AutomationConfig(race=race or RaceConfig(), protections=protections or Protections(), **kw)
    rng = None if seed is None else random.Random(seed)
    return DnsAutomation(config, ENDPOINTS, 0.0, rng, notify=notices), notices


def served_everywhere(auto: DnsAutomation) -> bool:
    return all(auto.store.published[e] for e in auto.endpoints)


def passes(auto: DnsAutomation) -> dict[tuple[str, int], list[str]]:
    """(enactor, generation) -> the endpoints that pass wrote, in the order the store saw the writes."""
    out: dict[tuple[str, int], list[str]] = {}
    for event in auto.store.events:
        if event.kind in WRITE_OUTCOMES and event.actor != "init" and event.endpoint is not None:
            out.setdefault((event.actor, event.generation), []).append(event.endpoint)
    return out


# -- configuration


def test_configs_are_validated_and_the_emergent_mode_needs_an_injected_rng() -> None:
    for bad in ({"delay_probability": 1.5}, {"delay_probability": -0.1}, {"delay_mean_s": 0}, {"delay_max_s": -1}):
        with pytest.raises(ValueError):
            RaceConfig(**bad)
    with pytest.raises(ValueError):
        RaceConfig(mode="chaotic")  # type: ignore[arg-type]
    assert RaceConfig(mode="emergent").mode == RaceMode.EMERGENT  # type: ignore[arg-type]
    for bad_auto in ({"planner_interval_s": 0}, {"enactors": ()}, {"enactors": ("a", "a")}, {"apply_time_s": -1}):
        with pytest.raises(ValueError):
            AutomationConfig(**bad_auto)
    with pytest.raises(ValueError, match="seeded"):
        make(EMERGENT)
    with pytest.raises(ValueError):
        DnsAutomation(CONFIG, {}, 0.0)


def test_drawn_delays_follow_the_configured_distribution() -> None:
    rng = random.Random(1)
    assert RaceConfig().draw_delay(rng) == 0.0 and rng.getstate() == random.Random(1).getstate()  # forced: no draw
    race = RaceConfig(mode=RaceMode.EMERGENT, delay_probability=0.5, delay_mean_s=10.0, delay_max_s=25.0)
    draws = [race.draw_delay(rng) for _ in range(4000)]
    hung = [d for d in draws if d > 0]
    assert 0.45 < len(hung) / len(draws) < 0.55
    assert max(hung) == 25.0  # capped
    assert 7.0 < sum(hung) / len(hung) < 10.0  # the exponential's mean, pulled down by the cap


# -- the transitions, stepped by hand


def test_transitions_stepped_by_hand_follow_the_timing_rules() -> None:
    auto, _ = make(enactors=("a", "b"))
    store = auto.store
    assert set(store.applied.values()) == {1}  # rule 1: generation 1 everywhere at t0
    a, b = auto.slots["a"], auto.slots["b"]
    assert (a.offset_s, b.offset_s) == (0.25, 0.75)  # rule 3: staggered poll grids
    assert auto.next_due() == 0.25
    auto.advance(0.25)
    assert a.phase == Phase.POLLING and a.due == 1.25  # nothing newer: the next point of its grid
    # rule 2: the planner, by hand
    plan = auto.plan(5.0)
    assert plan is not None and plan.generation == 2 and auto.plan_due == 10.0
    # rule 3-4: a picks it up and writes the first endpoint for apply_time_s
    assert auto.pick_up("a", 5.0) == StartOutcome.STARTED
    assert (a.phase, a.due, a.write and a.write.endpoint) == (Phase.WRITING, 5.5, FIRST)
    assert auto.finish_write("a", 5.5) == WriteOutcome.APPLIED
    assert store.applied[FIRST] == 2 and a.due == 6.0
    assert auto.pick_up("b", 5.6) == StartOutcome.NOT_NEWER  # the one-time check sees generation 2 applied
    auto.finish_write("a", 6.0)
    # The last write lands, then rule 5's clean-up and at once a look for a newer plan (none): polling again.
    assert auto.finish_write("a", 6.5) == WriteOutcome.APPLIED
    assert set(store.applied.values()) == {2} and a.phase == Phase.POLLING and a.due == 7.25
    # An injected failure: the attempt is retried after retry_s.
    auto.plan(10.0)
    auto.fail_writes("b", 1, 10.0)
    auto.pick_up("b", 10.0)
    assert auto.finish_write("b", 10.5) is None and b.phase == Phase.RETRY_WAIT and b.due == 11.5
    assert auto.writes["b", WriteOutcome.RETRY] == 1
    auto.retry("b", 11.5)
    assert auto.finish_write("b", 12.0) == WriteOutcome.APPLIED


def test_a_driver_that_fell_behind_skips_planner_ticks_instead_of_planning_in_a_burst() -> None:
    auto, _ = make()
    auto.advance(23.0)  # asleep for four ticks
    assert auto.planner.generation == 2 and auto.plan_due == 25.0
    auto.run_until(25.0)
    assert auto.planner.generation == 3


def test_undisturbed_the_enactors_keep_every_record_served_and_clean_up() -> None:
    auto, notices = make()
    auto.run_until(102.0)  # the plan of t = 100 applied too
    assert auto.planner.generation == 21 and auto.store.applied_generation() == 21
    assert served_everywhere(auto) and not auto.store.inconsistent
    assert auto.plans_deleted >= 15 and len(auto.store.plans) <= CONFIG.keep_generations + 2
    workers = {n for (n, o), c in auto.writes.items() if o == WriteOutcome.APPLIED and c}
    assert workers == {"a", "b"}  # c stands by: a and b pick each plan up first
    assert notices.items == []


# -- the forced mode: the empty record by construction


@settings(max_examples=40, deadline=None)
@given(
    intervals=st.floats(min_value=CONFIG.keep_generations + 1, max_value=12),
    at=st.floats(min_value=0.5, max_value=60),
    enactor=st.sampled_from(["a", "b"]),
    endpoint=st.sampled_from([None, *sorted(ENDPOINTS)]),
)
def test_forced_mode_a_delay_of_keep_plus_one_intervals_always_empties_the_record(
    intervals: float, at: float, enactor: str, endpoint: str | None
) -> None:
    auto, notices = make()
    auto.run_until(at)
    delay = intervals * CONFIG.planner_interval_s
    auto.delay_enactor(enactor, delay, at, endpoint=endpoint)
    auto.run_until(at + delay + 4 * auto.hold_bound_s)
    assert auto.records_emptied == 1 and auto.store.inconsistent
    landed, emptied = notices.of("delayed-write-landed")[0], notices.of("emptied")[0]
    assert landed["enactor"] == enactor and landed["outcome"] == "applied" and not landed["drawn"]
    assert landed["before_cleanup_of"] == emptied["by"] != enactor  # choreographed: just before another's clean-up
    assert emptied["generation"] == landed["generation"] and emptied["endpoint"] == landed["endpoint"]
    assert notices.of("refused-inconsistent")  # stuck


def test_forced_mode_a_delay_within_the_clean_up_horizon_leaves_only_a_stale_record() -> None:
    auto, notices = make()
    auto.run_until(12.0)
    auto.delay_enactor("a", CONFIG.planner_interval_s, 12.0, endpoint=FIRST)
    auto.run_until(60.0)
    assert notices.of("delayed-write-landed")[0]["outcome"] == "applied"
    assert auto.records_emptied == 0 and served_everywhere(auto) and not auto.store.inconsistent


@pytest.mark.parametrize("name", ["cas", "keep_active", "guard"])
def test_forced_mode_each_protection_prevents_the_empty_record(name: str) -> None:
    auto, notices = make(protections=Protections(**{name: True}))
    auto.run_until(12.0)
    auto.delay_enactor("a", 30.0, 12.0, endpoint=FIRST)
    auto.run_until(100.0)
    landed = notices.of("delayed-write-landed")[0]
    assert auto.records_emptied == 0 and served_everywhere(auto)
    if name == "cas":
        assert landed["outcome"] == "skipped-stale" and not auto.store.inconsistent
    elif name == "keep_active":
        assert landed["outcome"] == "applied" and not auto.store.inconsistent
    else:
        assert notices.of("guard-kept") and auto.store.inconsistent  # the data plane saved, not the control plane


def test_restore_pause_and_resume_drop_the_passes_in_progress() -> None:
    auto, notices = make()
    auto.run_until(12.0)
    auto.delay_enactor("a", 30.0, 12.0, endpoint=FIRST)
    auto.run_until(80.0)
    assert auto.store.inconsistent
    generation = auto.planner.generation
    restored = auto.restore(80.0)
    assert restored is not None and restored.generation == generation and served_everywhere(auto)
    assert all(s.phase == Phase.POLLING and s.enactor.state == EnactorState.IDLE for s in auto.slots.values())
    auto.run_until(102.0)
    assert auto.store.applied_generation() == auto.planner.generation and not auto.store.orphaned
    auto.pause(102.0)
    auto.pause(102.0)  # idempotent
    auto.run_until(130.0)
    assert auto.planner.generation == generation + 4  # planned up to t = 100 only
    assert all(s.phase == Phase.STOPPED for s in auto.slots.values())
    auto.resume(130.0)
    auto.run_until(142.0)
    assert auto.store.applied_generation() == auto.planner.generation == generation + 6
    assert [k for k, _ in notices.items].count("paused") == 1 and notices.of("restored")


# -- the emergent mode: the race comes out of the mechanism, or not


def test_emergent_mode_outcomes_follow_the_drawn_delays() -> None:
    racing, racing_notices = make(EMERGENT, seed=RACING)
    racing.run_until(200.0)
    quiet, quiet_notices = make(EMERGENT, seed=QUIET)
    quiet.run_until(200.0)
    assert racing.records_emptied == 1 and racing.first_emptied_at is not None
    assert quiet.records_emptied == 0 and served_everywhere(quiet) and quiet_notices.of("delay-drawn")
    # The emptied plan is one a drawn delay held back: it landed stale, when its delay was over (nothing held
    # it for a clean-up), and some later clean-up deleted it while active.
    emptied = racing_notices.of("emptied")[0]
    landed = [f for f in racing_notices.of("delayed-write-landed") if f["generation"] == emptied["generation"]]
    assert landed and landed[-1]["drawn"] and landed[-1]["outcome"] == "applied"
    assert landed[-1]["before_cleanup_of"] is None and landed[-1]["at"] <= emptied["at"]
    drawn = [f for f in racing_notices.of("delay-drawn") if f["generation"] == emptied["generation"]]
    assert any(f["endpoint"] == landed[-1]["endpoint"] for f in drawn)
    # The stale pass goes on after its hung write lands: the emptied endpoint is that one or one written after it.
    stale_pass = passes(racing)[landed[-1]["enactor"], emptied["generation"]]
    assert emptied["endpoint"] in stale_pass[stale_pass.index(landed[-1]["endpoint"]):]
    assert racing.planner.generation - emptied["generation"] > CONFIG.keep_generations
    # Same seed, same run; no hung writes, no race.
    again, again_notices = make(EMERGENT, seed=RACING)
    again.run_until(200.0)
    assert again_notices.items == racing_notices.items
    never = [make(RaceConfig(mode=RaceMode.EMERGENT, delay_probability=0.0), seed=s)[0] for s in range(10)]
    for auto in never:
        auto.run_until(200.0)
    assert not any(a.records_emptied for a in never)


def test_emergent_mode_draws_per_write_and_lands_an_injected_delay_plainly() -> None:
    auto, notices = make(RaceConfig(mode=RaceMode.EMERGENT, delay_probability=0.0), seed=1)
    auto.run_until(12.0)
    auto.delay_enactor("a", 30.0, 12.0, endpoint=FIRST)
    auto.run_until(80.0)
    landed = notices.of("delayed-write-landed")[0]
    # Not held for another enactor's clean-up: it landed 30.5 s after it began, its plan long cleaned up.
    assert landed["before_cleanup_of"] is None and landed["outcome"] == "plan-gone" and not landed["recreated"]
    assert auto.records_emptied == 0 and served_everywhere(auto)


@pytest.mark.parametrize("name", ["cas", "keep_active", "guard"])
def test_emergent_mode_each_protection_prevents_the_empty_record(name: str) -> None:
    protections = Protections(**{name: True})
    runs = []
    for seed in [RACING, *range(20)]:
        auto, _ = make(EMERGENT, protections, seed=seed)
        auto.run_until(300.0)
        runs.append(auto)
    assert not any(a.records_emptied for a in runs)
    assert all(served_everywhere(a) for a in runs)
    stuck = [a.store.inconsistent for a in runs]
    # cas and keep_active keep the control plane consistent too; the guard keeps only the records.
    assert any(stuck) == (name == "guard") and stuck[0] == (name == "guard")


# -- the order of a pass: sorted when forced, drawn when emergent, so no endpoint is spared by its place


def test_a_pass_writes_the_endpoints_sorted_when_forced_and_in_a_drawn_order_when_emergent() -> None:
    forced = DnsAutomation(CONFIG, SCENARIO_ENDPOINTS, 0.0, random.Random(LEASE_RACING))
    forced.plan(5.0)
    assert forced.pick_up("a", 5.0) == StartOutcome.STARTED
    a = forced.slots["a"]
    assert a.enactor.pending == sorted(SCENARIO_ENDPOINTS) and a.write and a.write.endpoint == a.enactor.pending[0]
    forced.run_until(100.0)
    assert all(order == sorted(SCENARIO_ENDPOINTS) for order in passes(forced).values())  # the lease store last
    # Emergent, never hung: every pass writes each endpoint once, in an order drawn per pass from the rng.
    config = AutomationConfig(race=RaceConfig(mode=RaceMode.EMERGENT, delay_probability=0.0))
    emergent = DnsAutomation(config, SCENARIO_ENDPOINTS, 0.0, random.Random(LEASE_RACING))
    emergent.run_until(100.0)
    orders = list(passes(emergent).values())
    assert len(orders) >= 19 and all(sorted(order) == sorted(SCENARIO_ENDPOINTS) for order in orders)
    assert len({tuple(order) for order in orders}) > 1
    assert {order[-1] for order in orders} == set(SCENARIO_ENDPOINTS)  # the lease store not always last
    again = DnsAutomation(config, SCENARIO_ENDPOINTS, 0.0, random.Random(LEASE_RACING))
    again.run_until(100.0)
    assert list(passes(again).values()) == orders


def test_emergent_mode_can_empty_the_lease_stores_own_record() -> None:
    notices = Notices()
    auto = DnsAutomation(AutomationConfig(race=EMERGENT), SCENARIO_ENDPOINTS, 0.0, random.Random(LEASE_RACING),
                         notify=notices)
    auto.run_until(200.0)
    emptied = notices.of("emptied")
    assert [f["endpoint"] for f in emptied] == [LEASE_STORE]
    assert auto.first_emptied_at == pytest.approx(31.667, abs=1e-3)
    assert auto.store.published[LEASE_STORE] == {} and auto.store.inconsistent
    # The clean-up that emptied it ran after a pass that did not write the lease store last, so a stale write
    # could land on it in between; with the lease store always last that window never opens.
    cleaner = passes(auto)[emptied[0]["by"], max(g for (n, g) in passes(auto) if n == emptied[0]["by"])]
    assert cleaner[-1] != LEASE_STORE
    landed = [f for f in notices.of("delayed-write-landed") if f["generation"] == emptied[0]["generation"]]
    assert landed and landed[-1]["drawn"] and landed[-1]["at"] <= emptied[0]["at"]
    # Same seed, same run.
    again = Notices()
    DnsAutomation(AutomationConfig(race=EMERGENT), SCENARIO_ENDPOINTS, 0.0, random.Random(LEASE_RACING),
                  notify=again).run_until(200.0)
    assert again.items == notices.items


@pytest.mark.parametrize("name", ["cas", "keep_active", "guard"])
def test_emergent_mode_protections_keep_the_lease_stores_record_with_a_drawn_order(name: str) -> None:
    config = AutomationConfig(race=EMERGENT, protections=Protections(**{name: True}))
    auto = DnsAutomation(config, SCENARIO_ENDPOINTS, 0.0, random.Random(LEASE_RACING))
    auto.run_until(200.0)
    assert auto.records_emptied == 0 and auto.store.published[LEASE_STORE] == {"10.0.1.1": 1}
    assert auto.store.inconsistent == (name == "guard")  # the guard keeps the record, not the control plane
