"""`panic`: Envoy's healthy panic threshold; with too few targets in service, route to all of them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
    escalate,
    groups,
    in_service_percent,
)
from lb.policy import Decision, Snapshot, TargetView, ZoneMode, confirmed_down


@register
@dataclass(eq=False)
class Panic(BuiltinPolicy):
    """Envoy healthy panic threshold: with too few hosts healthy, ignore health and route to all of them.

    Parameters:
    - `threshold_percent` (default 50): a zone (or, with cross-zone, the whole load balancer) whose
      in-service share of non-excluded registered targets is below this panics; 0 disables panic.
    - `fail_traffic` (default false): in panic route to none instead (Envoy `fail_traffic_on_panic`).
    - `base` (default `served`): the share is of targets that are or were in service since they registered,
      so a fleet's new, still-`initial` targets do not push it into panic; `registered` counts them too, as
      Envoy counts hosts not yet checked (the reference behaviour).
    Excluded targets (e.g. flap-suppressed ones) leave the denominator but still get traffic in panic, as
    in Envoy. Source: Envoy `CommonLbConfig.healthy_panic_threshold`, `isHostSetInPanic`
    (docs/sources.md). Envoy also truncates the threshold to whole percent; this keeps it exact.
    Data-path confirmation (lbsim's addition; `confirm_failures=0` gives the reference behaviour exactly): a
    target that probes call unhealthy and whose last `confirm_failures` (default 3) real connections failed,
    the latest within `confirm_window_s` (default 30), is really down (`lb.policy.confirmed_down`).
    In panic, confirmed-down targets get no traffic: panic is there for health checks that are wrong, and the
    data path has shown that on these targets they are right.
    """

    name = "panic"
    origin = "Envoy (healthy panic threshold; data-path confirmation lbsim)"
    threshold_percent: Percent = 50.0
    fail_traffic: bool = False
    base: Base = "served"
    confirm_failures: ConfirmFailures = CONFIRM_FAILURES
    confirm_window_s: ConfirmWindow = CONFIRM_WINDOW_S

    def in_panic(self, targets: Sequence[TargetView], d: Decision) -> bool:
        return self.threshold_percent > 0 and in_service_percent(targets, d) < self.threshold_percent - EPS

    def on_zones(self, snap: Snapshot, d: Decision) -> None:
        mode = ZoneMode.FAIL_CLOSED if self.fail_traffic else ZoneMode.PANIC
        for zones, targets in groups(snap):
            if self.in_panic(base_of(targets, self.base), d):
                for z in zones:
                    escalate(d, z, mode)
                d.dead.update(
                    t.id for t in targets if confirmed_down(t, snap.now, self.confirm_failures, self.confirm_window_s)
                )
