"""The pure per-target health state machine and the quorum rule that merges the views of several nodes.

Rules (AWS NLB semantics, docs/sources.md#nlb-health):
1. A new target is `initial` and not routable until it passes `healthy_threshold` consecutive checks.
2. `unhealthy_threshold` consecutive failures make an `initial` or `healthy` target `unhealthy`.
3. `healthy_threshold` consecutive successes make an `unhealthy` target `healthy`.
4. A success resets the failure streak and vice versa; probes of a `draining` or `unused` target are ignored.
5. Deregistration moves a target to `draining`; after the deregistration delay it becomes `unused`.
No I/O and no clock reads: the caller passes `now`, so a unit test or a virtual-time engine can drive it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from lb.targets import TargetState

# AWS NLB target-group limits (CreateTargetGroup API, docs/sources.md#nlb-health).
AWS_INTERVAL_RANGE_S = (5.0, 300.0)
AWS_TIMEOUT_RANGE_S = (2.0, 120.0)
AWS_THRESHOLD_RANGE = (2, 10)
THRESHOLD_RANGE = (1, 10)  # lbsim's: AWS's, and 1 for speed (aws_range_notes says when a setting uses it)
AWS_DEFAULT_INTERVAL_S = 30.0
AWS_DEFAULT_TIMEOUT_HTTP_S = 6.0
AWS_DEFAULT_TIMEOUT_TCP_S = 10.0
AWS_DEFAULT_HEALTHY_THRESHOLD = 5
AWS_DEFAULT_UNHEALTHY_THRESHOLD = 2
AWS_DEFAULT_SUCCESS_CODES = "200-399"
AWS_SUCCESS_CODE_RANGE = (200, 599)


def parse_success_codes(spec: str) -> frozenset[int]:
    """Parse an AWS matcher such as "200", "200,302" or "200-399" into the set of codes it accepts."""
    codes: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            raise ValueError(f"empty element in success codes {spec!r}")
        lo_s, sep, hi_s = part.partition("-")
        try:
            lo = int(lo_s)
            hi = int(hi_s) if sep else lo
        except ValueError:
            raise ValueError(f"success codes must be integers or ranges like 200-399, got {part!r}") from None
        if not (100 <= lo <= hi <= 599):
            raise ValueError(f"success code range {part!r} must lie within 100-599 with low <= high")
        codes.update(range(lo, hi + 1))
    return frozenset(codes)


def format_success_codes(codes: frozenset[int]) -> str:
    """The AWS matcher for a set of codes, runs of consecutive codes as ranges: {200, 201, 202, 302} -> 200-202,302."""
    runs: list[list[int]] = []
    for code in sorted(codes):
        if runs and code == runs[-1][1] + 1:
            runs[-1][1] = code
        else:
            runs.append([code, code])
    return ",".join(f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in runs)


def aws_range_notes(
    interval_s: float,
    timeout_s: float,
    healthy_threshold: int,
    unhealthy_threshold: int,
    success_codes: frozenset[int],
) -> list[str]:
    """Say which settings fall outside what AWS NLB accepts. Scenarios may go outside for speed; users
    should know when they do."""
    notes: list[str] = []
    lo, hi = AWS_INTERVAL_RANGE_S
    if not lo <= interval_s <= hi:
        notes.append(f"interval_s={interval_s:g} is outside AWS's {lo:g}-{hi:g} s")
    lo, hi = AWS_TIMEOUT_RANGE_S
    if not lo <= timeout_s <= hi:
        notes.append(f"timeout_s={timeout_s:g} is outside AWS's {lo:g}-{hi:g} s")
    tlo, thi = AWS_THRESHOLD_RANGE
    for name, value in (("healthy_threshold", healthy_threshold), ("unhealthy_threshold", unhealthy_threshold)):
        if not tlo <= value <= thi:
            notes.append(f"{name}={value} is outside AWS's {tlo}-{thi}")
    clo, chi = AWS_SUCCESS_CODE_RANGE
    if min(success_codes) < clo or max(success_codes) > chi:
        notes.append(f"success_codes={format_success_codes(success_codes)} reach outside AWS's {clo}-{chi}")
    return notes


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of a target's state, with the sim time it happened at."""

    target: str
    old: TargetState
    new: TargetState
    at: float


@dataclass(slots=True)
class TargetHealth:
    """One target's health as seen by one checker node."""

    target: str
    healthy_threshold: int = AWS_DEFAULT_HEALTHY_THRESHOLD
    unhealthy_threshold: int = AWS_DEFAULT_UNHEALTHY_THRESHOLD
    state: TargetState = TargetState.INITIAL
    successes: int = 0  # current streak of consecutive successes
    failures: int = 0  # current streak of consecutive failures
    since: float = 0.0  # sim time of the last state change
    draining_until: float | None = None
    transitions: int = field(default=0)

    def __post_init__(self) -> None:
        if self.healthy_threshold < 1 or self.unhealthy_threshold < 1:
            raise ValueError("thresholds must be >= 1")

    def observe(self, ok: bool, now: float) -> Transition | None:
        """Feed one probe verdict; return the transition it caused, if any."""
        if self.state in (TargetState.DRAINING, TargetState.UNUSED):
            return None
        if ok:
            self.successes += 1
            self.failures = 0
            if self.state != TargetState.HEALTHY and self.successes >= self.healthy_threshold:
                return self._move(TargetState.HEALTHY, now)
        else:
            self.failures += 1
            self.successes = 0
            if self.state != TargetState.UNHEALTHY and self.failures >= self.unhealthy_threshold:
                return self._move(TargetState.UNHEALTHY, now)
        return None

    def deregister(self, now: float, delay_s: float) -> Transition | None:
        if self.state in (TargetState.DRAINING, TargetState.UNUSED):
            return None
        self.draining_until = now + delay_s
        return self._move(TargetState.DRAINING, now)

    def tick(self, now: float) -> Transition | None:
        """Advance time-driven changes (draining -> unused)."""
        if self.state == TargetState.DRAINING and self.draining_until is not None and now >= self.draining_until:
            return self._move(TargetState.UNUSED, now)
        return None

    def _move(self, new: TargetState, now: float) -> Transition:
        old = self.state
        self.state = new
        self.since = now
        self.successes = 0
        self.failures = 0
        self.transitions += 1
        return Transition(self.target, old, new, now)


def default_quorum(nodes: int) -> int:
    """A strict majority of nodes decides, as a consensus among NLB nodes would."""
    return nodes // 2 + 1


def check_quorum(quorum: int, nodes: int) -> int:
    """`quorum` if `nodes` nodes (one per zone) can reach it, else ValueError."""
    if not 1 <= quorum <= nodes:
        raise ValueError(f"quorum must be between 1 and the {nodes} nodes (one per zone), got {quorum}")
    return quorum


def merge_views(views: Sequence[TargetState], quorum: int, previous: TargetState) -> TargetState:
    """Merge the per-node states of one target into the load balancer's verdict.

    `quorum` nodes must agree for the verdict to change to healthy or to unhealthy; until then the target keeps
    its previous merged state (so a single confused node can neither admit nor eject it). Draining and unused
    are administrative and are the same on every node.
    """
    if not views:
        return previous
    if previous in (TargetState.DRAINING, TargetState.UNUSED):
        return previous
    healthy = sum(1 for v in views if v == TargetState.HEALTHY)
    unhealthy = sum(1 for v in views if v == TargetState.UNHEALTHY)
    if healthy >= quorum:
        return TargetState.HEALTHY
    if unhealthy >= quorum:
        return TargetState.UNHEALTHY
    return previous


class HealthBoard:
    """Every node's view of every target, merged by quorum into the load balancer's verdict per target."""

    def __init__(
        self, nodes: Sequence[str], healthy_threshold: int, unhealthy_threshold: int, quorum: int | None = None
    ) -> None:
        if not nodes:
            raise ValueError("a health board needs at least one node")
        self.nodes = tuple(nodes)
        self.quorum = default_quorum(len(nodes)) if quorum is None else check_quorum(quorum, len(nodes))
        self.healthy_threshold = healthy_threshold
        self.unhealthy_threshold = unhealthy_threshold
        self._views: dict[str, dict[str, TargetHealth]] = {}
        self._merged: dict[str, TargetState] = {}
        self._since: dict[str, float] = {}
        # Targets that have been healthy since they (last) registered: the ones that ever served. Limiters take
        # their shares of these, so a fleet's new, still-initial targets do not count as capacity to protect.
        self._served: set[str] = set()
        self.transitions_total = 0

    def register(self, target: str, now: float, state: TargetState = TargetState.INITIAL) -> None:
        """Add a target. `state=HEALTHY` seeds a target that was in service before the run began, so a scenario
        starts from steady state instead of from a cold start."""
        if state not in (TargetState.INITIAL, TargetState.HEALTHY):
            raise ValueError(f"a target registers as initial or healthy, not {state.value}")
        if target in self._views and self._merged[target] not in (TargetState.DRAINING, TargetState.UNUSED):
            return
        self._views[target] = {
            n: TargetHealth(target, self.healthy_threshold, self.unhealthy_threshold, state=state, since=now)
            for n in self.nodes
        }
        self._merged[target] = state
        self._since[target] = now
        if state == TargetState.HEALTHY:
            self._served.add(target)
        else:
            self._served.discard(target)  # a new life: what it did before it was deregistered does not count

    def deregister(self, target: str, now: float, delay_s: float) -> Transition | None:
        if target not in self._views:
            return None
        for view in self._views[target].values():
            view.deregister(now, delay_s)
        return self._set(target, TargetState.DRAINING, now)

    def forget(self, target: str) -> None:
        self._views.pop(target, None)
        self._merged.pop(target, None)
        self._since.pop(target, None)
        self._served.discard(target)

    def record(self, node: str, target: str, ok: bool, now: float) -> Transition | None:
        """Feed one probe verdict from one node; return the merged transition it caused, if any."""
        views = self._views.get(target)
        if views is None:
            return None  # a late result for a target that is gone
        views[node].observe(ok, now)
        merged = merge_views([v.state for v in views.values()], self.quorum, self._merged[target])
        return self._set(target, merged, now)

    def tick(self, now: float) -> list[Transition]:
        out: list[Transition] = []
        for target, views in self._views.items():
            for v in views.values():
                v.tick(now)
            if self._merged[target] == TargetState.DRAINING and all(
                v.state == TargetState.UNUSED for v in views.values()
            ):
                t = self._set(target, TargetState.UNUSED, now)
                if t:
                    out.append(t)
        return out

    def state(self, target: str) -> TargetState:
        return self._merged[target]

    def since(self, target: str) -> float:
        return self._since[target]

    def served(self, target: str) -> bool:
        """Whether the target has been healthy (merged verdict) at some point since it registered."""
        return target in self._served

    def node_state(self, node: str, target: str) -> TargetState:
        return self._views[target][node].state

    def states(self) -> dict[str, TargetState]:
        return dict(self._merged)

    def _set(self, target: str, new: TargetState, now: float) -> Transition | None:
        old = self._merged[target]
        if new == old:
            return None
        self._merged[target] = new
        self._since[target] = now
        if new == TargetState.HEALTHY:
            self._served.add(target)
        self.transitions_total += 1
        return Transition(target, old, new, now)
