"""The control-plane chain end to end: DNS race -> leases -> launches -> network -> health checks.

Each test runs a small scenario through `ScenarioRun` and judges it by the metrics the run recorded (the same time
series the stages are detected from) and by its event log. Bounds come from the scenario's own intervals, TTLs and
rates. The runs are in the simulated world (the chain's logic is under test, each run takes a second or two); the
unprotected race also runs on real sockets at a high speed, so the chain stays honest on the kernel's network.
"""

from __future__ import annotations

from typing import Any

import pytest

from backends.controlplane.resolver import LookupOutcome
from scenarios.runner import ScenarioRun
from scenarios.schema import Scenario, parse_scenario
from worlds.base import World
from worlds.real import RealWorld
from worlds.sim import SimWorld

# High, but not so high that a 2-core machine's loop lag shows in sim time: at 30, a 0.1 s stall was 3 sim s
# and broke the bounds below in about one run in four, even on a quiet machine.
SPEED = 15.0
DNS_TTL = 5  # the lease store record's TTL (sim s)
PLANNER = 5.0
KEEP = 3
RENEW = 10.0
LEASE_TTL = 40.0
SPREAD = 0.5
SAMPLE = 1.0  # the scenario's sample and scrape interval

BASE: dict[str, Any] = {
    "name": "chain",
    "speed": SPEED,
    "zones": ["a", "b", "c"],
    "targets_per_zone": 1,
    "health_check": {"interval_s": 2, "timeout_s": 1, "healthy_threshold": 2, "unhealthy_threshold": 2},
    "load_balancer": {"deregistration_delay_s": 2},
    "traffic": {"rate_per_s": 5, "timeout_s": 2, "dns_ttl_s": 5},
    "record_interval_s": SAMPLE,  # stages are found in the scraped series, at this resolution
    "control_plane": {
        "dns": {"planner_interval_s": PLANNER, "keep_generations": KEEP, "ttl_s": DNS_TTL},
        "host_manager": {"hosts": 30, "lease_ttl_s": LEASE_TTL, "renew_interval_s": RENEW, "ttl_spread": SPREAD,
                         "workers": 3, "item_timeout_s": 5, "base_service_s": 0.5, "per_depth_s": 0.5,
                         "retry_s": 2, "slots_per_host": 2},
        "network_manager": {"rate_per_s": 1.0},
        "instances": {"launch_time_s": 1, "autoscale_interval_s": 2, "max_launch_per_tick": 3},
    },
}
RACE = {"at": 5, "control": {"component": "dns", "action": "delay-enactor", "enactor": "a", "delay_s": 25}}


def scenario(duration: float, timeline: list[dict[str, Any]], **changes: Any) -> Any:
    data = {**BASE, "duration_s": duration, "timeline": timeline}
    for key, value in changes.items():
        data[key] = value
    return parse_scenario(data, "test")


def execute(sc: Scenario, world: World | None = None) -> tuple[ScenarioRun, dict[str, Any]]:
    """Run `sc` to its end in `world` (default: the simulated world on the scenario's seed)."""
    world = world if world is not None else SimWorld(seed=sc.seed)
    run = ScenarioRun(sc, world=world, source="test")
    return run, world.run(run.run())


def stages(summary: dict[str, Any]) -> dict[str, tuple[float, float]]:
    return {s["name"]: (s["start_s"], s["end_s"]) for s in summary["stages"]}


def column(run: ScenarioRun, name: str) -> list[tuple[float, float]]:
    return [(row["t"], row[name]) for row in run.state.timeseries]


@pytest.mark.parametrize(("protection", "world"), [(None, "sim"), ("cas", "sim"), ("keep_active", "sim"),
                                                   ("guard", "sim"), (None, "real")])
def test_the_race_empties_the_record_unless_a_protection_is_on(protection: str | None, world: str) -> None:
    cp = dict(BASE["control_plane"])
    cp["dns"] = {**cp["dns"], "protections": {protection: True} if protection else {}}
    restore = {"at": 50, "control": {"component": "dns", "action": "restore"}}
    sc = scenario(60, [RACE, restore], control_plane=cp)
    run, summary = execute(sc, RealWorld(speed=SPEED, seed=sc.seed) if world == "real" else None)
    assert summary["complete"]
    found = stages(summary)
    records = [v for _, v in column(run, "cp_record")]
    if protection is None:
        start, end = found["dns-record-empty"]
        # The stale write lands once the delay is over, no later than a poll and a pass after it.
        assert RACE["at"] < start <= RACE["at"] + 25 + 2 * PLANNER
        # Back at the recorder's first scrape after the restore (a loaded loop can delay that scrape, so the
        # bound is the scrape's own time, not the nominal interval).
        assert run.system is not None and run.system.recorder is not None
        assert end == pytest.approx(min(t for t in run.system.recorder.scrape_times if t >= 50), abs=0.01)
        assert any(e["kind"] == "dns_emptied" for e in run.state.events)
        # The host manager's resolver asked and got the empty answer once its cached one expired.
        control = run.system.control
        assert control is not None and control.host_resolver is not None
        assert control.host_resolver.counts[LookupOutcome.EMPTY] > 0
    else:
        assert "dns-record-empty" not in found
        assert min(records) >= 1
    inconsistent = max(v for _, v in column(run, "dns_inconsistent"))
    # The guard keeps the addresses but not the plan: the store is still inconsistent until the restore.
    assert inconsistent == (1.0 if protection in (None, "guard") else 0.0)


@pytest.mark.parametrize("mitigate", [False, True])
def test_empty_record_expires_leases_fails_launches_and_recovery_collapses_unless_throttled(
    mitigate: bool,
) -> None:
    """Empty record -> the host manager cannot resolve the lease store -> leases lapse after their TTL ->
    launches fail for lack of leased hosts -> restore -> the recovery queue collapses (30 expired hosts make
    the service time 0.5 + 0.5 x 30 s, far over the 5 s item timeout) unless operators throttle and restart.
    A throttle above what the workers can do at a small depth (2/s here) would only collapse it again."""
    duration, restore_at, mitigate_at, throttle = 170.0, 90.0, 110.0, 1.0
    timeline = [
        RACE,
        {"at": 82, "control": {"component": "instances", "action": "set-desired", "count": 2}},
        {"at": restore_at, "control": {"component": "dns", "action": "restore"}},
    ]
    if mitigate:
        timeline += [
            {"at": mitigate_at, "control": {"component": "host_manager", "action": "throttle", "per_s": throttle}},
            {"at": mitigate_at, "control": {"component": "host_manager", "action": "restart"}},
        ]
    run, summary = execute(scenario(duration, timeline))
    assert summary["complete"]
    found = stages(summary)
    empty_start, empty_end = found["dns-record-empty"]
    assert empty_end >= restore_at
    lost, lowest = found["leases-expiring"]
    # No lease lapses while the store can be reached; every lease is gone one TTL (and a renewal interval and
    # the record's TTL of cached answers) after the record emptied.
    assert empty_start <= lost <= empty_start + DNS_TTL + LEASE_TTL
    assert lowest <= empty_start + DNS_TTL + RENEW + LEASE_TTL + SAMPLE
    assert min(v for _, v in column(run, "hosts_leased")) == 0
    # Launches asked for while no host held a lease failed for lack of capacity.
    failed = [v for t, v in column(run, "placements_failed_total") if t < restore_at]
    assert failed[-1] > 0
    collapse = found["host-manager-collapse"]
    assert collapse[0] >= restore_at
    timeouts = dict(column(run, "recovery_timeouts_total"))
    goodput = dict(column(run, "recovery_goodput_total"))
    if not mitigate:
        # Metastable: the trigger is gone, yet nothing recovers until the end of the run.
        assert collapse[1] == pytest.approx(duration, abs=SAMPLE)
        assert "leases-restored" not in found
        assert max(goodput.values()) == 0
        assert max(timeouts.values()) > 30  # every host's item timed out at least once
    else:
        # Progress once the flushed hosts are offered again (retry_s = 2) and the first item is served, well
        # within an item timeout (5).
        assert collapse[1] <= mitigate_at + 2 + 5 + SAMPLE
        restored_from, restored_to = found["leases-restored"]
        assert restored_from >= collapse[1]
        # 30 hosts let in at 1 per second (3 workers keep up with that at a small depth), plus the retry
        # delay, and two item timeouts of slack for an item that timed out at the restart.
        assert restored_to <= mitigate_at + 2 + 30 / throttle + 2 * 5 + SAMPLE
        leased = [v for _, v in column(run, "hosts_leased")]
        assert leased[-1] == 30
        # Launches go through once hosts are leased: the new instances reach `running`.
        assert column(run, "instances_running")[-1][1] == 6


def test_network_backlog_keeps_a_new_target_failing_until_its_configuration_is_processed() -> None:
    """New instances are registered while their network is pending (as NLB brought them into service): their
    paths are blackholed, so their probes fail, until the network manager reaches their items at 0.2 per
    second; each becomes healthy only after it is running, within the healthy threshold's checks."""
    cp = dict(BASE["control_plane"])
    cp["network_manager"] = {"rate_per_s": 0.2}
    timeline = [{"at": 5, "control": {"component": "instances", "action": "set-desired", "count": 2}}]
    run, summary = execute(scenario(50, timeline, control_plane=cp))
    assert summary["complete"]
    events = run.state.events
    registered = {e["subject"]: e["t"] for e in events if e["kind"] == "registered"}
    running = {e["subject"]: e["t"] for e in events if e["kind"] == "instance_running"}
    healthy = {}
    for e in events:
        if e["kind"] == "transition" and e.get("detail", "").endswith("->healthy") and e["subject"] in registered:
            healthy.setdefault(e["subject"], e["t"])
    assert len(registered) == 3 and set(running) == set(registered)
    interval, threshold = 2.0, 2
    for tid, t_reg in registered.items():
        assert running[tid] > t_reg
        assert tid in healthy, f"{tid} never became healthy"
        # Not before its path opened; after it, within: a probe already in flight into the black hole (it
        # fails), then the threshold's successes, each up to an interval plus 10% jitter apart, and one more
        # interval of slack for a loaded loop.
        assert running[tid] <= healthy[tid] <= running[tid] + (threshold + 2) * interval * 1.1 + interval
    # One item per 5 s: the last of three runs about 2 x 5 s after the first. The queue serves on the manager's
    # ticks, and a tick a loaded loop wakes late serves the first item late while the later ones keep the
    # queue's own schedule (credit carries over), so allow half a service interval (83 ms of wall time at this
    # speed); without the rate limit the three would run within a tick of each other.
    service_s = 1 / 0.2
    times = sorted(running.values())
    assert times[-1] - times[0] >= 2 * service_s - service_s / 2
    # Meanwhile the backlog was visible in the metrics.
    assert max(v for _, v in column(run, "net_backlog")) >= 2
