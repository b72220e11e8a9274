"""Outcome metrics of a run, computed from its samples, requests and events (pure; each metric defined once).

Definitions (sim seconds; a sample's state holds until the next sample):
- availability: share of client requests that succeeded (1.0 when there were none).
- worst_minute_availability: the lowest availability of any sim minute that had requests.
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
- checker_lateness_p99_s: 99th percentile of how late probes started against their schedule.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


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


class RequestTally:
    """Request metrics added up request by request: counters, per-minute buckets and a bounded latency sample."""

    def __init__(self, latency_reservoir: int = 50_000, seed: int = 0) -> None:
        self.total = self.failed = 0
        self.per_minute: dict[int, list[int]] = {}
        self._latencies: list[float] = []
        self._ok_seen = 0
        self._cap = latency_reservoir
        self._rng = random.Random(seed)

    def add(self, started: float, latency_s: float, ok: bool) -> None:
        self.total += 1
        bucket = self.per_minute.setdefault(int(started // 60), [0, 0])
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

    def result(self) -> dict[str, float | int | None]:
        worst = min((1 - f / n for n, f in self.per_minute.values()), default=1.0)
        return {
            "availability": round(1 - self.failed / self.total, 6) if self.total else 1.0,
            "worst_minute_availability": round(worst, 6),
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

    def add(self, kind: str, subject: str) -> None:
        if kind == "ejected":
            self.ejections += 1
            self._ejected_once.add(subject)
        elif kind == "restored" and subject in self._ejected_once:
            self.flaps += 1
        elif kind == "dns_removed":
            self.dns_failovers += 1

    def result(self) -> dict[str, int]:
        return {"ejections": self.ejections, "flaps": self.flaps, "dns_failovers": self.dns_failovers}


def event_metrics(events: Iterable[tuple[str, str]]) -> dict[str, int]:
    """From (kind, subject) pairs in time order, as the load balancer emits them."""
    tally = EventTally()
    for kind, subject in events:
        tally.add(kind, subject)
    return tally.result()
