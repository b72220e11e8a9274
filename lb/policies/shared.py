"""What the built-in policies share: zone-mode escalation, groups and shares, restoring, the DNS fail-over rule,
the targets a limiter's shares are of (`base`) and data-path confirmation.

Conventions:
- "registered" = targets that are not draining or unused (`Snapshot.registered`); "served" = registered targets
  that are or were in service since they registered (`Snapshot.served`). The limiters (panic, max-ejection,
  velocity) take their shares of served targets by default (`base=served`), so new targets still in `initial`
  neither inflate a budget nor raise a floor; `base=registered` takes them of every registered target.
  min-healthy keeps AWS's rule: its percentage is of registered targets.
- Thresholds apply per zone with cross-zone off and to the total with cross-zone on (AWS target-group health,
  see docs/sources.md; Envoy computes panic per host set the same way).
- Zone modes only ever escalate (`escalate`), so two policies that both set a mode agree in any order.
- Candidates for ejection are taken in one deterministic order: earliest `since` first, then id.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Literal

from pydantic import Field

from lb.policies.base import Positive
from lb.policy import Decision, Snapshot, TargetView, ZoneMode

# Float budgets such as 10% of 30 targets come out as 3.0000000000000004; compare with a little slack.
EPS = 1e-9

# How open a zone mode is. Policies only ever raise a zone's mode along this order, so the result does not
# depend on which policy ran first. Routing to every target beats refusing: a refused connection fails for
# sure, while an unhealthy-looking target may still serve (AWS's stated reason for fail-open).
MODE_PRECEDENCE: Mapping[ZoneMode, int] = {
    ZoneMode.NORMAL: 0,
    ZoneMode.FAIL_CLOSED: 1,
    ZoneMode.PANIC: 2,
    ZoneMode.FAIL_OPEN: 3,
}


def escalate(d: Decision, zone: str, mode: ZoneMode) -> None:
    """Set `zone`'s mode to `mode` unless it already is in a more open one."""
    if MODE_PRECEDENCE[mode] > MODE_PRECEDENCE[d.zone_mode[zone]]:
        d.zone_mode[zone] = mode


def groups(snap: Snapshot) -> list[tuple[tuple[str, ...], list[TargetView]]]:
    """The units a threshold applies to: each zone with its own registered targets, or, with cross-zone on,
    every zone together over all of them (each node then routes to every zone's targets)."""
    live = snap.registered()
    if snap.cross_zone:
        return [(snap.zones, live)]
    return [((z,), [t for t in live if t.zone == z]) for z in snap.zones]


# What a limiter's shares are of: targets that are or were in service since they registered, or all registered.
Base = Literal["served", "registered"]


def base_of(targets: Iterable[TargetView], base: Base) -> list[TargetView]:
    """The targets a limiter's shares are of (see `Base`): those that served, or every registered one."""
    return [t for t in targets if base == "registered" or t.served]


def in_service_percent(targets: Sequence[TargetView], d: Decision) -> float:
    """Share of `targets` in service, leaving excluded ones out of the denominator (Envoy's excluded hosts).
    No counted target at all is 0%: an empty group is as unhealthy as it gets (AWS fails open on it)."""
    counted = [t for t in targets if t.id not in d.excluded]
    if not counted:
        return 0.0
    return 100.0 * sum(1 for t in counted if t.id in d.in_service) / len(counted)


def candidate_order(t: TargetView) -> tuple[float, str]:
    return (t.since, t.id)


def restore(d: Decision, target: str) -> None:
    """Put a target back in service; it then counts again in every share, whoever had held it out."""
    d.in_service.add(target)
    d.suppressed.discard(target)
    d.excluded.discard(target)


def fail_over_dns(d: Decision, failing: set[str]) -> None:
    """Take `failing` zones out of DNS the AWS way: if they are all the zones, none is taken out; if the
    result would publish no zone at all, every zone is published (NLB guide: "if all zones are unhealthy,
    traffic goes to all zones"; docs/sources.md). With two such policies the outcome is the same in either order."""
    if not failing or failing >= set(d.dns):
        return
    for z in failing:
        d.dns[z] = False
    if not any(d.dns.values()):
        for z in d.dns:
            d.dns[z] = True


# Data-path confirmation, shared by the limiters (panic, max-ejection, velocity; see `lb.policy.confirmed_down`).
# Three failed connections in a row are the least that is not one unlucky flow, and they come within a second or
# two at the scenarios' traffic rates; evidence older than the window no longer counts.
CONFIRM_FAILURES = 3
CONFIRM_WINDOW_S = 30.0
ConfirmFailures = Annotated[int, Field(ge=0)]  # 0 = off: the reference behaviour
ConfirmWindow = Positive  # sim seconds
