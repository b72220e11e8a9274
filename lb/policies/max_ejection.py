"""`max-ejection`: Envoy / gRPC `max_ejection_percent`; cap the share of targets held out of service."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lb.policies.base import BuiltinPolicy, Percent
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
class MaxEjection(BuiltinPolicy):
    """Envoy / gRPC `max_ejection_percent`: cap the share of targets held out of service.

    Parameters:
    - `max_percent` (default 10): the cap, in percent of the targets that are or were in service (the whole
      load balancer, not per zone, as Envoy does not check it per priority).
    - `base` (default `served`): `registered` takes the percentage of every registered target, new ones
      still `initial` included (Envoy's host count, the reference behaviour).
    - `semantics`: `inclusive` (default; Envoy since PR #27909, grpc-java #9489) ejects only if
      100*(ejected+1)/N <= max, so with 10% and fewer than 10 targets nothing is ejected; `before` (gRFC A50,
      grpc-go, Envoy before 2023) ejects if 100*ejected/N < max, so one ejection may overshoot.
    - `always_eject_one_host` (default false; Envoy PR #34796): one ejection is always allowed when none is
      active.
    An ejection is a registered target leaving service after having been in it. Candidates are admitted
    earliest-unhealthy first, then by id; admitted ones stay out while unhealthy; the others are kept in
    service and counted as withheld with reason `cap` (Envoy's `ejections_overflow`). Source: Envoy
    `DetectorImpl::ejectHost` and outlier-detection docs (docs/sources.md).
    Data-path confirmation (lbsim's addition; `confirm_failures=0` gives the reference behaviour exactly): a
    target that probes call unhealthy and whose last `confirm_failures` (default 3) real connections failed,
    the latest within `confirm_window_s` (default 30), is really down (`lb.policy.confirmed_down`).
    A confirmed-down target leaves service without counting against the cap, so a dead zone cannot use up
    the cap that protects the rest of the fleet.
    """

    name = "max-ejection"
    origin = "Envoy / gRPC (max ejection percent; data-path confirmation lbsim)"
    max_percent: Percent = 10.0
    semantics: Literal["before", "inclusive"] = "inclusive"
    always_eject_one_host: bool = False
    base: Base = "served"
    confirm_failures: ConfirmFailures = CONFIRM_FAILURES
    confirm_window_s: ConfirmWindow = CONFIRM_WINDOW_S
    _ejected: set[str] = field(default_factory=set, init=False, repr=False)
    _prev_in: set[str] = field(default_factory=set, init=False, repr=False)

    def stage(self) -> int:
        return Stage.CAP

    def allows(self, ejected: int, base_count: int) -> bool:
        """Whether one more ejection is allowed with `ejected` active out of `base_count` targets (see `base`)."""
        if self.always_eject_one_host and ejected == 0:
            return True
        if base_count <= 0:
            return False
        # Multiplied out rather than divided, so 2 of 20 at 10% is exactly at the cap.
        if self.semantics == "before":
            return 100.0 * ejected < self.max_percent * base_count - EPS
        return 100.0 * (ejected + 1) <= self.max_percent * base_count + EPS

    def on_targets(self, snap: Snapshot, d: Decision) -> None:
        live = snap.registered()
        out = [t for t in live if t.id not in d.in_service]
        self._ejected &= {t.id for t in out}  # back in service or gone: no longer an active ejection
        base_count = len(base_of(live, self.base))
        for t in sorted(
            (t for t in out if t.id in self._prev_in and t.id not in self._ejected), key=candidate_order
        ):
            if confirmed_down(t, snap.now, self.confirm_failures, self.confirm_window_s):
                continue  # out of service, but not one of the cap's ejections
            if self.allows(len(self._ejected), base_count):
                self._ejected.add(t.id)
            else:
                restore(d, t.id)
                d.withhold(self.name, t.id, WithholdReason.CAP)
        self._prev_in = {t.id for t in live if t.id in d.in_service}
