"""Tests for lb.select: flow-hash and round-robin target selection."""

from __future__ import annotations

import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from lb.select import FlowHashSelector, FlowKey, RoundRobinSelector, flow_hash

ips = st.ip_addresses(v=4).map(str)
ports = st.integers(min_value=1, max_value=65535)
flows = st.tuples(ips, ports, ports)
target_ids = st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=30, unique=True)


def test_empty_candidates_give_none() -> None:
    assert FlowHashSelector().pick([], ("10.0.0.1", 1234, 80)) is None
    assert RoundRobinSelector().pick((), ("10.0.0.1", 1234, 80)) is None


def test_single_candidate_always_wins() -> None:
    fh, rr = FlowHashSelector(), RoundRobinSelector()
    for port in range(1000, 1100):
        assert fh.pick(["only"], ("10.0.0.1", port, 80)) == "only"
        assert rr.pick(("only",), ("10.0.0.1", port, 80)) == "only"


def test_flow_hash_is_stable_across_processes() -> None:
    """Python's str hash is salted per process; the flow hash must not be."""
    flow = ("192.168.1.20", 40123, 8080)
    code = f"from lb.select import flow_hash; print(flow_hash({flow!r}))"
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={"PYTHONHASHSEED": seed, "PATH": ""},
            capture_output=True,
            text=True,
            check=True,
            cwd=str(Path(__file__).resolve().parents[1]),
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert outputs == {str(flow_hash(flow))}


def test_flow_hash_ignores_candidate_order() -> None:
    sel = FlowHashSelector()
    a = ["t3", "t1", "t2", "t0"]
    for port in range(30000, 30200):
        flow = ("10.1.2.3", port, 443)
        assert sel.pick(a, flow) == sel.pick(sorted(a), flow) == sel.pick(tuple(reversed(a)), flow)


def test_sorted_cache_is_not_fooled_by_a_mutated_list() -> None:
    sel = FlowHashSelector()
    cands = ["a", "b"]
    flow = ("10.0.0.9", 5555, 80)
    sel.pick(cands, flow)
    cands[:] = ["x", "y"]
    assert sel.pick(cands, flow) in {"x", "y"}


def test_round_robin_cycles_in_sorted_order() -> None:
    rr = RoundRobinSelector()
    picks = [rr.pick(["c", "a", "b"], ("1.1.1.1", 1, 1)) for _ in range(7)]
    assert picks == ["a", "b", "c", "a", "b", "c", "a"]


def test_round_robin_keeps_rotating_when_the_set_changes() -> None:
    rr = RoundRobinSelector()
    assert [rr.pick(("a", "b"), ("", 0, 0)) for _ in range(2)] == ["a", "b"]
    assert [rr.pick(("a", "b", "c"), ("", 0, 0)) for _ in range(3)] == ["c", "a", "b"]


@given(cands=target_ids, flow=flows)
def test_flow_hash_is_deterministic_and_picks_a_candidate(cands: list[str], flow: FlowKey) -> None:
    first = FlowHashSelector().pick(cands, flow)
    assert first in cands
    # A fresh selector, a shuffled copy and a tuple all agree.
    assert FlowHashSelector().pick(tuple(reversed(cands)), flow) == first
    assert FlowHashSelector().pick(sorted(cands), flow) == first


@given(cands=target_ids, flow=flows)
def test_round_robin_picks_a_candidate(cands: list[str], flow: FlowKey) -> None:
    rr = RoundRobinSelector()
    picks = [rr.pick(cands, flow) for _ in range(len(cands))]
    assert sorted(p for p in picks if p is not None) == sorted(cands)  # one full turn visits each once


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(min_value=2, max_value=16),
    ip=ips,
    listener=ports,
    first_port=st.integers(min_value=1024, max_value=60000),
)
def test_flow_hash_spreads_evenly(n: int, ip: str, listener: int, first_port: int) -> None:
    """Consecutive client ports (as an ephemeral port range hands them out) spread within +-25% of fair."""
    cands = [f"target-{i}" for i in range(n)]
    flows_n = 400 * n
    sel = FlowHashSelector()
    counts = Counter(sel.pick(cands, (ip, (first_port + k) % 65536, listener)) for k in range(flows_n))
    fair = flows_n / n
    assert set(counts) == set(cands)
    assert all(abs(c - fair) <= 0.25 * fair for c in counts.values()), counts


@settings(max_examples=20, deadline=None)
@given(n=st.integers(min_value=2, max_value=16), seed=st.integers(min_value=0, max_value=2**32 - 1))
def test_flow_hash_spreads_random_flows_evenly(n: int, seed: int) -> None:
    """Many clients with random addresses and ports spread within +-25% of fair share."""
    rng = random.Random(seed)
    cands = [f"t{i}" for i in range(n)]
    sel = FlowHashSelector()
    flows_n = 400 * n
    counts: Counter[str | None] = Counter()
    for _ in range(flows_n):
        ip = f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}"
        counts[sel.pick(cands, (ip, rng.randrange(1024, 65536), 80))] += 1
    fair = flows_n / n
    assert all(abs(c - fair) <= 0.25 * fair for c in counts.values()), counts
