"""`fail-open`: AWS NLB's default; nothing in service anywhere -> every zone routes to all its targets."""

from __future__ import annotations

from dataclasses import dataclass

from lb.policies.base import BuiltinPolicy
from lb.policies.registry import register
from lb.policies.shared import escalate
from lb.policy import Decision, Snapshot, ZoneMode


@register
@dataclass(eq=False)
class FailOpen(BuiltinPolicy):
    """AWS NLB default: when no target in any zone is in service, every zone routes to all its targets.

    Source: ELB NLB guide, "Target group health checks": if all targets fail in all enabled zones, or the
    target group is empty, the NLB fails open (docs/sources.md). "In service" is the engine's view
    after the target phase, so a target a limiter kept in service counts as healthy.
    """

    name = "fail-open"
    origin = "AWS (NLB fail-open)"

    def on_zones(self, snap: Snapshot, d: Decision) -> None:
        if not any(t.id in d.in_service for t in snap.registered()):
            for z in snap.zones:
                escalate(d, z, ZoneMode.FAIL_OPEN)

