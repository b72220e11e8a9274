"""Outcome metrics of a run, computed from its samples, requests and events (pure; each metric defined once).

Definitions (sim seconds; a sample's state holds until the next sample):
- availability: share of client requests that succeeded (1.0 when there were none).
- worst_minute_availability: the lowest availability of any 60 sim-second window that had requests, the window
  sliding by 1 s over the span of the requests (a shorter span is one window). Sliding, not calendar minutes:
  with fixed minute bins the figure depended on where an outage fell against a minute boundary (split across
  two bins, the same outage scored up to twice as well), so two runs of the same scenario differed by that
  phase alone.
- latency_p99_s: 99th percentile latency of successful requests.
- min_routable_fraction: the lowest share of registered targets that could receive new connections (routable
  from a zone node that DNS publishes) at any sample.
- capacity_lost_target_seconds: target-seconds in which a target could serve (ground truth) but received no
  new connections: health ejections, DNS failover and not-yet-admitted targets all count.
- false_ejection_target_seconds: target-seconds in which a target that had been admitted once could serve but
  no zone node routed to it.
- missed_ejection_target_seconds: target-seconds in which a target that could not serve was receiving new
  connections (routed from a zone node that DNS publishes).
- ejections: targets taken out of service; flaps: returns to service after an ejection.
- dns_failovers: zone nodes removed from DNS.
- withheld_by_reason: removals the protections withheld (each hold of a target or zone counted once, when it
  begins), by reason: every `lb.policy.WithholdReason`, zeros included.
- checker_lateness_p99_s: 99th percentile of how late probes started against their schedule.
- time_to_detect_s (mean) and time_to_detect_max_s: for each real failure (a registered target that could serve
  and was receiving new connections stops being able to serve), the time until it receives no more new
  connections; `failures_undetected` counts failures still receiving connections when they ended or the run
  did.
- time_to_recover_s (mean) and time_to_recover_max_s: for each such failure that ended (the target can serve
  again), the time until it receives new connections again; `recoveries_pending` counts those not yet back.
- fail_open_zone_seconds, panic_zone_seconds: zone-seconds a zone node spent routing to every target (fail-open)
  or ignoring health (panic), from the load balancer's mode events.
Times are measured on the samples (resolution: the sample interval).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from lb.policy import WithholdReason

# A scenario's headline metric (`headline:` in its file): what `should_win` claims the named policies do better
# than naive, and what tests/test_should_win.py checks. Shares are better higher, target-seconds lower.
Headline = Literal[
    "availability", "worst_minute_availability", "min_routable_fraction",
    "capacity_lost_target_seconds", "false_ejection_target_seconds", "missed_ejection_target_seconds",
]


def beats(metric: Headline, value: float, baseline: float) -> bool:
    """Whether `value` is strictly better than `baseline` on a headline metric."""
    return value < baseline if metric.endswith("_target_seconds") else value > baseline


@dataclass(frozen=True, slots=True)
class Sample:
    t: float
    registered: frozenset[str]  # targets that count as capacity (not draining or unused)
    routed: frozenset[str]  # in some zone node's routable set
    serving: frozenset[str]  # routed from a zone node that DNS publishes
    can_serve: frozenset[str]  # ground truth
    admitted: frozenset[str]  # targets that have been in service at least once


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0-100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


class CapacityTally:
    """Capacity metrics added up sample by sample, so a long run keeps only the latest sample in memory.

    A sample's state holds until the next sample, or until `end`: time past the scenario's end (a lagging loop
    overshooting) is not counted.
    """

    def __init__(self) -> None:
        self._last: Sample | None = None
        self.lost = self.false_ejection = self.missed = 0.0
        self.min_fraction = 1.0

    def add(self, s: Sample) -> None:
        if self._last is not None:
            self._account(self._last, s.t)
        self._last = s
        if s.registered:
            self.min_fraction = min(self.min_fraction, len(s.serving & s.registered) / len(s.registered))

    def _account(self, s: Sample, until: float) -> None:
        dt = max(0.0, until - s.t)
        self.lost += dt * len(s.can_serve & s.registered - s.serving)
        self.false_ejection += dt * len((s.can_serve & s.admitted & s.registered) - s.routed)
        self.missed += dt * len(s.serving - s.can_serve)

    def result(self, end: float) -> dict[str, float]:
        lost, false_ej, missed = self.lost, self.false_ejection, self.missed
        if self._last is not None:  # the last sample holds until the end, without being added twice
            saved = (self.lost, self.false_ejection, self.missed)
            self._account(self._last, end)
            lost, false_ej, missed = self.lost, self.false_ejection, self.missed
            self.lost, self.false_ejection, self.missed = saved
        return {
            "min_routable_fraction": round(self.min_fraction, 6),
            "capacity_lost_target_seconds": round(lost, 3),
            "false_ejection_target_seconds": round(false_ej, 3),
            "missed_ejection_target_seconds": round(missed, 3),
        }


def capacity_metrics(samples: Sequence[Sample], end: float) -> dict[str, float]:
    tally = CapacityTally()
    for s in samples:
        if s.t >= end:
            break
        tally.add(s)
    return tally.result(end)


# The window of worst_minute_availability, sim seconds.
WORST_WINDOW_S = 60


class RequestTally:
    """Request metrics added up request by request: counters, per-second buckets and a bounded latency sample."""

    def __init__(self, latency_reservoir: int = 50_000, seed: int = 0) -> None:
        self.total = self.failed = 0
        self.per_second: dict[int, list[int]] = {}  # sim second -> [requests, failed]
        self._latencies: list[float] = []
        self._ok_seen = 0
        self._cap = latency_reservoir
        self._rng = random.Random(seed)

    def add(self, started: float, latency_s: float, ok: bool) -> None:
        self.total += 1
        bucket = self.per_second.setdefault(math.floor(started), [0, 0])
        bucket[0] += 1
        if ok:
            # Exact while there are fewer successes than the reservoir holds, a uniform sample after that.
            if len(self._latencies) < self._cap:
                self._latencies.append(latency_s)
            else:
                j = self._rng.randrange(self._ok_seen + 1)
                if j < self._cap:
                    self._latencies[j] = latency_s
            self._ok_seen += 1
        else:
            self.failed += 1
            bucket[1] += 1

    def worst_window(self, width_s: int = WORST_WINDOW_S) -> float:
        """The lowest availability of any `width_s`-second window with requests (see the module's definition)."""
        if not self.per_second:
            return 1.0
        first = min(self.per_second)
        span = max(self.per_second) - first + 1
        # Prefix sums over every second of the span, so each window costs two subtractions.
        total = [0] * (span + 1)
        failed = [0] * (span + 1)
        for second in range(span):
            n, f = self.per_second.get(first + second, (0, 0))
            total[second + 1] = total[second] + n
            failed[second + 1] = failed[second] + f
        width = min(width_s, span)
        worst = 1.0
        for start in range(span - width + 1):
            n = total[start + width] - total[start]
            if n:
                worst = min(worst, 1 - (failed[start + width] - failed[start]) / n)
        return worst

    def result(self) -> dict[str, float | int | None]:
        return {
            "availability": round(1 - self.failed / self.total, 6) if self.total else 1.0,
            "worst_minute_availability": round(self.worst_window(), 6),
            "requests_total": self.total,
            "requests_failed": self.failed,
            "latency_p99_s": percentile(self._latencies, 99),
        }


def request_metrics(results: Iterable[tuple[float, float, bool]]) -> dict[str, float | int | None]:
    """From (started, latency_s, ok) triples."""
    tally = RequestTally()
    for started, latency, ok in results:
        tally.add(started, latency, ok)
    return tally.result()


class EventTally:
    """Event metrics added up event by event, as the load balancer emits them in time order."""

    def __init__(self) -> None:
        self.ejections = self.flaps = self.dns_failovers = 0
        self._ejected_once: set[str] = set()
        self.withheld: dict[str, int] = {r.value: 0 for r in WithholdReason}

    def add(self, kind: str, subject: str, detail: str = "") -> None:
        """One event; a `withheld` one's detail is `policy/reason`."""
        if kind == "withheld":
            reason = detail.rpartition("/")[2]
            self.withheld[reason if reason in self.withheld else WithholdReason.OTHER.value] += 1
        elif kind == "ejected":
            self.ejections += 1
            self._ejected_once.add(subject)
        elif kind == "restored" and subject in self._ejected_once:
            self.flaps += 1
        elif kind == "dns_removed":
            self.dns_failovers += 1

    def result(self) -> dict[str, int]:
        return {"ejections": self.ejections, "flaps": self.flaps, "dns_failovers": self.dns_failovers}

    def withheld_by_reason(self) -> dict[str, int]:
        return dict(self.withheld)


def event_metrics(events: Iterable[tuple[str, str]]) -> dict[str, int]:
    """From (kind, subject) pairs in time order, as the load balancer emits them."""
    tally = EventTally()
    for kind, subject in events:
        tally.add(kind, subject)
    return tally.result()


class RecoveryTally:
    """Time to detect and to recover from real failures, sample by sample.

    A failure starts at the first sample where a registered target that was serving (receiving new connections)
    cannot serve. It is detected at the first sample where it no longer serves; it ends at the first sample
    where it can serve again, and is recovered at the first sample where it serves again.
    """

    def __init__(self) -> None:
        self._prev: Sample | None = None
        self._failing: dict[str, float] = {}  # target -> when it failed, not yet detected
        self._detected: set[str] = set()  # failed and out of service
        self._ended: dict[str, float] = {}  # target -> when it could serve again, not yet back in service
        self.detect: list[float] = []
        self.recover: list[float] = []
        self.undetected = 0

    def add(self, s: Sample) -> None:
        prev = self._prev
        self._prev = s
        if prev is not None:
            for tid in (prev.serving & prev.can_serve & s.registered) - s.can_serve:
                if tid not in self._failing and tid not in self._detected:
                    self._failing[tid] = s.t
        for tid, since in list(self._failing.items()):
            if tid not in s.registered:
                del self._failing[tid]
            elif tid not in s.serving:
                self.detect.append(s.t - since)
                del self._failing[tid]
                self._detected.add(tid)
            elif tid in s.can_serve:
                self.undetected += 1  # it came back before anything noticed
                del self._failing[tid]
        for tid in list(self._detected):
            if tid not in s.registered:
                self._detected.discard(tid)
            elif tid in s.can_serve:
                self._detected.discard(tid)
                self._ended[tid] = s.t
        for tid, since in list(self._ended.items()):
            if tid not in s.registered:
                del self._ended[tid]
            elif tid in s.serving:
                self.recover.append(s.t - since)
                del self._ended[tid]

    def result(self) -> dict[str, float | int | None]:
        def mean(xs: list[float]) -> float | None:
            return round(sum(xs) / len(xs), 3) if xs else None

        return {
            "time_to_detect_s": mean(self.detect),
            "time_to_detect_max_s": round(max(self.detect), 3) if self.detect else None,
            "failures_undetected": self.undetected + len(self._failing),
            "time_to_recover_s": mean(self.recover),
            "time_to_recover_max_s": round(max(self.recover), 3) if self.recover else None,
            "recoveries_pending": len(self._ended),
        }


class ModeTally:
    """Zone-seconds in each routing mode, from (time, zone, mode) events in time order."""

    def __init__(self, start: float = 0.0) -> None:
        self._mode: dict[str, tuple[str, float]] = {}
        self._start = start
        self.seconds: dict[str, float] = {}

    def add(self, t: float, zone: str, mode: str) -> None:
        old, since = self._mode.get(zone, ("normal", self._start))
        self.seconds[old] = self.seconds.get(old, 0.0) + max(0.0, t - since)
        self._mode[zone] = (mode, t)

    def result(self, end: float) -> dict[str, float]:
        totals = dict(self.seconds)
        for mode, since in self._mode.values():
            totals[mode] = totals.get(mode, 0.0) + max(0.0, end - since)
        return {
            "fail_open_zone_seconds": round(totals.get("fail_open", 0.0), 3),
            "panic_zone_seconds": round(totals.get("panic", 0.0), 3),
        }
