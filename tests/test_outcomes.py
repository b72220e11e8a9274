"""Outcome metrics computed on hand-made samples, requests and events."""

from __future__ import annotations

from scenarios.outcomes import (
    EventTally,
    ModeTally,
    RecoveryTally,
    Sample,
    capacity_metrics,
    event_metrics,
    percentile,
    request_metrics,
)


def fs(*ids: str) -> frozenset[str]:
    return frozenset(ids)


def test_capacity_metrics_on_a_hand_made_series() -> None:
    everyone = fs("a", "b", "c", "d")
    samples = [
        # t=0..10: all four serve and can serve.
        Sample(0, everyone, everyone, everyone, everyone, everyone),
        # t=10..20: b is ejected though it could serve (false), c is dead but still routed (missed).
        Sample(10, everyone, fs("a", "c", "d"), fs("a", "c", "d"), fs("a", "b", "d"), everyone),
        # t=20..25: zone of d leaves DNS: d routed but not serving; it could serve -> capacity lost, not false.
        Sample(20, everyone, fs("a", "b", "d"), fs("a", "b"), fs("a", "b", "c", "d"), everyone),
    ]
    m = capacity_metrics(samples, end=25)
    assert m["false_ejection_target_seconds"] == 10 + 5  # b for 10 s; c for 5 s at t=20 (can serve, not routed)
    assert m["missed_ejection_target_seconds"] == 10  # c routed while dead
    assert m["capacity_lost_target_seconds"] == 10 + 5 * 2  # b; then c and d
    assert m["min_routable_fraction"] == 0.5


def test_initial_targets_are_lost_capacity_but_not_false_ejections() -> None:
    s = Sample(0, fs("a", "new"), fs("a"), fs("a"), fs("a", "new"), fs("a"))
    m = capacity_metrics([s], end=10)
    assert m["capacity_lost_target_seconds"] == 10
    assert m["false_ejection_target_seconds"] == 0


def test_request_metrics() -> None:
    results = [(float(i), 0.01 * (i + 1), i % 10 != 0) for i in range(120)]  # 12 failures, 6 per minute
    m = request_metrics(results)
    assert m["requests_total"] == 120 and m["requests_failed"] == 12
    assert m["availability"] == 0.9
    assert m["worst_minute_availability"] == 0.9
    assert m["latency_p99_s"] is not None and 1.18 <= m["latency_p99_s"] <= 1.2
    assert request_metrics([])["availability"] == 1.0


def test_worst_minute_finds_the_bad_minute() -> None:
    # 60 s windows from t=1 to t=3: [1, 61) is all good, [2, 62) holds only the 3 failures, [3, 63) adds one success.
    results = [(1.0, 0.1, True)] * 10 + [(61.0, 0.1, False)] * 3 + [(62.0, 0.1, True)]
    assert request_metrics(results)["worst_minute_availability"] == 0.0


def test_worst_minute_does_not_depend_on_where_minutes_begin() -> None:
    # One request per second for 10 minutes and a 40 s outage. Calendar minutes would score it 1/3 failed when it
    # straddles a minute boundary evenly and 2/3 when it sits inside one minute; the sliding window says 2/3 both
    # times, the share of the worst 60 s.
    for outage_start in (100, 160, 180, 230):
        results = [(float(t), 0.01, not outage_start <= t < outage_start + 40) for t in range(600)]
        assert request_metrics(results)["worst_minute_availability"] == round(1 - 40 / 60, 6), outage_start


def test_worst_minute_of_a_short_run_is_its_whole_span() -> None:
    results = [(10.0, 0.1, True), (20.0, 0.1, False), (30.0, 0.1, True), (30.5, 0.1, True)]
    assert request_metrics(results)["worst_minute_availability"] == 0.75


def test_event_metrics_counts_flaps_as_returns_after_ejection() -> None:
    events = [("restored", "a"), ("ejected", "a"), ("restored", "a"), ("ejected", "a"), ("dns_removed", "z1"),
              ("restored", "b")]
    assert event_metrics(events) == {"ejections": 2, "flaps": 1, "dns_failovers": 1}


def test_event_tally_counts_withheld_removals_by_reason() -> None:
    tally = EventTally()
    for kind, subject, detail in [("withheld", "a0", "velocity/floor"), ("withheld", "zone:b", "velocity/budget"),
                                  ("withheld", "a1", "velocity/floor"), ("withheld", "a2", "my/policy/odd"),
                                  ("ejected", "a3", "")]:
        tally.add(kind, subject, detail)
    assert tally.withheld_by_reason() == {"budget": 1, "floor": 2, "cap": 0, "keep-serving": 0, "other": 1}
    assert tally.result() == {"ejections": 1, "flaps": 0, "dns_failovers": 0}


def test_percentile_nearest_rank() -> None:
    assert percentile([], 99) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile(list(map(float, range(1, 101))), 99) == 99.0


def test_time_after_the_end_does_not_count() -> None:
    everyone = fs("a", "b")
    samples = [Sample(0, everyone, everyone, everyone, fs("a"), everyone),
               Sample(8, everyone, everyone, everyone, fs("a"), everyone),
               Sample(15, everyone, fs(), fs(), everyone, everyone)]  # taken after a lagging run's end
    m = capacity_metrics(samples, end=10)
    assert m["missed_ejection_target_seconds"] == 10  # b for 10 s, not 15
    assert m["false_ejection_target_seconds"] == 0


def test_missed_ejection_ignores_zones_dns_has_withdrawn() -> None:
    s = Sample(0, fs("a", "b"), fs("a", "b"), fs("a"), fs("a"), fs("a", "b"))  # b routed by an unpublished node
    assert capacity_metrics([s], end=10)["missed_ejection_target_seconds"] == 0


def test_detection_and_recovery_times_on_a_hand_made_series() -> None:
    everyone = fs("a", "b", "c")
    samples = [
        Sample(0, everyone, everyone, everyone, everyone, everyone),
        # t=10: a dies (still served); t=14: a taken out -> detected after 4 s.
        Sample(10, everyone, everyone, everyone, fs("b", "c"), everyone),
        Sample(14, everyone, fs("b", "c"), fs("b", "c"), fs("b", "c"), everyone),
        # t=20: a can serve again; t=26: back in service -> recovered after 6 s.
        Sample(20, everyone, fs("b", "c"), fs("b", "c"), everyone, everyone),
        Sample(26, everyone, everyone, everyone, everyone, everyone),
        # t=30: b dies and comes back at t=32 before anything noticed: undetected.
        Sample(30, everyone, everyone, everyone, fs("a", "c"), everyone),
        Sample(32, everyone, everyone, everyone, everyone, everyone),
        # t=40: c dies, detected at 50, never back by the end: a pending recovery.
        Sample(40, everyone, everyone, everyone, fs("a", "b"), everyone),
        Sample(50, everyone, fs("a", "b"), fs("a", "b"), fs("a", "b"), everyone),
    ]
    tally = RecoveryTally()
    for s in samples:
        tally.add(s)
    m = tally.result()
    assert m["time_to_detect_s"] == (4 + 10) / 2 and m["time_to_detect_max_s"] == 10
    assert m["time_to_recover_s"] == 6 and m["time_to_recover_max_s"] == 6
    assert m["failures_undetected"] == 1 and m["recoveries_pending"] == 0


def test_a_target_that_never_served_is_not_a_failure_and_nothing_means_none() -> None:
    # A new target blackholed from the start (network pending), then routed once its path opens.
    samples = [Sample(0, fs("a", "new"), fs("a"), fs("a"), fs("a"), fs("a")),
               Sample(5, fs("a", "new"), fs("a", "new"), fs("a", "new"), fs("a", "new"), fs("a", "new"))]
    tally = RecoveryTally()
    for s in samples:
        tally.add(s)
    assert tally.result() == {"time_to_detect_s": None, "time_to_detect_max_s": None, "failures_undetected": 0,
                              "time_to_recover_s": None, "time_to_recover_max_s": None, "recoveries_pending": 0}


def test_zone_seconds_in_fail_open_and_panic() -> None:
    modes = ModeTally()
    modes.add(10, "a", "fail_open")
    modes.add(25, "a", "normal")
    modes.add(30, "b", "panic")
    modes.add(40, "a", "fail_open")
    assert modes.result(end=50) == {"fail_open_zone_seconds": 15 + 10, "panic_zone_seconds": 20}
    assert ModeTally().result(end=50) == {"fail_open_zone_seconds": 0, "panic_zone_seconds": 0}
