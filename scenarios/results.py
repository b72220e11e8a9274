"""A run's results: summary.json (a function of scenario, policy and seed) and run.json (this machine's figures)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from backends.controlplane.hostmanager import RecoveryQueue
from lb.policy import Policy
from scenarios.controlplane import LEASE_STORE_NAME
from scenarios.journal import RunState
from scenarios.outcomes import percentile
from scenarios.recorder import Recorder, Selector, pivot
from scenarios.schema import HostManagerSpec, Scenario
from scenarios.stages import StageRules, detect_stages

# What the stage detector reads, as Prometheus series (scenarios/stages.py names the columns).
_STAGE_SELECTORS: dict[str, Selector] = {
    "cp_record": Selector("lbsim_dns_record_addresses", {"endpoint": LEASE_STORE_NAME}, default=float("nan")),
    "dns_inconsistent": Selector("lbsim_dns_inconsistent", default=float("nan")),
    "hosts_leased": Selector("lbsim_host_leases", {"state": "leased"}, default=float("nan")),
    "recovery_depth": Selector("lbsim_host_recovery_queue_depth", default=float("nan")),
    "recovery_goodput_total": Selector("lbsim_host_recovery_goodput_total", default=float("nan")),
    "recovery_timeouts_total": Selector("lbsim_host_recovery_timeouts_total", default=float("nan")),
    "net_backlog": Selector("lbsim_netmanager_backlog", default=float("nan")),
    "zones_in_dns": Selector("lbsim_zones_in_dns", default=float("nan")),
    "false_out": Selector("lbsim_truth_targets", {"set": "false_out"}, default=0.0),
    "_down": Selector("lbsim_health_transitions_total", {"from_state": "healthy", "to_state": "unhealthy"}),
    "_up": Selector("lbsim_health_transitions_total", {"from_state": "unhealthy", "to_state": "healthy"}),
}


def stage_columns(recorder: Recorder, zones: Sequence[str]) -> list[dict[str, float]]:
    """The recorded series pivoted into the stage detector's columns; columns a run does not have are left out
    (a run without a control plane has no `cp_record`)."""
    selectors = dict(_STAGE_SELECTORS)
    for zone in zones:
        selectors[f"zone_in_dns:{zone}"] = Selector("lbsim_zone_in_dns", {"zone": zone}, default=float("nan"))
        # The fleet exports a zone only while it has targets: none there is none that could serve.
        selectors[f"can_serve:{zone}"] = Selector("lbsim_targets_can_serve", {"zone": zone})
    rows = pivot(recorder.rows(), selectors, times=recorder.scrape_times)
    present = {k for row in rows for k, v in row.items() if v == v}  # NaN marks "never scraped"
    out: list[dict[str, float]] = []
    previous: dict[str, float] = {}
    for row in rows:
        # A scrape that failed leaves a hole; the value before it stands, as a Prometheus graph would draw it.
        row = {k: previous.get(k, v) if v != v else v for k, v in row.items()}
        previous = row
        r = {k: v for k, v in row.items() if k in present and not k.startswith("_")}
        r["transitions_total"] = row["_down"] + row["_up"]
        r["transitions_down_total"], r["transitions_up_total"] = row["_down"], row["_up"]
        out.append(r)
    return out


def full_queue_depth(hm: HostManagerSpec) -> float:
    """The recovery queue's depth from which it is full: no item started there finishes before its timeout (the
    host manager's rule 6, without store latency), or its configured admission limit or hard cap if lower."""
    queue = RecoveryQueue(hm.workers, hm.item_timeout_s, hm.base_service_s, hm.per_depth_s)
    limit = min(queue.collapse_depth(), hm.max_depth or math.inf, hm.hard_cap)
    return max(1.0, limit)


def stage_rules(sc: Scenario) -> StageRules:
    cp = sc.control_plane
    return StageRules(
        zones=len(sc.zones),
        hosts=cp.host_manager.hosts if cp is not None else 0,
        # Items timing out for three item timeouts: every item in flight timed out at least once meanwhile.
        collapse_window_s=3 * cp.host_manager.item_timeout_s if cp is not None else 30.0,
        full_depth=full_queue_depth(cp.host_manager) if cp is not None else 1.0,
        # An item times out one item timeout after it starts; the scrapes see it up to an interval later.
        timeout_window_s=(cp.host_manager.item_timeout_s if cp is not None else 10.0) + 2 * sc.record_interval_s,
        # Three health transitions within five check intervals is more than one failure explains; the
        # window spans at least two of the recorder's scrapes, which is what it is measured on.
        flap_window_s=max(5 * sc.health_check.interval_s, 2 * sc.record_interval_s),
    )


def fidelity_ok(sc: Scenario, lag_p99_s: float | None) -> bool:
    """A run is faithful while the loop's lag stays under a tenth of the shortest timeout it models."""
    return lag_p99_s is None or lag_p99_s < 0.1 * min(sc.health_check.timeout_s, sc.traffic.timeout_s)


def summary(sc: Scenario, state: RunState, *, policy: str, policies: Sequence[Policy], seed: int, speed: float | None,
            world: str, end_sim: float, complete: bool) -> dict[str, Any]:
    """summary.json: what the run measured in sim time, nothing read from a wall clock."""
    out: dict[str, Any] = {
        "scenario": sc.name,
        "policy": policy,
        "policies": [p.describe() for p in policies],
        "seed": seed,
        "speed": speed,
        "world": world,
        "duration_s": round(end_sim, 3),
        "complete": complete,
    }
    out.update(state.requests.result())
    out.update(state.capacity.result(end_sim))
    out.update(state.event_tally.result())  # every event, kept or dropped
    out["withheld_by_reason"] = state.event_tally.withheld_by_reason()
    out["events_dropped"] = state.events_dropped
    out.update(state.recovery.result())
    out.update(state.modes.result(end_sim))
    out["checker_lateness_p99_s"] = percentile(state.lateness, 99)
    out["probes_total"] = state.probes_seen
    # From the recorded (scraped) series; a run that ended before its recorder ran has only its samples.
    rows = state.stage_rows if state.stage_rows else state.timeseries
    out["stages"] = [g.to_json() for g in detect_stages(rows, stage_rules(sc), end_sim)]
    return out


def run_info(sc: Scenario, state: RunState, *, world: str, wall_s: float) -> dict[str, Any]:
    """run.json: what this machine did (the run's wall time) and how it kept up (the event loop's lag, from loop
    time: wall time in the real world; the simulated world's loop never lags)."""
    lag = percentile(state.loop_lag, 99)
    return {"world": world, "wall_s": round(wall_s, 3), "loop_lag_p99_s": lag, "fidelity_ok": fidelity_ok(sc, lag)}
