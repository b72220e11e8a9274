"""`passive`: passive checks on real traffic; eject on failed connections, keep targets that serve."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from pydantic import Field

from lb.policies.base import BuiltinPolicy, Positive
from lb.policies.registry import register
from lb.policy import Decision, Snapshot, Stage, TargetView, WithholdReason
from lb.targets import TargetState


@register
@dataclass(eq=False)
class PassiveChecks(BuiltinPolicy):
    """Passive checks on real traffic: eject on consecutive failures, keep probe-failing targets that serve.

    Ejection (HAProxy `observe layer4` + `on-error`, Envoy `consecutive_5xx` / outlier detection):
    - `consecutive_failures` (default 5) failed connections in a row eject a target, healthy or not by
      probes, for `base_ejection_s` (30) x its number of ejections, capped at `max_ejection_s` (300).
    - The multiplier drops by one every `decay_interval_s` (10, Envoy's sweep `interval`) the target spends
      out of ejection, as in Envoy and gRFC A50. Only failures after an ejection ends count towards the next.
    Keep serving (`keep_serving`, default true; beyond every reference): a target that is unhealthy by
    probes but has served at least `min_successes` (3) real connections within the last `success_window_s`
    (30) and has no consecutive failure stays in service, counted as withheld with reason `keep-serving`.
    That was the outage's case: probes failing on targets that served fine. Reads `TargetView.passive` (see
    `lb.passive`), which keeps the last 32 success times, so `min_successes` above 32 can never be met.
    Sources: Envoy outlier detection, HAProxy `observe` / `error-limit` (docs/sources.md).
    """

    name = "passive"
    origin = "HAProxy / Envoy (observe layer4, outlier detection)"
    consecutive_failures: Annotated[int, Field(ge=1)] = 5
    base_ejection_s: Positive = 30.0
    max_ejection_s: Positive = 300.0
    decay_interval_s: Positive = 10.0
    keep_serving: bool = True
    min_successes: Annotated[int, Field(ge=1)] = 3
    success_window_s: Positive = 30.0
    _until: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    _multiplier: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _decay_mark: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    _baseline: dict[str, int] = field(default_factory=dict, init=False, repr=False)

    def stage(self) -> int:
        return Stage.AMEND

    def ejection_time(self, multiplier: int) -> float:
        # Envoy: max_ejection_time defaults to, and is never below, base_ejection_time.
        return min(self.base_ejection_s * multiplier, max(self.base_ejection_s, self.max_ejection_s))

    def is_ejected(self, target: str) -> bool:
        return target in self._until

    def multiplier(self, target: str) -> int:
        return self._multiplier.get(target, 0)

    def _forget(self, target: str) -> None:
        for state in (self._until, self._multiplier, self._decay_mark, self._baseline):
            state.pop(target, None)

    def _tick(self, t: TargetView, now: float) -> None:
        """End an expired ejection and decay the multiplier of a target out of ejection."""
        until = self._until.get(t.id)
        if until is not None:
            if now < until:
                return
            del self._until[t.id]
            self._decay_mark[t.id] = until
            self._baseline[t.id] = t.passive.failures  # failures seen while ejected do not count again
        mult = self._multiplier.get(t.id, 0)
        if mult > 0:
            mark = self._decay_mark.get(t.id, now)
            steps = int((now - mark) // self.decay_interval_s)
            if steps > 0:
                self._multiplier[t.id] = max(0, mult - steps)
                self._decay_mark[t.id] = mark + steps * self.decay_interval_s

    def serving(self, t: TargetView, now: float) -> bool:
        """Whether real traffic shows the target serving: enough recent successes, no failure since."""
        s = t.passive
        recent = sum(1 for at in s.recent_success_times if at >= now - self.success_window_s)
        return s.consecutive_failures == 0 and recent >= self.min_successes

    def on_targets(self, snap: Snapshot, d: Decision) -> None:
        now = snap.now
        present = {t.id for t in snap.targets}
        for gone in [tid for tid in self._multiplier.keys() | self._until.keys() if tid not in present]:
            self._forget(gone)
        for t in snap.targets:
            if t.state in (TargetState.DRAINING, TargetState.UNUSED):
                self._forget(t.id)
                continue
            self._tick(t, now)
            s = t.passive
            fresh = min(s.consecutive_failures, s.failures - self._baseline.get(t.id, 0))
            if t.id not in self._until and fresh >= self.consecutive_failures:
                mult = self._multiplier.get(t.id, 0) + 1
                self._multiplier[t.id] = mult
                self._until[t.id] = now + self.ejection_time(mult)
                self._baseline[t.id] = s.failures
            if t.id in self._until:
                d.in_service.discard(t.id)
                d.suppressed.add(t.id)
            elif (
                self.keep_serving
                and t.state == TargetState.UNHEALTHY
                and t.id not in d.in_service
                and t.id not in d.suppressed  # held out by another policy (flap damping): not ours to undo
                and self.serving(t, now)
            ):
                d.in_service.add(t.id)
                d.withhold(self.name, t.id, WithholdReason.KEEP_SERVING)
