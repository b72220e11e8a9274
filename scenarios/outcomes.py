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


def _durations(samples: Sequence[Sample], end: float) -> list[float]:
    """How long each sample's state held, cut at `end`: a run that overshoots its end (a lagging loop) must not
    count time the scenario does not have."""
    out = []
    for i, s in enumerate(samples):
        nxt = samples[i + 1].t if i + 1 < len(samples) else end
        out.append(max(0.0, min(nxt, end) - s.t))
    return out


def capacity_metrics(samples: Sequence[Sample], end: float) -> dict[str, float]:
    lost = false_ej = missed = 0.0
    min_frac = 1.0
    for s, dt in zip(samples, _durations(samples, end), strict=True):
        lost += dt * len(s.can_serve & s.registered - s.serving)
        false_ej += dt * len((s.can_serve & s.admitted & s.registered) - s.routed)
        missed += dt * len(s.serving - s.can_serve)
        if s.registered:
            min_frac = min(min_frac, len(s.serving & s.registered) / len(s.registered))
    return {
        "min_routable_fraction": round(min_frac, 6),
        "capacity_lost_target_seconds": round(lost, 3),
        "false_ejection_target_seconds": round(false_ej, 3),
        "missed_ejection_target_seconds": round(missed, 3),
    }


def request_metrics(results: Iterable[tuple[float, float, bool]]) -> dict[str, float | int | None]:
    """From (started, latency_s, ok) triples."""
    total = failed = 0
    per_minute: dict[int, list[int]] = {}
    latencies: list[float] = []
    for started, latency, ok in results:
        total += 1
        bucket = per_minute.setdefault(int(started // 60), [0, 0])
        bucket[0] += 1
        if ok:
            latencies.append(latency)
        else:
            failed += 1
            bucket[1] += 1
    worst = min((1 - f / n for n, f in per_minute.values()), default=1.0)
    return {
        "availability": round(1 - failed / total, 6) if total else 1.0,
        "worst_minute_availability": round(worst, 6),
        "requests_total": total,
        "requests_failed": failed,
        "latency_p99_s": percentile(latencies, 99),
    }


def event_metrics(events: Iterable[tuple[str, str]]) -> dict[str, int]:
    """From (kind, subject) pairs in time order, as the load balancer emits them."""
    ejections = flaps = dns_failovers = 0
    ejected_once: set[str] = set()
    for kind, subject in events:
        if kind == "ejected":
            ejections += 1
            ejected_once.add(subject)
        elif kind == "restored" and subject in ejected_once:
            flaps += 1
        elif kind == "dns_removed":
            dns_failovers += 1
    return {"ejections": ejections, "flaps": flaps, "dns_failovers": dns_failovers}
