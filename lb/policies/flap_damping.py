"""`flap-damping`: route-flap damping (RFC 2439) for targets; hold out a target whose health keeps flapping."""

from __future__ import annotations

from dataclasses import dataclass, field

from lb.policies.base import BuiltinPolicy, Positive
from lb.policies.registry import register
from lb.policy import Decision, Snapshot
from lb.targets import TargetState


@register
@dataclass(eq=False)
class FlapDamping(BuiltinPolicy):
    """Route-flap damping (RFC 2439) applied to targets: hold out a target whose health keeps flapping.

    Each health transition of a target (healthy <-> unhealthy, seen by comparing its state and `since` with
    the previous step; a changed `since` with an unchanged state counts as two) adds `penalty` (default 1000)
    to a figure of merit that halves every `half_life_s` (60). Above `suppress_threshold` (2000) the target is
    suppressed: held out of service even while healthy, until the figure decays below `reuse_threshold` (750).
    As in RFC 2439 the figure is capped at reuse * 2^(max_suppress_s / half_life_s), so once flapping stops a
    target is back within `max_suppress_s` (600).

    A suppressed target is also added to `Decision.excluded`: it is held out by a deliberate decision, not
    because the zone lacks capacity, so it must not count against zone percentages. Otherwise damping a few
    flappers could itself push a zone into panic, routing failover or DNS failover, and panic would route
    to every target, flappers included, undoing the damping (Envoy excludes hosts from the panic denominator
    for the same reason). First verdicts of new targets are not flaps.
    """

    name = "flap-damping"
    origin = "lbsim (after BGP route-flap damping, RFC 2439)"
    penalty: Positive = 1000.0
    half_life_s: Positive = 60.0
    suppress_threshold: Positive = 2000.0
    reuse_threshold: Positive = 750.0
    max_suppress_s: Positive = 600.0
    _seen: dict[str, tuple[TargetState, float]] = field(default_factory=dict, init=False, repr=False)
    _merit: dict[str, tuple[float, float]] = field(default_factory=dict, init=False, repr=False)
    _suppressed: set[str] = field(default_factory=set, init=False, repr=False)

    def _check(self) -> None:
        if not self.reuse_threshold < self.suppress_threshold:
            raise self._refuse(
                f"need 0 < reuse_threshold < suppress_threshold, got {self.reuse_threshold:g} and "
                f"{self.suppress_threshold:g}"
            )
        if not self.ceiling() > self.suppress_threshold:
            raise self._refuse(
                f"the penalty ceiling reuse_threshold * 2^(max_suppress_s/half_life_s) = {self.ceiling():g} must "
                f"exceed suppress_threshold {self.suppress_threshold:g}, or nothing is ever suppressed"
            )

    def ceiling(self) -> float:
        return float(self.reuse_threshold * 2.0 ** min(self.max_suppress_s / self.half_life_s, 1000.0))

    def merit(self, target: str, now: float) -> float:
        """The target's decayed figure of merit at `now`."""
        value, at = self._merit.get(target, (0.0, now))
        return float(value * 2.0 ** (-max(0.0, now - at) / self.half_life_s))

    def is_suppressed(self, target: str) -> bool:
        return target in self._suppressed

    def _forget(self, target: str) -> None:
        self._seen.pop(target, None)
        self._merit.pop(target, None)
        self._suppressed.discard(target)

    def on_targets(self, snap: Snapshot, d: Decision) -> None:
        now = snap.now
        present = {t.id for t in snap.targets}
        for gone in [tid for tid in self._seen if tid not in present]:
            self._forget(gone)
        verdicts = (TargetState.HEALTHY, TargetState.UNHEALTHY)
        for t in snap.targets:
            if t.state not in verdicts:
                if t.state != TargetState.INITIAL or t.id in self._seen:
                    self._forget(t.id)  # draining, unused or re-registered: a new life, no history
                continue
            prev = self._seen.get(t.id)
            self._seen[t.id] = (t.state, t.since)
            flaps = 0
            if prev is not None and prev[0] in verdicts:
                if prev[0] != t.state:
                    flaps = 1
                elif prev[1] != t.since:
                    flaps = 2  # it went away and came back between two steps
            if flaps:
                self._merit[t.id] = (min(self.merit(t.id, now) + flaps * self.penalty, self.ceiling()), now)
            value = self.merit(t.id, now)
            if t.id in self._suppressed:
                if value < self.reuse_threshold:
                    self._suppressed.discard(t.id)
            elif value > self.suppress_threshold:
                self._suppressed.add(t.id)
            if t.id in self._suppressed:
                d.in_service.discard(t.id)
                d.suppressed.add(t.id)
                d.excluded.add(t.id)
