"""Prometheus metrics of the targets, read from the registry at scrape time (labels: zone and one more)."""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from backends.netpath import PathState

if TYPE_CHECKING:  # `fleet.Targets` registers this collector: a run-time import would be circular
    from backends.fleet import Targets


class TargetsCollector(Collector):
    """Reads `Targets` when scraped, so the data path never touches a metric."""

    def __init__(self, targets: Targets) -> None:
        self._targets = targets

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        return self._families(fill=True)

    def _families(self, fill: bool = False) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "lbsim_backend_requests",
            "Backend requests by zone and outcome (ok, error, overloaded, hung)",
            labels=["zone", "outcome"],
        )
        connections = CounterMetricFamily(
            "lbsim_netpath_connections",
            "Connections the net paths accepted, by zone and outcome (relayed, upstream_error, reset, held, "
            "and cut: live connections reset by a state change)",
            labels=["zone", "outcome"],
        )
        can_serve = GaugeMetricFamily(
            "lbsim_targets_can_serve", "Targets that could serve now (ground truth)", labels=["zone"]
        )
        by_state = GaugeMetricFamily(
            "lbsim_targets_by_path_state", "Targets by zone and net path state", labels=["zone", "state"]
        )
        if fill:
            request_totals, connection_totals = self._targets.totals()
            for (zone, outcome), n in sorted(request_totals.items()):
                requests.add_metric([zone, outcome], n)
            for (zone, outcome), n in sorted(connection_totals.items()):
                connections.add_metric([zone, outcome], n)
            serving: collections.Counter[str] = collections.Counter()
            states: collections.Counter[tuple[str, str]] = collections.Counter()
            for info in self._targets.snapshot():
                serving[info.zone] += info.can_serve
                states[info.zone, info.path.state.value] += 1
            for zone in sorted({zone for zone, _ in states}):
                can_serve.add_metric([zone], serving[zone])
                # Every state, zeros included, so a series does not vanish when its last target leaves it.
                for state in PathState:
                    by_state.add_metric([zone, state.value], states[zone, state.value])
        yield from (requests, connections, can_serve, by_state)
