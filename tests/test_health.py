"""The pure health state machine, the quorum merge and AWS range notes, driven step by step."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lb.health import (
    HealthBoard,
    TargetHealth,
    aws_range_notes,
    format_success_codes,
    merge_views,
    parse_success_codes,
)
from lb.targets import TargetState as S


def test_new_target_is_initial_until_it_passes_healthy_threshold() -> None:
    h = TargetHealth("t", healthy_threshold=3, unhealthy_threshold=2)
    assert h.observe(True, 1) is None
    assert h.observe(True, 2) is None
    assert h.state == S.INITIAL
    t = h.observe(True, 3)
    assert t is not None and (t.old, t.new, t.at) == (S.INITIAL, S.HEALTHY, 3)


def test_initial_target_failing_becomes_unhealthy() -> None:
    h = TargetHealth("t", healthy_threshold=3, unhealthy_threshold=2)
    h.observe(False, 1)
    t = h.observe(False, 2)
    assert t is not None and t.new == S.UNHEALTHY


def test_streaks_reset_on_the_other_verdict() -> None:
    h = TargetHealth("t", healthy_threshold=2, unhealthy_threshold=3, state=S.HEALTHY)
    for ok in (False, False, True, False, False):
        h.observe(ok, 0)
    assert h.state == S.HEALTHY  # never three failures in a row
    h.observe(False, 1)
    assert h.state == S.UNHEALTHY
    h.observe(True, 2)
    h.observe(False, 3)
    h.observe(True, 4)
    assert h.state == S.UNHEALTHY
    h.observe(True, 5)
    assert h.state == S.HEALTHY


@given(st.lists(st.booleans(), max_size=200), st.integers(1, 10), st.integers(1, 10))
def test_state_changes_only_after_a_full_streak(results: list[bool], hth: int, uth: int) -> None:
    h = TargetHealth("t", healthy_threshold=hth, unhealthy_threshold=uth)
    streak_ok = streak_fail = 0
    for i, ok in enumerate(results):
        before = h.state
        t = h.observe(ok, float(i))
        streak_ok = streak_ok + 1 if ok else 0
        streak_fail = 0 if ok else streak_fail + 1
        if t is not None:
            assert t.old == before
            if t.new == S.HEALTHY:
                assert streak_ok >= hth
            else:
                assert t.new == S.UNHEALTHY and streak_fail >= uth
            streak_ok = streak_fail = 0
        else:
            assert h.state == before


def test_draining_ignores_probes_and_ends_unused() -> None:
    h = TargetHealth("t", 2, 2, state=S.HEALTHY)
    t = h.deregister(10, delay_s=30)
    assert t is not None and t.new == S.DRAINING
    assert h.observe(False, 11) is None and h.observe(False, 12) is None
    assert h.tick(39) is None
    t = h.tick(40)
    assert t is not None and t.new == S.UNUSED


def test_merge_needs_a_quorum_to_change() -> None:
    assert merge_views([S.HEALTHY, S.UNHEALTHY, S.INITIAL], 2, S.INITIAL) == S.INITIAL
    assert merge_views([S.HEALTHY, S.HEALTHY, S.UNHEALTHY], 2, S.INITIAL) == S.HEALTHY
    assert merge_views([S.UNHEALTHY, S.UNHEALTHY, S.HEALTHY], 2, S.HEALTHY) == S.UNHEALTHY
    # One confused node can neither eject nor admit.
    assert merge_views([S.UNHEALTHY, S.HEALTHY, S.HEALTHY], 2, S.HEALTHY) == S.HEALTHY


def test_board_merges_nodes_by_majority() -> None:
    board = HealthBoard(["a", "b", "c"], healthy_threshold=2, unhealthy_threshold=2)
    board.register("t1", 0)
    for node in ("a", "b"):
        board.record(node, "t1", True, 1)
    assert board.record("a", "t1", True, 2) is None  # only node a has two successes
    t = board.record("b", "t1", True, 2)
    assert t is not None and t.new == S.HEALTHY and board.state("t1") == S.HEALTHY
    for node in ("a", "a", "c"):
        board.record(node, "t1", False, 3)
    assert board.state("t1") == S.HEALTHY  # c has one failure, a two: one node is not a quorum
    t = board.record("c", "t1", False, 4)
    assert t is not None and t.new == S.UNHEALTHY
    assert board.record("a", "gone", True, 5) is None


def test_board_rejects_a_quorum_it_cannot_reach() -> None:
    with pytest.raises(ValueError, match="quorum"):
        HealthBoard(["a", "b"], 2, 2, quorum=3)


def test_board_draining_then_unused() -> None:
    board = HealthBoard(["a"], 2, 2)
    board.register("t", 0)
    t = board.deregister("t", 1, delay_s=5)
    assert t is not None and t.new == S.DRAINING
    assert board.tick(5) == []
    (t,) = board.tick(6)
    assert t.new == S.UNUSED


def test_success_codes_and_aws_notes() -> None:
    assert parse_success_codes("200-202,302") == frozenset({200, 201, 202, 302})
    with pytest.raises(ValueError, match="100-599"):
        parse_success_codes("99-200")
    with pytest.raises(ValueError, match="integers"):
        parse_success_codes("2xx")
    aws = parse_success_codes("200-399")
    assert aws_range_notes(30, 6, 5, 2, aws) == []
    notes = aws_range_notes(2, 1, 1, 11, aws)
    assert len(notes) == 4 and any("interval_s=2" in n for n in notes)
    wide = parse_success_codes("100-199,204,500-599")
    assert format_success_codes(wide) == "100-199,204,500-599"
    assert aws_range_notes(30, 6, 5, 2, wide) == ["success_codes=100-199,204,500-599 reach outside AWS's 200-599"]


def test_board_tracks_which_targets_served_since_they_registered() -> None:
    b = HealthBoard(["a"], healthy_threshold=1, unhealthy_threshold=1)
    b.register("old", 0.0, S.HEALTHY)
    b.register("new", 0.0)
    b.register("bad", 0.0)
    assert b.served("old") and not b.served("new") and not b.served("bad")
    b.record("a", "bad", False, 1.0)  # initial -> unhealthy: never served
    b.record("a", "new", True, 1.0)
    b.record("a", "new", False, 2.0)  # healthy -> unhealthy: it did serve
    b.record("a", "old", False, 2.0)
    assert (b.served("old"), b.served("new"), b.served("bad")) == (True, True, False)
    b.deregister("new", 3.0, 0.0)
    b.tick(3.0)
    b.register("new", 4.0)  # registered again: a new life
    assert not b.served("new")
