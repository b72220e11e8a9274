"""Stage detection on hand-made time series: each stage found from the metrics, absent when it did not happen."""

from __future__ import annotations

from scenarios.stages import StageRules, detect_stages

RULES = StageRules(zones=3, hosts=10, collapse_window_s=20, backlog_min=3, flap_window_s=10, flap_min=3)


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
        net_backlog=[0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 5, 1, 0, 0, 0],
        transitions_total=[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 9, 9, 9, 9],
        zones_in_dns=[3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 2, 3, 3, 3],
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


def test_failover_spans_from_first_removal_to_last_return() -> None:
    rows = series(7, zones_in_dns=[3, 2, 3, 1, 3, 3, 3], false_out=[0, 0, 0, 0, 1, 0, 0])
    stages = detect_stages(rows, RULES, end_s=70)
    assert [(s.name, s.start_s, s.end_s) for s in stages] == [
        ("dns-failover-capacity-removed", 10, 40),
        ("recovered", 50, 70),  # at 40 a target that could serve was still out of service
    ]
