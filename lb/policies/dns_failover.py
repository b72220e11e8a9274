"""`dns-failover`: automatic AZ DNS failover; a zone with too few in-service targets leaves DNS."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import Field

from lb.policies.base import BuiltinPolicy
from lb.policies.registry import register
from lb.policies.shared import fail_over_dns, groups
from lb.policy import Decision, Snapshot, Stage


@register
@dataclass(eq=False)
class DnsFailover(BuiltinPolicy):
    """Automatic AZ DNS failover: a zone with too few in-service targets leaves the load balancer's DNS.

    Parameters:
    - `enabled` (default true): false publishes every zone whatever any policy decided: the operator switch
      that disabled automatic health-check failover at 09:36 on 2025-10-20 and restored the healthy capacity
      (docs/sources.md). Flip it at run time with `set_param("enabled", False)`.
    - `min_healthy` (default 1): a zone with fewer in-service targets leaves DNS (per zone; in total with
      cross-zone on, where a single target group leaves every zone in or every zone failing).
    If every zone fails, every zone stays published. Source: NLB "no healthy target in an enabled AZ ->
    its IP leaves DNS" and the outage summary, where this failover took healthy capacity out of service
    (docs/sources.md).
    """

    name = "dns-failover"
    origin = "AWS (NLB DNS failover)"
    enabled: bool = True
    min_healthy: Annotated[int, Field(ge=1)] = 1

    def stage(self) -> int:
        # Switched off, it overrides every DNS removal, so it must run after all of them (but before
        # velocity, which then sees no removal to charge).
        return Stage.DECIDE if self.enabled else Stage.OVERRIDE

    def on_dns(self, snap: Snapshot, d: Decision) -> None:
        if not self.enabled:
            for z in d.dns:
                d.dns[z] = True
            return
        failing: set[str] = set()
        for zones, targets in groups(snap):
            if sum(1 for t in targets if t.id in d.in_service) < self.min_healthy:
                failing.update(zones)
        fail_over_dns(d, failing)
