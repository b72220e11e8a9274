"""bench/sim_vs_real.py's pure parts: the band rule, the metric rows built from summaries, the stage comparison."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import sim_vs_real as svr  # noqa: E402

from scenarios.schema import load_scenario  # noqa: E402

# -- the band -----------------------------------------------------------------------------------------------------


def test_band_is_two_standard_errors_when_that_is_wider() -> None:
    real = [0.0, 10.0]  # mean 5, stdev 7.07, stderr 5: 2 se = 10 > 10% of the range = 1
    b = svr.band(14.9, real)
    assert b.real_mean == 5.0 and math.isclose(b.stderr, 5.0) and math.isclose(b.width, 10.0)
    assert b.inside
    assert svr.band(-4.9, real).inside
    assert not svr.band(15.1, real).inside
    assert not svr.band(-5.1, real).inside


def test_band_is_a_tenth_of_the_range_when_that_is_wider() -> None:
    # Many runs make the standard error small; the range stays: 100 zeros and 100 tens.
    real = [0.0] * 100 + [10.0] * 100
    b = svr.band(5.0, real)
    assert 2 * b.stderr < 1.0 and b.width == pytest.approx(1.0)
    assert svr.band(5.99, real).inside
    assert not svr.band(6.01, real).inside
    assert not svr.band(3.99, real).inside


def test_band_of_identical_real_runs_holds_only_the_equal_mean() -> None:
    assert svr.band(3.0, [3.0, 3.0, 3.0]).inside
    assert not svr.band(3.001, [3.0, 3.0, 3.0]).inside
    one = svr.band(0.9, [0.9])  # one real run: no standard error, no range
    assert one.stderr == 0.0 and one.width == 0.0 and one.inside
    assert not svr.band(0.91, [0.9]).inside
    # The same mean reached by another order of additions is still equal.
    assert svr.band(sum([0.1, 0.2, 0.3]) / 3, [0.3, 0.2, 0.1]).inside


def test_band_needs_real_values() -> None:
    with pytest.raises(ValueError):
        svr.band(1.0, [])


# -- metric rows from summaries -----------------------------------------------------------------------------------


def summary(**metrics: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"scenario": "s", "policy": "naive", "policies": ["naive"], "seed": 1, "speed": 10.0,
                            "world": "real", "duration_s": 150.0, "complete": True, "stages": [],
                            "wall_s": 15.2, "loop_lag_p99_s": 0.002, "fidelity_ok": True,
                            "withheld_by_reason": {"budget": 0, "floor": 0}}
    return {**base, **metrics}


def test_metric_rows_compare_every_outcome_metric_and_skip_what_names_the_run() -> None:
    sims = [summary(availability=0.99, ejections=4, withheld_by_reason={"budget": 1, "floor": 0}),
            summary(availability=0.97, ejections=6, withheld_by_reason={"budget": 3, "floor": 0})]
    reals = [summary(availability=0.98, ejections=9), summary(availability=0.96, ejections=11)]
    rows = {r.metric: r for r in svr.metric_rows(sims, reals)}
    assert set(rows) == {"availability", "ejections", "withheld_by_reason.budget", "withheld_by_reason.floor"}
    av = rows["availability"]
    assert av.sim == [0.99, 0.97] and av.real == [0.98, 0.96]
    assert av.sim_mean == pytest.approx(0.98) and av.band is not None and av.band.real_mean == pytest.approx(0.97)
    assert av.inside  # stderr 0.01: 2 se = 0.02 >= |0.98 - 0.97|
    ej = rows["ejections"]
    assert ej.sim_mean == 5.0 and ej.band is not None and ej.band.real_mean == 10.0 and not ej.inside
    budget = rows["withheld_by_reason.budget"]
    assert budget.sim == [1.0, 3.0] and budget.real == [0.0, 0.0] and not budget.inside
    assert rows["withheld_by_reason.floor"].all_zero and rows["withheld_by_reason.floor"].inside


def test_a_metric_one_world_lacks_is_outside_and_missing_runs_are_left_out_of_the_mean() -> None:
    sims = [summary(time_to_detect_s=3.0), summary(time_to_detect_s=None), summary(time_to_detect_s=5.0)]
    reals = [summary(time_to_detect_s=None), summary(time_to_detect_s=None)]
    row = {r.metric: r for r in svr.metric_rows(sims, reals)}["time_to_detect_s"]
    assert row.sim == [3.0, None, 5.0] and row.real == [None, None]
    assert row.sim_mean == 4.0 and row.band is None and not row.inside
    row = {r.metric: r for r in svr.metric_rows(reals, sims)}["time_to_detect_s"]
    assert row.sim_mean is None and not row.inside


# -- stages -------------------------------------------------------------------------------------------------------


def stages(**starts: float) -> list[dict[str, Any]]:
    return [{"name": n.replace("_", "-"), "start_s": s, "end_s": s + 50.0} for n, s in starts.items()]


def test_a_stage_is_inside_when_every_sim_start_is_within_ten_seconds_of_the_real_median() -> None:
    sim = [stages(dns_record_empty=100.0, recovered=400.0), stages(dns_record_empty=109.0, recovered=411.0)]
    real = [stages(dns_record_empty=95.0, recovered=390.0), stages(dns_record_empty=99.0, recovered=400.0),
            stages(dns_record_empty=120.0, recovered=405.0)]
    rows = {r.name: r for r in svr.stage_rows(sim, real)}
    assert list(rows) == ["dns-record-empty", "recovered"]  # the cascade's order
    empty = rows["dns-record-empty"]
    assert empty.real_median == 99.0 and empty.diffs == [1.0, 10.0] and empty.inside
    rec = rows["recovered"]
    assert rec.real_median == 400.0 and rec.diffs == [0.0, 11.0] and not rec.inside


def test_a_stage_in_one_world_only_or_missing_from_a_sim_run_is_outside() -> None:
    sim = [stages(network_backlog=50.0, leases_expiring=10.0), stages(network_backlog=52.0)]
    real = [stages(leases_expiring=12.0, host_manager_collapse=80.0), stages(leases_expiring=14.0)]
    rows = {r.name: r for r in svr.stage_rows(sim, real)}
    assert list(rows) == ["leases-expiring", "host-manager-collapse", "network-backlog"]
    only_sim = rows["network-backlog"]
    assert only_sim.real_median is None and only_sim.sim == [50.0, 52.0] and not only_sim.inside
    only_real = rows["host-manager-collapse"]
    assert only_real.sim == [None, None] and only_real.real_median == 80.0 and not only_real.inside
    partial = rows["leases-expiring"]  # within 10 s where present, but the second sim run never had it
    assert partial.sim == [10.0, None] and partial.real_median == 13.0 and not partial.inside


def test_no_stages_anywhere_gives_no_rows() -> None:
    assert svr.stage_rows([[], []], [[]]) == []


# -- the policies and the estimate --------------------------------------------------------------------------------


def test_policies_are_naive_first_then_should_win_and_the_estimate_follows_duration_over_speed() -> None:
    sc, _ = load_scenario("aws-2025-10-20")
    assert svr.policies_of(sc) == ["naive", *sc.should_win]
    real_s, sim_s = svr.estimate_s(sc, 5, 3, 2)
    assert real_s == pytest.approx(len(svr.policies_of(sc)) * 3 * (sc.duration_s / sc.speed + svr.STARTUP_S))
    assert 0 < sim_s < real_s


def test_estimate_runs_nothing_and_rejects_unknown_scenarios(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(BENCH / "sim_vs_real.py"), "--estimate", "--scenarios",
                           "zone-outage", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=60, check=True)
    assert proc.stdout.startswith("zone-outage: 2 policies")
    assert "estimated wall time" in proc.stdout.splitlines()[-1]
    assert not (tmp_path / "o").exists()
    bad = subprocess.run([sys.executable, str(BENCH / "sim_vs_real.py"), "--scenarios", "nope"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2 and "not built-in scenarios: nope" in bad.stderr
