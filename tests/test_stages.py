"""Stage detection on hand-made time series: each stage found from the metrics, absent when it did not happen."""

from __future__ import annotations

from dataclasses import replace

from scenarios.results import full_queue_depth
from scenarios.schema import HostManagerSpec
from scenarios.stages import StageRules, detect_stages

RULES = StageRules(zones=3, hosts=10, collapse_window_s=20, full_depth=8, timeout_window_s=15, backlog_min=3,
                   flap_window_s=10, flap_min=3)


def series(n: int, **columns: list[float]) -> list[dict[str, float]]:
    rows = []
    for i in range(n):
        row = {"t": float(i * 10)}
        for name, values in columns.items():
            row[name] = values[i]
        rows.append(row)
    return rows


def names(stages: list) -> list[str]:  # type: ignore[type-arg]
    return [s.name for s in stages]


def test_the_whole_chain_is_found_in_order() -> None:
    #            t: 0   10  20  30  40  50  60  70  80  90  100 110 120 130 140
    rows = series(
        15,
        cp_record=[1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
        hosts_leased=[10, 10, 6, 0, 0, 0, 0, 0, 4, 10, 10, 10, 10, 10, 10],
        recovery_goodput_total=[0, 0, 0, 0, 0, 0, 0, 0, 4, 10, 10, 10, 10, 10, 10],
        recovery_depth=[0, 0, 4, 10, 10, 10, 10, 10, 6, 0, 0, 0, 0, 0, 0],
        # While the store is unreachable items fail (no timeouts); once it is back, every item times out.
        recovery_timeouts_total=[0, 0, 0, 0, 0, 4, 8, 12, 12, 12, 12, 12, 12, 12, 12],
        net_backlog=[0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 5, 1, 0, 0, 0],
        transitions_total=[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 9, 9, 9, 9],
        zones_in_dns=[3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 2, 3, 3, 3],
        **{"zone_in_dns:a": [1] * 15, "zone_in_dns:b": [1] * 11 + [0] + [1] * 3, "zone_in_dns:c": [1] * 15,
           "can_serve:a": [4] * 15, "can_serve:b": [4] * 15, "can_serve:c": [4] * 15},
        false_out=[0] * 15,
    )
    stages = detect_stages(rows, RULES, end_s=150)
    assert [(s.name, s.start_s, s.end_s) for s in stages] == [
        ("dns-record-empty", 10, 40),
        ("leases-expiring", 20, 30),
        ("host-manager-collapse", 40, 80),
        ("leases-restored", 80, 90),
        ("network-backlog", 90, 110),
        ("health-check-flapping", 90, 110),
        ("dns-failover-capacity-removed", 110, 120),
        ("recovered", 120, 150),
    ]


def test_no_collapse_when_goodput_moves_at_once() -> None:
    rows = series(
        6,
        cp_record=[1, 0, 1, 1, 1, 1],
        hosts_leased=[10, 5, 5, 8, 10, 10],
        recovery_goodput_total=[0, 0, 0, 3, 5, 5],
        recovery_depth=[0, 5, 5, 2, 0, 0],
    )
    stages = detect_stages(rows, RULES, end_s=60)
    assert names(stages) == ["dns-record-empty", "leases-expiring", "leases-restored", "recovered"]
    restored = stages[2]
    assert (restored.start_s, restored.end_s) == (30, 40)


def test_a_stage_still_going_ends_at_the_end_of_the_run_and_nothing_is_recovered() -> None:
    rows = series(4, cp_record=[1, 0, 0, 0], hosts_leased=[10, 10, 7, 3])
    stages = detect_stages(rows, RULES, end_s=40)
    assert [(s.name, s.start_s, s.end_s) for s in stages] == [("dns-record-empty", 10, 40), ("leases-expiring", 20, 30)]


def test_a_quiet_run_has_no_stages() -> None:
    rows = series(5, cp_record=[1] * 5, hosts_leased=[10] * 5, net_backlog=[0, 1, 2, 1, 0],
                  transitions_total=[0, 1, 2, 2, 3], zones_in_dns=[3] * 5)
    assert detect_stages(rows, RULES, end_s=50) == []


def test_isolated_transitions_are_not_flapping_but_a_burst_is() -> None:
    slow = series(6, transitions_total=[0, 1, 2, 3, 4, 5])  # one per 10 s: under 3 per 10 s
    assert detect_stages(slow, RULES, end_s=60) == []
    burst = series(6, transitions_total=[0, 0, 5, 5, 5, 5])
    stages = detect_stages(burst, RULES, end_s=60)
    assert [(s.name, s.start_s, s.end_s) for s in stages] == [("health-check-flapping", 10, 20), ("recovered", 20, 60)]


def test_transitions_all_one_way_are_a_failure_not_flapping() -> None:
    """A zone dying at once: four targets fail together, and return together much later."""
    rows = series(8, transitions_total=[0, 4, 4, 4, 4, 4, 8, 8], transitions_down_total=[0, 4, 4, 4, 4, 4, 4, 4],
                  transitions_up_total=[0, 0, 0, 0, 0, 0, 4, 4])
    assert detect_stages(rows, RULES, end_s=80) == []
    flapping = series(4, transitions_total=[0, 4, 4, 4], transitions_down_total=[0, 2, 2, 2],
                      transitions_up_total=[0, 2, 2, 2])
    assert [s.name for s in detect_stages(flapping, RULES, end_s=40)] == ["health-check-flapping", "recovered"]


def zone_columns(in_dns: dict[str, list[float]], can_serve: dict[str, list[float]]) -> dict[str, list[float]]:
    return {**{f"zone_in_dns:{z}": v for z, v in in_dns.items()}, **{f"can_serve:{z}": v for z, v in can_serve.items()}}


def test_failover_spans_from_the_first_zone_removed_with_capacity_to_the_last_back() -> None:
    rows = series(7, false_out=[0, 0, 0, 0, 1, 0, 0], **zone_columns(
        {"a": [1, 0, 1, 1, 1, 1, 1], "b": [1, 1, 1, 0, 1, 1, 1], "c": [1] * 7},
        {"a": [4] * 7, "b": [4, 4, 4, 3, 4, 4, 4], "c": [4] * 7},
    ))
    stages = detect_stages(rows, RULES, end_s=70)
    assert [(s.name, s.start_s, s.end_s) for s in stages] == [
        ("dns-failover-capacity-removed", 10, 40),
        ("recovered", 50, 70),  # at 40 a target that could serve was still out of service
    ]


def test_a_zone_taken_out_with_nothing_left_that_could_serve_is_not_capacity_removed() -> None:
    """The zone really died: its targets stopped serving (by the sample it was first seen out of DNS) and it
    stays out until they are back."""
    dead = series(6, **zone_columns(
        {"a": [1, 0, 0, 0, 1, 1], "b": [1] * 6, "c": [1] * 6},
        {"a": [4, 0, 0, 2, 4, 4], "b": [4] * 6, "c": [4] * 6},
    ))
    assert detect_stages(dead, RULES, end_s=60) == []
    # The same departure, with targets left that could serve, is the stage.
    alive = series(6, **zone_columns(
        {"a": [1, 0, 0, 0, 1, 1], "b": [1] * 6, "c": [1] * 6},
        {"a": [4, 1, 0, 2, 4, 4], "b": [4] * 6, "c": [4] * 6},
    ))
    assert [(s.name, s.start_s, s.end_s) for s in detect_stages(alive, RULES, end_s=60)] == [
        ("dns-failover-capacity-removed", 10, 40), ("recovered", 40, 60)]


def test_a_zone_count_alone_cannot_confirm_capacity_was_removed() -> None:
    rows = series(4, zones_in_dns=[3, 2, 2, 3])
    assert detect_stages(rows, RULES, end_s=40) == []


def collapse_rows(
    depth: list[float], timeouts: list[float], goodput: list[float] | None = None
) -> list[dict[str, float]]:
    n = len(depth)
    return series(n, recovery_depth=depth, recovery_timeouts_total=timeouts,
                  recovery_goodput_total=goodput if goodput is not None else [0] * n)


def test_items_timing_out_while_the_queue_stays_full_is_a_collapse() -> None:
    #                          t: 0   10  20  30  40  50  60  70
    rows = collapse_rows(depth=[0, 10, 10, 10, 10, 10, 0, 0], timeouts=[0, 0, 4, 8, 12, 16, 16, 16])
    assert [(s.name, s.start_s, s.end_s) for s in detect_stages(rows, RULES, end_s=80)] == [
        ("host-manager-collapse", 10, 60), ("recovered", 60, 80)]


def test_a_full_queue_whose_items_fail_or_finish_is_not_a_collapse() -> None:
    # The lease store unreachable: items fail at once and are offered again, the queue stays full, no timeouts.
    failing = collapse_rows(depth=[0, 10, 10, 10, 10, 10, 10, 10], timeouts=[0] * 8)
    assert detect_stages(failing, RULES, end_s=80) == []
    # Admission control holds the queue at its limit and the items finish: goodput moves.
    draining = collapse_rows(depth=[0] + [10] * 7, timeouts=[0, 0, 1, 2, 3, 4, 5, 6],
                             goodput=[0, 2, 4, 6, 8, 10, 12, 14])
    assert detect_stages(draining, RULES, end_s=80) == []


def test_timeouts_in_a_queue_that_is_not_full_are_not_a_collapse() -> None:
    rows = collapse_rows(depth=[0, 3, 4, 5, 4, 5, 3, 0], timeouts=[0, 0, 4, 8, 12, 16, 20, 20])
    assert detect_stages(rows, RULES, end_s=80) == []
    # Nor is a full queue whose depth dips below full between samples.
    dips = collapse_rows(depth=[0, 10, 7, 10, 7, 10, 7, 10], timeouts=[0, 0, 4, 8, 12, 16, 20, 24])
    assert detect_stages(dips, RULES, end_s=80) == []


def test_a_collapse_ends_when_items_stop_timing_out_though_the_queue_stays_full() -> None:
    """The timeouts stop (the store became unreachable again: items fail instead) one timeout window after the
    last; shorter than the collapse window, a burst of timeouts is not a collapse."""
    rows = collapse_rows(depth=[0] + [10] * 9, timeouts=[0, 0, 4, 8, 12, 12, 12, 12, 12, 12])
    assert [(s.name, s.start_s, s.end_s) for s in detect_stages(rows, RULES, end_s=100)] == [
        ("host-manager-collapse", 10, 60), ("recovered", 60, 100)]
    short = collapse_rows(depth=[0, 10, 10, 0, 0], timeouts=[0, 0, 4, 4, 4])  # one stuck step: 10 to 30
    assert names(detect_stages(short, RULES, end_s=50)) == ["host-manager-collapse", "recovered"]
    assert detect_stages(short, replace(RULES, collapse_window_s=30), end_s=50) == []


def test_the_full_depth_is_where_no_item_can_finish_or_the_admission_limit() -> None:
    spec = HostManagerSpec(item_timeout_s=5, base_service_s=0.5, per_depth_s=0.25)
    assert full_queue_depth(spec) == 18  # 0.5 + 0.25 x 18 = 5 s: deeper, every item times out
    assert full_queue_depth(spec.model_copy(update={"max_depth": 10})) == 10
    assert full_queue_depth(spec.model_copy(update={"per_depth_s": 0.0, "hard_cap": 500})) == 500
    assert full_queue_depth(spec.model_copy(update={"base_service_s": 6.0})) == 1


def test_with_a_record_outage_the_collapse_counts_from_the_record_back() -> None:
    """Items time out in a full queue while the store cannot be found (the service time alone exceeds the
    timeout); the collapse is what goes on once the record is back."""
    rows = series(9, cp_record=[1, 0, 0, 0, 1, 1, 1, 1, 1], recovery_depth=[0] + [10] * 8,
                  recovery_timeouts_total=[0, 0, 4, 8, 12, 16, 20, 24, 28], recovery_goodput_total=[0] * 9)
    assert [(s.name, s.start_s, s.end_s) for s in detect_stages(rows, RULES, end_s=90)] == [
        ("dns-record-empty", 10, 40), ("host-manager-collapse", 40, 90)]
    # A record that never comes back: all of it is the outage.
    never = [{**r, "cp_record": 0.0} if r["t"] > 0 else r for r in rows]
    assert names(detect_stages(never, RULES, end_s=90)) == ["dns-record-empty"]
