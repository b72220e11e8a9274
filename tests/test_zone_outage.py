"""zone-outage end to end: every limiter still takes a really dead zone out, because the data path confirms it.

The runs are in the simulated world (logic, not timing, is under test here): each takes about a second.
"""

from __future__ import annotations

from typing import Any

import pytest

from scenarios.runner import ScenarioRun
from scenarios.schema import Scenario, load_scenario
from worlds.sim import SimWorld

DIES_AT, DURATION = 20.0, 60.0


def _scenario() -> Scenario:
    sc, _ = load_scenario(
        "zone-outage",
        [
            f"duration_s={DURATION:g}",
            f"timeline=[{{at: {DIES_AT:g}, zone: a, path: {{state: blackhole, cut_existing: true}}}}]",
        ],
    )
    return sc


def _bound_per_target(sc: Scenario, confirm_failures: int = 3) -> float:
    """Sim seconds a dead target may stay routable: probes need `unhealthy_threshold` failures (plus one
    interval of jitter and scheduling, and the last probe's timeout); then the data path needs
    `confirm_failures` (plus one) connections to the target, each failing by the connect timeout at the
    latest. Counting the two one after the other is conservative: they run side by side."""
    hc = sc.health_check
    per_target_rate = sc.traffic.rate_per_s / len(sc.zones) / sc.targets_per_zone
    probes = (hc.unhealthy_threshold + 1) * hc.interval_s + hc.timeout_s
    data_path = sc.load_balancer.connect_timeout_s + (confirm_failures + 1) / per_target_rate
    return probes + data_path


def _missed(sc: Scenario, policy: str) -> dict[str, Any]:
    world = SimWorld(seed=sc.seed)
    run = ScenarioRun(sc, [policy], world=world, source="built-in:zone-outage")
    return {**world.run(run.run()), **run.run_info()}


@pytest.mark.parametrize("policy", ["velocity", "max-ejection", "envoy", "aws-velocity"])
def test_every_limiter_still_takes_the_dead_zone_out(policy: str) -> None:
    sc = _scenario()
    summary = _missed(sc, policy)
    assert summary["complete"] and summary["fidelity_ok"]
    dead = sc.targets_per_zone
    assert summary["missed_ejection_target_seconds"] <= dead * _bound_per_target(sc)
    assert summary["failures_undetected"] == 0


def test_without_confirmation_panic_keeps_routing_to_the_dead_zone() -> None:
    """The control: Envoy's exact panic threshold routes zone a to its dead targets for the rest of the run,
    far beyond the bound the protections above keep."""
    sc = _scenario()
    summary = _missed(sc, "panic(confirm_failures=0)")
    dead_for = DURATION - DIES_AT
    assert summary["missed_ejection_target_seconds"] >= sc.targets_per_zone * (dead_for - _bound_per_target(sc))
