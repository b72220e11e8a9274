"""Exports what only the scenario runner knows, the targets' ground truth and the clients' request outcomes, as
Prometheus series, so that a recorder (or a real Prometheus) sees the whole run through /metrics."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# The sets a sample of the run counts, as `lbsim_truth_targets{set=...}`.
TRUTH_SETS = ("registered", "routed", "serving", "can_serve", "false_out", "missed_in")


class RunCollector(Collector):
    """Reads the runner's latest sample and request tallies when scraped."""

    def __init__(self, latest: Callable[[], Mapping[str, float]], outcomes: Counter[str]) -> None:
        self._latest = latest
        self._outcomes = outcomes

    def describe(self) -> Iterable[Metric]:
        return self._families(fill=False)

    def collect(self) -> Iterable[Metric]:
        return self._families(fill=True)

    def _families(self, fill: bool) -> list[Metric]:
        truth = GaugeMetricFamily(
            "lbsim_truth_targets",
            "Targets in each set at the last sample: registered, routed (by a node DNS publishes), serving, "
            "can_serve (ground truth), false_out (could serve, admitted, not routed), missed_in (routed, cannot "
            "serve)",
            labels=["set"],
        )
        requests = CounterMetricFamily(
            "lbsim_client_requests",
            "Client requests by outcome: ok, or the error kind (timeout, refused, reset, status_NNN, no_address, "
            "overload, malformed)",
            labels=["outcome"],
        )
        if fill:
            latest = self._latest()
            for name in TRUTH_SETS:
                if name in latest:
                    truth.add_metric([name], latest[name])
            for outcome, n in sorted(self._outcomes.items()):
                requests.add_metric([outcome], n)
        return [truth, requests]
