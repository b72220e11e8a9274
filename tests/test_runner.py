"""A scenario run in process: deregistration drains instead of ejecting, and a failing event stops the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backends.fleet import Targets
from scenarios.journal import MAX_EVENTS, RunState
from scenarios.runner import ScenarioRun
from scenarios.schema import ScenarioError, parse_scenario
from worlds.real import RealWorld

BASE = {
    "speed": 20,
    "duration_s": 20,
    "zones": ["a", "b"],
    "targets_per_zone": 2,
    "health_check": {"interval_s": 1, "timeout_s": 0.5, "healthy_threshold": 2, "unhealthy_threshold": 2},
    "load_balancer": {"deregistration_delay_s": 3},
    "traffic": {"rate_per_s": 10, "timeout_s": 1, "dns_ttl_s": 2},
}


async def test_deregistration_drains_and_releases_the_target() -> None:
    # At speed 5 a check's 0.5 s timeout is 100 ms of wall time: a loaded CI machine's loop lag cannot fail
    # healthy targets (at 20 it sometimes did, and their ejections are not what this test is about).
    sc = parse_scenario({**BASE, "name": "dereg", "speed": 5,
                         "timeline": [{"at": 4, "targets": ["a-0"], "deregister": True}]}, "test")
    removed: list[str] = []
    run = ScenarioRun(sc)
    original = Targets.remove

    async def spy(self: Targets, target_id: str) -> None:
        removed.append(target_id)
        await original(self, target_id)

    Targets.remove = spy  # type: ignore[method-assign]  # observe the real call; the real method still runs
    try:
        summary = await run.run()
    finally:
        Targets.remove = original  # type: ignore[method-assign]
    kinds = [(e["kind"], e["subject"], e.get("detail", "")) for e in run.state.events]
    assert ("transition", "a-0", "healthy->draining") in kinds
    assert ("transition", "a-0", "draining->unused") in kinds
    assert summary["ejections"] == 0  # leaving by deregistration is not an ejection
    assert summary["complete"]
    # Draining must not reset live connections nor send new ones to the target once its path is gone: no
    # request may fail by reset or refusal. (A timeout could only come from this machine's loop lagging at
    # this speed, which is not what this test is about.)
    run.state.request_log.seek(0)
    errors = {line.rsplit(",", 1)[1] for line in run.state.request_log.read().splitlines()}
    assert errors <= {"", "timeout"}, errors
    assert removed == ["a-0"]  # its backend and network path were released once it became unused


async def test_a_failing_event_stops_the_run_and_keeps_results() -> None:
    sc = parse_scenario({**BASE, "name": "bad",
                         "timeline": [{"at": 2, "targets": ["a-99"], "path": {"state": "open"}}]}, "test.yaml")
    run = ScenarioRun(sc, source="test.yaml")
    with pytest.raises(ScenarioError, match=r"test.yaml: event at 2: unknown targets \['a-99'\]"):
        await run.run()
    summary = run.summary()
    assert summary["complete"] is False and summary["duration_s"] >= 2


def test_set_policy_must_name_a_known_policy() -> None:
    sc = parse_scenario({**BASE, "name": "x", "policy": ["fail-open"],
                         "timeline": [{"at": 1, "set_policy": {"policy": "dns-failovr", "param": "enabled",
                                                               "value": False}}]}, "f.yaml")
    with pytest.raises(ScenarioError, match=r"timeline\[0\]\.set_policy\.policy = 'dns-failovr'"):
        ScenarioRun(sc, source="f.yaml")


async def test_set_policy_of_a_policy_the_run_lacks_is_skipped_and_logged() -> None:
    """The scenario's operator switch (disable automatic failover) is moot in a run with --policy naive."""
    sc = parse_scenario({**BASE, "name": "x", "duration_s": 3,
                         "timeline": [{"at": 1, "set_policy": {"policy": "dns-failover", "param": "enabled",
                                                               "value": False}}]}, "f.yaml")
    run = ScenarioRun(sc, ["naive"], source="f.yaml", world=RealWorld(speed=20))
    summary = await run.run()
    assert summary["complete"] is True
    [entry] = [e for e in run.state.events if e["kind"] == "timeline"]
    assert entry["skipped"] == "no dns-failover policy in this run"


def test_events_past_the_cap_are_counted_not_kept_but_still_tallied(tmp_path: Path) -> None:
    run = ScenarioRun(parse_scenario({**BASE, "name": "cap"}, "test"))
    assert run.state.max_events == MAX_EVENTS
    run.state.max_events = 3
    logged = [("ejected", "a-0"), ("transition", "a-0"), ("restored", "a-0")]
    for i, (kind, subject) in enumerate(logged):
        run.journal.log(float(i), kind, subject, {})
    assert run.summary()["events_dropped"] == 0  # up to the cap: everything kept
    for i, (kind, subject) in enumerate([("ejected", "a-1"), ("dns_removed", "a")], start=3):
        run.journal.log(float(i), kind, subject, {})
    assert [(e["kind"], e["subject"]) for e in run.state.events] == logged  # the first ones, in order
    summary = run.summary()
    assert summary["events_dropped"] == 2
    assert (summary["ejections"], summary["flaps"], summary["dns_failovers"]) == (2, 1, 1)  # dropped ones count
    run.write(tmp_path, summary)
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert [(e["kind"], e["subject"]) for e in map(json.loads, lines)] == logged
    assert json.loads((tmp_path / "summary.json").read_text())["events_dropped"] == 2
    run.state.request_log.close()
    with pytest.raises(ValueError, match="max_events"):
        RunState(max_events=0)


def test_scenario_term_expands_to_the_scenario_policies() -> None:
    sc = parse_scenario({**BASE, "name": "x", "policy": ["fail-open", {"name": "min-healthy", "min_percent": 60,
                                                                      "actions": ["dns-failover"]}]}, "f.yaml")
    run = ScenarioRun(sc, ["scenario+velocity(window_s=60)"], source="f.yaml")
    assert [p.name for p in run.policies] == ["fail-open", "min-healthy", "velocity"]
    assert run.policy_name == "scenario+velocity(window_s=60)"
    assert [p.name for p in ScenarioRun(sc, ["naive"]).policies] == ["naive"]
    assert [p.name for p in ScenarioRun(sc).policies] == ["fail-open", "min-healthy"]


async def test_a_zone_event_after_a_target_was_retired_acts_on_the_live_ones() -> None:
    sc = parse_scenario({**BASE, "name": "retired", "duration_s": 12, "timeline": [
        {"at": 1, "targets": ["a-0"], "deregister": True},
        {"at": 9, "zone": "a", "path": {"state": "latency", "latency_s": 0.01}},
    ]}, "test")
    run = ScenarioRun(sc, source="test")
    summary = await run.run()
    assert summary["complete"]
    [zone_event] = [e for e in run.state.events if e["kind"] == "timeline" and e["subject"] == "path"]
    assert zone_event["targets"] == ["a-1"]  # a-0 was drained (3 s) and released before t=9


def test_withheld_events_reach_the_summary_by_reason_even_past_the_cap() -> None:
    run = ScenarioRun(parse_scenario({**BASE, "name": "holds"}, "test"))
    run.state.max_events = 1
    for i, detail in enumerate(["velocity/floor", "velocity/budget", "max-ejection/cap", "velocity/floor"]):
        run.journal.log(float(i), "withheld", "a-0", {"detail": detail})
    summary = run.summary()
    assert summary["events_dropped"] == 3
    assert summary["withheld_by_reason"] == {"budget": 1, "floor": 2, "cap": 1, "keep-serving": 0, "other": 0}
    run.state.request_log.close()
