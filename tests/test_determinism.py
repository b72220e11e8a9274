"""The same scenario, seed and speed twice gives the same control-plane timeline and outcome metrics.

Real sockets and a real event loop are not bit-for-bit repeatable: timers fire a little late, and a probe or a
request can land on either side of a sample. So "the same" is defined with tolerances (documented in the
README): the same control-plane events in the same order, each within TIME_TOL sim seconds of its twin; the
same stages within STAGE_TOL; availability within 2 points; capacity metrics within 5% of the run's
target-seconds (or 5 target-seconds).
"""

from __future__ import annotations

from typing import Any

from scenarios.runner import ScenarioRun
from scenarios.schema import parse_scenario

SPEED = 10.0  # a loaded CI machine's loop lag must not turn into request timeouts in sim time
# An enactor's pass starts on its poll grid and a delayed write lands just before the next clean-up, so a
# control-plane event can shift by a planner interval (2) + a poll (1) + a pass over 3 endpoints (3 x 0.5)
# when the loop's timing differs a little: 4.5 s, rounded up.
TIME_TOL = 5.0
STAGE_TOL = TIME_TOL + 1.0  # and the recorder's interval (1 s) on top, for the stages

SCENARIO: dict[str, Any] = {
    "name": "determinism",
    "seed": 11,
    "speed": SPEED,
    "duration_s": 120,
    "zones": ["a", "b"],
    "targets_per_zone": 2,
    "health_check": {"interval_s": 2, "timeout_s": 1, "healthy_threshold": 2, "unhealthy_threshold": 2},
    "traffic": {"rate_per_s": 10, "timeout_s": 2, "dns_ttl_s": 5},
    "record_interval_s": 1,
    "control_plane": {
        "dns": {"planner_interval_s": 2, "keep_generations": 3, "ttl_s": 3},
        "host_manager": {"hosts": 12, "lease_ttl_s": 30, "renew_interval_s": 5, "ttl_spread": 0.5,
                         "workers": 2, "item_timeout_s": 4, "base_service_s": 0.5, "per_depth_s": 0.5},
    },
    "timeline": [
        {"at": 5, "control": {"component": "dns", "action": "delay-enactor", "enactor": "a", "delay_s": 12}},
        {"at": 70, "control": {"component": "dns", "action": "restore"}},
        {"at": 90, "control": {"component": "host_manager", "action": "restart"}},
        {"at": 90, "control": {"component": "host_manager", "action": "throttle", "per_s": 1}},
    ],
}

CONTROL_KINDS = ("dns_", "hosts_", "timeline")


async def one_run() -> tuple[dict[str, Any], list[tuple[str, float]]]:
    run = ScenarioRun(parse_scenario(SCENARIO, "determinism"), source="determinism")
    summary = await run.run()
    assert summary["complete"]
    events = [(f"{e['kind']}:{e['subject']}", e["t"]) for e in run.state.events
              if e["kind"].startswith(CONTROL_KINDS)]
    return summary, events


async def test_same_seed_same_speed_same_control_plane_timeline_and_outcomes() -> None:
    first, first_events = await one_run()
    second, second_events = await one_run()
    assert [k for k, _ in first_events] == [k for k, _ in second_events]
    for (kind, t1), (_, t2) in zip(first_events, second_events, strict=True):
        assert abs(t1 - t2) <= TIME_TOL, (kind, t1, t2)
    assert [s["name"] for s in first["stages"]] == [s["name"] for s in second["stages"]]
    assert "dns-record-empty" in {s["name"] for s in first["stages"]}
    for a, b in zip(first["stages"], second["stages"], strict=True):
        assert abs(a["start_s"] - b["start_s"]) <= STAGE_TOL and abs(a["end_s"] - b["end_s"]) <= STAGE_TOL, (a, b)
    assert abs(first["availability"] - second["availability"]) <= 0.02
    scale = 120 * 4  # target-seconds in the run
    for key in ("capacity_lost_target_seconds", "false_ejection_target_seconds", "missed_ejection_target_seconds"):
        assert abs(first[key] - second[key]) <= max(5.0, 0.05 * scale), key
