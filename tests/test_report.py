"""The run plot's panels, read back from a real run directory, and the label lanes of the run and compare plots:
each label readable, none over another."""

from __future__ import annotations

import csv
import itertools
import shutil
from pathlib import Path
from typing import Any

import pytest

from scenarios.report import RunData, assign_lanes, figure, read_layers, run_figure
from scenarios.runner import ScenarioRun
from scenarios.schema import parse_scenario

# -- lanes: a pure function ------------------------------------------------------------------------------------


def test_labels_close_in_time_go_to_different_lanes_and_far_ones_share() -> None:
    spans = [(0.0, 60.0), (10.0, 70.0), (10.0, 50.0), (100.0, 160.0), (65.0, 90.0)]
    lanes = assign_lanes(spans)
    assert lanes == [0, 1, 2, 0, 0]  # (65, 90) fits after (0, 60) in lane 0, and (100, 160) after it
    for (a, la), (b, lb) in itertools.combinations(zip(spans, lanes, strict=True), 2):
        if la == lb:
            assert a[1] <= b[0] or b[1] <= a[0], (a, b)


def test_a_gap_keeps_touching_labels_apart_and_input_order_is_kept() -> None:
    spans = [(50.0, 60.0), (0.0, 50.0)]  # not sorted: lanes come back in input order
    assert assign_lanes(spans) == [0, 0]
    assert assign_lanes(spans, gap=1.0) == [1, 0]
    assert assign_lanes([]) == []


def test_as_few_lanes_as_labels_overlapping_at_once() -> None:
    spans = [(float(t), t + 25.0) for t in range(0, 200, 10)]  # three overlap at any time
    assert max(assign_lanes(spans)) + 1 == 3


# -- the figures ---------------------------------------------------------------------------------------------


def strip_texts(fig: Any) -> list[Any]:
    return [t for t in fig.axes[0].texts if t.get_text()]


def assert_no_overlap(fig: Any) -> None:
    renderer = fig.canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in strip_texts(fig)]
    for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2):
        assert not box_a.overlaps(box_b), f"{a!r} overlaps {b!r}"


def test_compare_labels_close_in_time_do_not_overlap(tmp_path: Path) -> None:
    """As in the 2025-10-20 scenario: stages that start together, three events at one time, two a few s apart."""
    stages = [{"name": "dns-record-empty", "start_s": 35, "end_s": 110},
              {"name": "leases-expiring", "start_s": 45, "end_s": 105},
              {"name": "network-backlog", "start_s": 180, "end_s": 335},
              {"name": "dns-failover-capacity-removed", "start_s": 180, "end_s": 320},
              {"name": "health-check-flapping", "start_s": 210, "end_s": 370},
              {"name": "recovered", "start_s": 380, "end_s": 480}]
    timeline = [(100.0, "launches fail with insufficient capacity"), (108.0, "02:25 operators restore the DNS record"),
                (163.0, "04:14 operators throttle incoming work"), (163.0, "04:14 and restart host-manager hosts"),
                (163.0, "launches succeed again but are throttled"), (470.0, "an event at the right end")]
    run = RunData(tmp_path, {"duration_s": 480.0, "stages": stages}, times=[0.0, 240.0], routed=[12.0, 6.0],
                  requests=[(1.0, True), (300.0, False)], timeline=timeline)
    fig = figure({"naive": [run], "velocity": [run]}, "title")
    fig.canvas.draw()
    texts = {t.get_text() for t in strip_texts(fig)}
    assert {s["name"] for s in stages} <= texts and {note for _, note in timeline} <= texts
    assert_no_overlap(fig)
    # Every label inside the plot's width, the one at the right end too.
    renderer = fig.canvas.get_renderer()
    strip_box = fig.axes[0].get_window_extent(renderer)
    for t in strip_texts(fig):
        box = t.get_window_extent(renderer)
        assert strip_box.x0 - 1 <= box.x0 and box.x1 <= strip_box.x1 + 1, t.get_text()
    assert [ax.get_title(loc="left") for ax in fig.axes] == ["", "targets routed", "request success"]


SPEED = 30.0
SCENARIO: dict[str, Any] = {
    "name": "small-chain",
    "speed": SPEED,
    "duration_s": 40,
    "zones": ["a", "b"],
    "targets_per_zone": 1,
    "health_check": {"interval_s": 2, "timeout_s": 1, "healthy_threshold": 2, "unhealthy_threshold": 2},
    "traffic": {"rate_per_s": 5, "timeout_s": 2, "dns_ttl_s": 5},
    "record_interval_s": 2,
    "control_plane": {
        "dns": {"planner_interval_s": 3, "ttl_s": 5},
        "host_manager": {"hosts": 6, "lease_ttl_s": 10, "renew_interval_s": 4, "ttl_spread": 0.5,
                         "item_timeout_s": 5, "retry_s": 2},
        "network_manager": {"rate_per_s": 1.0},
    },
    "timeline": [
        {"at": 4, "control": {"component": "dns", "action": "delay-enactor", "enactor": "a", "delay_s": 10},
         "note": "enactor a delayed"},
        {"at": 25, "control": {"component": "dns", "action": "restore"}, "note": "operators restore the record"},
    ],
}
LAYER_TITLES = ["lease store DNS record", "host leases", "host recovery queue", "network manager",
                "load balancer DNS"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run of a small scenario with a control plane, written as `lbsim run` writes it."""
    import asyncio

    out = tmp_path_factory.mktemp("run")
    run = ScenarioRun(parse_scenario(SCENARIO, "test"), source="test")
    summary = asyncio.run(run.run())
    assert summary["complete"]
    run.write(out, summary)
    return out


def test_run_plot_has_a_panel_per_recorded_layer_on_one_time_axis(run_dir: Path) -> None:
    fig = run_figure(run_dir)
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    assert titles == ["", *LAYER_TITLES, "targets routed and could serve", "request success"]
    strip, *panels = fig.axes
    assert all(ax.get_shared_x_axes().joined(strip, ax) for ax in panels)
    assert panels[-1].get_xlim() == (0.0, 40.0)
    legends = {title: [t.get_text() for t in ax.get_legend().get_texts()]
               for title, ax in zip(titles, fig.axes, strict=True) if ax.get_legend() is not None}
    assert legends["host leases"] == ["leased", "expired", "recovering"]
    assert legends["host recovery queue"] == ["depth", "re-established (total)", "timed out (total)"]
    assert "could serve (ground truth)" in legends["targets routed and could serve"]
    # Each line is the recorded series: the record panel's line is the lease store's address count as scraped.
    record = panels[0].get_lines()[0]
    assert set(record.get_ydata()) <= {0.0, 1.0} and 1.0 in set(record.get_ydata())
    texts = {t.get_text() for t in strip_texts(fig)}
    assert {"enactor a delayed", "operators restore the record"} <= texts
    fig.canvas.draw()
    assert_no_overlap(fig)


def test_a_run_without_control_plane_series_shows_only_what_it_recorded(run_dir: Path, tmp_path: Path) -> None:
    """The same real run with the control plane's series removed, as a scenario without one records it."""
    bare = tmp_path / "bare"
    shutil.copytree(run_dir, bare)
    with (run_dir / "timeseries.csv").open(newline="") as src, (bare / "timeseries.csv").open("w", newline="") as dst:
        reader = csv.DictReader(src)
        writer = csv.DictWriter(dst, fieldnames=list(reader.fieldnames or []))
        writer.writeheader()
        kept = 0
        for row in reader:
            if row["metric"].startswith(("lbsim_host_", "lbsim_netmanager_", "lbsim_dns_record")):
                continue
            writer.writerow(row)
            kept += 1
    assert kept > 0
    assert [d.layer.title for d in read_layers(bare)] == ["load balancer DNS"]
    fig = run_figure(bare)
    assert [ax.get_title(loc="left") for ax in fig.axes] == [
        "", "load balancer DNS", "targets routed and could serve", "request success"]
