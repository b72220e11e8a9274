"""Finds the stages of a control-plane cascade in a run's sampled time series, from the metrics alone.

The stages are the links of the 2025-10-20 chain (docs/sources.md). Each is detected from what the run
recorded, never copied from the timeline, so a policy or protection that prevents a stage makes it vanish:
1. `dns-record-empty`: the lease store's DNS record has no address (`cp_record == 0`).
2. `leases-expiring`: from the first host lease lost until the leased count reaches its lowest point.
3. `host-manager-collapse`: recovery items keep timing out while the queue stays full and no lease is
   re-established, for at least `collapse_window_s`; if the record was empty, only once it is back (the
   collapse is what outlasts its trigger: while the store cannot be found no item could succeed anyway).
   Between two consecutive samples the queue is full at both (`recovery_depth >= full_depth`: deep enough that no
   item can finish before its timeout), goodput did not move, and the timeouts counter rose within the trailing
   `timeout_window_s`. A full queue whose items fail or finish is not a collapse, nor are timeouts in a queue
   that is not full. From the first to the last such stretch.
4. `leases-restored`: from the first lease re-established after the record came back to all hosts leased.
5. `network-backlog`: the network manager's backlog is at least `backlog_min` items.
6. `health-check-flapping`: the load balancer's health transitions come at `flap_min` or more per
   `flap_window_s`, in both directions (targets failing and passing again: a zone dying at once is not
   flapping), from the first such window to the last.
7. `dns-failover-capacity-removed`: a zone left the load balancer's DNS while it still had targets that could
   serve (ground truth: `zone_in_dns:Z` falls to 0 while `can_serve:Z` is above 0, per zone Z); from the first
   such departure until the last of those zones is back. A zone taken out with nothing left that could serve is
   a failover doing its job, not capacity removed. Without the per-zone columns the stage cannot be confirmed
   and is absent.
8. `recovered`: after every other stage ended, all zones are in DNS, no target that could serve is out of
   service, and the backlog is empty; until the end of the run.
A stage that did not happen is absent. A stage still going at the end of the run ends at the run's end.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

Row = Mapping[str, float]

STAGE_NAMES = (
    "dns-record-empty",
    "leases-expiring",
    "host-manager-collapse",
    "leases-restored",
    "network-backlog",
    "health-check-flapping",
    "dns-failover-capacity-removed",
    "recovered",
)


@dataclass(frozen=True, slots=True)
class Stage:
    name: str
    start_s: float
    end_s: float

    def to_json(self) -> dict[str, float | str]:
        return {"name": self.name, "start_s": round(self.start_s, 3), "end_s": round(self.end_s, 3)}


@dataclass(frozen=True, slots=True)
class StageRules:
    zones: int
    hosts: int
    collapse_window_s: float = 30.0
    # The recovery queue's depth from which no item can finish before its timeout (host manager rule 6), or its
    # admission limit when that is lower: the depth at which the queue is "full".
    full_depth: float = 1.0
    # Items keep timing out while some timed out within this trailing window (an item timeout plus a scrape).
    timeout_window_s: float = 20.0
    backlog_min: float = 3.0
    flap_window_s: float = 30.0
    flap_min: float = 3.0


def _intervals(rows: Sequence[Row], on: Sequence[bool], end: float) -> list[tuple[float, float]]:
    """Maximal runs of samples where `on` holds, as (first sample's t, first sample after the run's t)."""
    out: list[tuple[float, float]] = []
    start: float | None = None
    for row, flag in zip(rows, on, strict=True):
        if flag and start is None:
            start = row["t"]
        elif not flag and start is not None:
            out.append((start, row["t"]))
            start = None
    if start is not None:
        out.append((start, end))
    return out


def _has(rows: Sequence[Row], column: str) -> bool:
    return bool(rows) and all(column in r for r in rows)


def detect_stages(rows: Sequence[Row], rules: StageRules, end_s: float) -> list[Stage]:
    """The stages found in `rows` (samples sorted by `t`), in order of their start."""
    stages: list[Stage] = []
    if not rows:
        return stages
    record_back_at: float | None = None
    if _has(rows, "cp_record"):
        empty = _intervals(rows, [r["cp_record"] == 0 for r in rows], end_s)
        if empty:
            start, stop = empty[0]
            stages.append(Stage("dns-record-empty", start, stop))
            record_back_at = stop if stop < end_s else None
    if _has(rows, "hosts_leased"):
        stages.extend(_lease_stages(rows, rules, end_s, record_back_at))
    cp_columns = ("recovery_depth", "recovery_timeouts_total", "recovery_goodput_total")
    # A collapse is what outlasts its trigger: with a record outage, only once the record is back (while the store
    # cannot be found, no item could re-establish a lease anyway).
    record_outage = any(s.name == "dns-record-empty" for s in stages)
    if all(_has(rows, c) for c in cp_columns) and (record_back_at is not None or not record_outage):
        collapse = _collapse(rows, rules, end_s, since=record_back_at if record_outage else None)
        if collapse is not None:
            stages.append(collapse)
    if _has(rows, "net_backlog"):
        backlog = _intervals(rows, [r["net_backlog"] >= rules.backlog_min for r in rows], end_s)
        if backlog:
            stages.append(Stage("network-backlog", backlog[0][0], backlog[-1][1]))
    if _has(rows, "transitions_total"):
        flapping = _flapping(rows, rules, end_s)
        if flapping is not None:
            stages.append(flapping)
    removed = _capacity_removed(rows, end_s)
    if removed is not None:
        stages.append(removed)
    recovered = _recovered(rows, rules, end_s, stages)
    if recovered is not None:
        stages.append(recovered)
    stages.sort(key=lambda s: (s.start_s, STAGE_NAMES.index(s.name)))
    return stages


def _lease_stages(rows: Sequence[Row], rules: StageRules, end_s: float, back_at: float | None) -> list[Stage]:
    out: list[Stage] = []
    leased = [r["hosts_leased"] for r in rows]
    lost = next((i for i, n in enumerate(leased) if n < rules.hosts), None)
    if lost is None:
        return out
    low = min(leased[lost:])
    low_at = next(i for i in range(lost, len(rows)) if leased[i] == low)
    out.append(Stage("leases-expiring", rows[lost]["t"], rows[low_at]["t"]))
    if back_at is None or not _has(rows, "recovery_goodput_total"):
        return out
    after = [i for i, r in enumerate(rows) if r["t"] >= back_at]
    if not after:
        return out
    goodput = [r["recovery_goodput_total"] for r in rows]
    # The first sample after the record came back whose goodput moved: leases are being re-established.
    moving = next((i for i in after[1:] if goodput[i] > goodput[i - 1]), None)
    if moving is not None:
        full = next((i for i in range(moving, len(rows)) if leased[i] >= rules.hosts), None)
        out.append(Stage("leases-restored", rows[moving]["t"], rows[full]["t"] if full is not None else end_s))
    return out


def _collapse(rows: Sequence[Row], rules: StageRules, end_s: float, since: float | None) -> Stage | None:
    """From the first to the last stretch of at least collapse_window_s in which items kept timing out while the
    queue stayed full and no lease was re-established (rule 3), counting only from the sample at `since` on."""
    first = next((i for i, r in enumerate(rows) if r["t"] >= since), len(rows)) if since is not None else 0
    depth = [r["recovery_depth"] for r in rows]
    timeouts = [r["recovery_timeouts_total"] for r in rows]
    goodput = [r["recovery_goodput_total"] for r in rows]
    stuck = [False] * len(rows)
    j = 0
    for i in range(first + 1, len(rows)):
        t = rows[i]["t"]
        while rows[j + 1]["t"] <= t - rules.timeout_window_s:
            j += 1
        full = depth[i - 1] >= rules.full_depth and depth[i] >= rules.full_depth
        stuck[i] = full and goodput[i] == goodput[i - 1] and timeouts[i] > timeouts[min(j, i - 1)]
    spans: list[tuple[float, float]] = []
    i = 1
    while i < len(rows):
        if not stuck[i]:
            i += 1
            continue
        k = i
        while k < len(rows) and stuck[k]:
            k += 1
        # Samples i-1 .. k-1 are joined by stuck steps: the span runs from i-1 to the first sample that is not.
        span = (rows[i - 1]["t"], rows[k]["t"] if k < len(rows) else end_s)
        if span[1] - span[0] >= rules.collapse_window_s:
            spans.append(span)
        i = k
    if not spans:
        return None
    return Stage("host-manager-collapse", spans[0][0], spans[-1][1])


def _capacity_removed(rows: Sequence[Row], end_s: float) -> Stage | None:
    """From the first zone leaving DNS while it had targets that could serve until the last such zone is back
    (rule 7)."""
    zones = sorted(k.split(":", 1)[1] for k in rows[0] if k.startswith(_IN_DNS))
    spans: list[tuple[float, float]] = []
    for zone in zones:
        in_dns, can_serve = _IN_DNS + zone, _CAN_SERVE + zone
        if not (_has(rows, in_dns) and _has(rows, can_serve)):
            continue
        out = [r[in_dns] < 1 for r in rows]
        i = 0
        while i < len(rows):
            if not out[i]:
                i += 1
                continue
            k = next((k for k in range(i, len(rows)) if not out[k]), len(rows))
            # Judged when the zone is first seen out: had it still something that could serve?
            if rows[i][can_serve] > 0:
                spans.append((rows[i]["t"], rows[k]["t"] if k < len(rows) else end_s))
            i = k
    if not spans:
        return None
    return Stage("dns-failover-capacity-removed", min(s for s, _ in spans), max(e for _, e in spans))


# Per-zone columns: 1 while the zone's node is published in DNS; targets in the zone that could serve.
_IN_DNS = "zone_in_dns:"
_CAN_SERVE = "can_serve:"


def _flapping(rows: Sequence[Row], rules: StageRules, end_s: float) -> Stage | None:
    """First to last window of flap_window_s that saw at least flap_min health transitions."""
    first: float | None = None
    last: float | None = None
    j = 0
    for i, row in enumerate(rows):
        while rows[j]["t"] < row["t"] - rules.flap_window_s:
            j += 1
        both_ways = all(row[c] > rows[j][c] for c in _DIRECTIONS if c in row)
        if row["transitions_total"] - rows[j]["transitions_total"] >= rules.flap_min and both_ways:
            # The window (rows[j].t, row.t] holds the burst; it began at the first transition in it.
            k = j
            while k < i and rows[k + 1]["transitions_total"] == rows[j]["transitions_total"]:
                k += 1
            start = rows[k]["t"]
            first = start if first is None else min(first, start)
            last = row["t"]
    if first is None or last is None:
        return None
    return Stage("health-check-flapping", first, min(last, end_s))


# Optional columns: transitions healthy -> unhealthy and back, counted separately.
_DIRECTIONS = ("transitions_down_total", "transitions_up_total")


def _recovered(rows: Sequence[Row], rules: StageRules, end_s: float, stages: Sequence[Stage]) -> Stage | None:
    if not stages:
        return None
    after = max(s.end_s for s in stages)
    if after >= end_s:
        return None
    for r in rows:
        if r["t"] < after:
            continue
        if r["t"] >= end_s:
            break  # the final scrape at the end is not a recovery
        if r.get("zones_in_dns", rules.zones) < rules.zones or r.get("net_backlog", 0.0) >= rules.backlog_min:
            continue
        if r.get("false_out", 0.0) > 0:
            continue
        return Stage("recovered", r["t"], end_s)
    return None
