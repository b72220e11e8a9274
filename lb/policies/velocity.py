"""`velocity`: AWS's post-incident fix; limit how fast health checks may remove capacity."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Annotated

from pydantic import Field

from lb.policies.base import BuiltinPolicy, Percent, Positive
from lb.policies.registry import register
from lb.policies.shared import (
    CONFIRM_FAILURES,
    CONFIRM_WINDOW_S,
    EPS,
    Base,
    ConfirmFailures,
    ConfirmWindow,
    base_of,
    candidate_order,
    restore,
)
from lb.policy import Decision, Snapshot, Stage, WithholdReason, confirmed_down


@register
@dataclass(eq=False)
class Velocity(BuiltinPolicy):
    """Velocity control (AWS's post-incident fix): limit how fast health checks may remove capacity.

    Parameters:
    - `max_removed_percent` (default 10): capacity that may be removed per window, in percent of the
      targets that are or were in service; at least `min_budget` targets (default 1, so a small fleet can
      still shed one bad target, as Envoy's `always_eject_one_host`; 0 makes the percentage strict).
    - `window_s` (default 300): the sliding window. Removals are remembered with their times; restorations
      are free.
    - `floor_percent` (default 50): never let its own removals take in-service capacity below this share
      of the targets that are or were in service.
    - `base` (default `served`): what both shares are of. `served` leaves out targets that never served
      since they registered: 18 new instances still `initial` next to 12 serving ones must not raise the
      floor to 15 (blocking every removal) nor the budget to 3. `registered` counts every registered target.
    Both kinds of removal share the budget: a target leaving service costs 1 (target phase), a zone leaving
    DNS costs the in-service targets it holds (DNS phase; a zone with none is free). A removal that does not
    fit is withheld: the target stays in service, the zone stays published, and it is counted with its reason,
    `floor` if it would break the floor, else `budget`. Source: the AWS summary of 2025-10-20 (no public
    setting exists, the parameters are lbsim's; docs/sources.md).
    Runs last in each phase (`Stage.ACCOUNT`) so it sees, and charges, every removal of the step.
    Data-path confirmation (lbsim's addition; `confirm_failures=0` gives the reference behaviour exactly): a
    target that probes call unhealthy and whose last `confirm_failures` (default 3) real connections failed,
    the latest within `confirm_window_s` (default 30), is really down (`lb.policy.confirmed_down`).
    A confirmed-down target leaves at once, free and whatever the floor: its capacity is gone already, and
    holding it in service only sends traffic to it (and keeps a dead zone published).
    """

    name = "velocity"
    origin = "AWS (post-incident fix; parameters and data-path confirmation lbsim)"
    max_removed_percent: Percent = 10.0
    window_s: Positive = 300.0
    floor_percent: Percent = 50.0
    min_budget: Annotated[int, Field(ge=0)] = 1
    base: Base = "served"
    confirm_failures: ConfirmFailures = CONFIRM_FAILURES
    confirm_window_s: ConfirmWindow = CONFIRM_WINDOW_S
    _log: deque[tuple[float, int]] = field(default_factory=deque, init=False, repr=False)
    _prev_in: set[str] | None = field(default=None, init=False, repr=False)
    _prev_dns: set[str] | None = field(default=None, init=False, repr=False)

    def stage(self) -> int:
        return Stage.ACCOUNT

    def budget(self, base_count: int) -> float:
        """Capacity that may be removed per window, out of `base_count` targets (see `base`)."""
        return max(float(self.min_budget), self.max_removed_percent * base_count / 100.0)

    def floor(self, base_count: int) -> float:
        """In-service capacity its removals never go below, out of `base_count` targets (see `base`)."""
        return self.floor_percent * base_count / 100.0

    def used(self, now: float) -> int:
        """Capacity removed within the window ending at `now` (older entries are dropped)."""
        while self._log and self._log[0][0] <= now - self.window_s:
            self._log.popleft()
        return sum(cost for _, cost in self._log)

    def refusal(self, used: int, cost: int, capacity: int, base_count: int) -> WithholdReason | None:
        """Why a removal of `cost` does not fit, or None if it does. The floor is named first: waiting for the
        window to renew the budget would not let such a removal through."""
        if capacity - cost < self.floor(base_count) - EPS:
            return WithholdReason.FLOOR
        if used + cost > self.budget(base_count) + EPS:
            return WithholdReason.BUDGET
        return None

    def on_targets(self, snap: Snapshot, d: Decision) -> None:
        live = snap.registered()
        if self._prev_in is not None:
            leaving = sorted(
                (
                    t
                    for t in live
                    if t.id in self._prev_in
                    and t.id not in d.in_service
                    and not confirmed_down(t, snap.now, self.confirm_failures, self.confirm_window_s)
                ),
                key=candidate_order,
            )
            if leaving:
                used = self.used(snap.now)
                capacity = sum(1 for t in live if t.id in d.in_service) + len(leaving)
                n = len(base_of(live, self.base))
                for t in leaving:
                    refused = self.refusal(used, 1, capacity, n)
                    if refused is None:
                        self._log.append((snap.now, 1))
                        used += 1
                        capacity -= 1
                    else:
                        restore(d, t.id)
                        d.withhold(self.name, t.id, refused)
        self._prev_in = {t.id for t in live if t.id in d.in_service}

    def on_dns(self, snap: Snapshot, d: Decision) -> None:
        if self._prev_dns is not None:
            live = snap.registered()
            held = Counter(t.zone for t in live if t.id in d.in_service)
            leaving = sorted(
                (z for z in snap.zones if z in self._prev_dns and not d.dns[z]), key=lambda z: (held[z], z)
            )
            if leaving:
                used = self.used(snap.now)
                capacity = sum(held[z] for z in snap.zones if d.dns[z]) + sum(held[z] for z in leaving)
                n = len(base_of(live, self.base))
                for z in leaving:
                    cost = held[z]
                    if cost == 0:
                        continue  # a zone holding no in-service target removes no capacity
                    refused = self.refusal(used, cost, capacity, n)
                    if refused is None:
                        self._log.append((snap.now, cost))
                        used += cost
                        capacity -= cost
                    else:
                        d.dns[z] = True
                        d.withhold(self.name, f"zone:{z}", refused)
        self._prev_dns = {z for z in snap.zones if d.dns[z]}
