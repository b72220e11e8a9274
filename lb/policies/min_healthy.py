"""`min-healthy`: AWS target-group health thresholds; below a healthy count or share a zone fails over."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Final, Literal

from pydantic import Field

from lb.policies.base import NAMES, OFF, BuiltinPolicy, Percent
from lb.policies.registry import register
from lb.policies.shared import EPS, escalate, fail_over_dns, groups, in_service_percent
from lb.policy import Decision, Snapshot, ZoneMode

ROUTING_FAILOVER: Final = "routing-failover"
DNS_FAILOVER: Final = "dns-failover"
Action = Literal["routing-failover", "dns-failover"]


@register
@dataclass(eq=False)
class MinHealthy(BuiltinPolicy):
    """AWS target-group health thresholds: below a minimum healthy count or percentage, fail over.

    Parameters:
    - `min_count`: minimum in-service targets (AWS `minimum_healthy_targets.count`, default 1); `off` = None.
    - `min_percent`: minimum in-service percentage of registered targets (AWS `...percentage`, default off),
      new targets still `initial` included: that is AWS's rule, so unlike the limiters this has no `base`.
      Either threshold breached triggers the actions.
    - `actions`: `routing-failover` (the breached zone routes to all its targets, AWS
      `unhealthy_state_routing`) and/or `dns-failover` (the breached zone leaves DNS; if every zone would
      leave, all stay).
    Thresholds apply per zone with cross-zone off and to the total with cross-zone on. Reproduces the
    documented example (2 zones x 10 targets, both thresholds 50%, 6 failing in zone B). Source: ELB NLB
    guide, "Target group health" (docs/sources.md). AWS allows separate DNS and routing thresholds;
    compose two instances for that, e.g. `min-healthy(min_percent=50,actions=[dns-failover])`.
    """

    name = "min-healthy"
    origin = "AWS (target-group health)"
    min_count: Annotated[int | None, Field(ge=1), OFF] = 1
    min_percent: Annotated[Percent | None, OFF] = None
    actions: Annotated[frozenset[Action], Field(min_length=1), NAMES] = frozenset({ROUTING_FAILOVER, DNS_FAILOVER})

    def _check(self) -> None:
        if self.min_count is None and self.min_percent is None:
            raise self._refuse("set min_count or min_percent (or both); with neither it would never act")

    def breached_zones(self, snap: Snapshot, d: Decision) -> set[str]:
        """The zones whose group is below either threshold."""
        out: set[str] = set()
        for zones, targets in groups(snap):
            healthy = sum(1 for t in targets if t.id in d.in_service)
            if (self.min_count is not None and healthy < self.min_count) or (
                self.min_percent is not None and in_service_percent(targets, d) < self.min_percent - EPS
            ):
                out.update(zones)
        return out

    def on_zones(self, snap: Snapshot, d: Decision) -> None:
        if ROUTING_FAILOVER in self.actions:
            for z in self.breached_zones(snap, d):
                escalate(d, z, ZoneMode.FAIL_OPEN)

    def on_dns(self, snap: Snapshot, d: Decision) -> None:
        if DNS_FAILOVER in self.actions:
            fail_over_dns(d, self.breached_zones(snap, d))
