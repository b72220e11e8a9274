"""The policy interface: how a list of protections turns target health into a routing plan per zone.

A policy is a pure object (it may keep state between steps, but never reads a clock or touches I/O). The
engine runs every policy's hooks in three phases (by `Stage`, then list order, within each phase):

1. `on_targets`: decide the per-target service set (`Decision.in_service`), starting from "healthy targets".
   Ejection limiters (max-ejection, velocity), flap damping and passive checks act here.
2. `on_zones`: decide each zone node's mode: route to its in-service targets (NORMAL), to all its targets
   (FAIL_OPEN / PANIC) or to none (FAIL_CLOSED).
3. `on_dns`: decide which zone nodes the load balancer's DNS name publishes.

The phases make composition order-independent across kinds of protection: `velocity+fail-open` and
`fail-open+velocity` mean the same thing. Within a phase the engine runs policies by their `stage()` (see
`Stage`), list order breaking ties, so that a limiter always sees what the policies that eject have done.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum

from lb.targets import TargetState


class ZoneMode(StrEnum):
    NORMAL = "normal"  # route to the zone's in-service targets only
    FAIL_OPEN = "fail_open"  # route to every target, healthy or not (AWS fail-open, routing failover)
    PANIC = "panic"  # Envoy panic: route to every target because too few are healthy
    FAIL_CLOSED = "fail_closed"  # route to none (Envoy fail_traffic_on_panic)


class WithholdReason(StrEnum):
    """Why a policy kept a target in service, or a zone in DNS, that the health signal would have removed.

    A fixed set, so the `reason` label of `lbsim_ejections_withheld_total` stays low-cardinality.
    """

    BUDGET = "budget"  # velocity: the window's removal budget is spent
    FLOOR = "floor"  # velocity: the removal would take in-service capacity below the floor
    CAP = "cap"  # max-ejection: as many targets as the cap allows are ejected already
    KEEP_SERVING = "keep-serving"  # passive: probes fail, but the target keeps serving real connections
    OTHER = "other"  # a user policy that gave no reason


@dataclass(frozen=True, slots=True)
class PassiveStats:
    """What the data path saw of one target (filled by the proxy; all zero when there was no traffic)."""

    consecutive_failures: int = 0
    successes: int = 0
    failures: int = 0
    last_success_at: float | None = None
    last_failure_at: float | None = None
    # Times of the most recent successes (oldest first, a bounded number of them): lets a policy count the
    # successes inside its own window without the proxy knowing which window that is.
    recent_success_times: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class TargetView:
    id: str
    zone: str
    state: TargetState
    since: float  # sim time the merged state last changed
    passive: PassiveStats = PassiveStats()
    # Healthy at some point since it registered (the health board tracks it). None when the caller does not
    # track it: then every target past `initial` counts as having served.
    ever_healthy: bool | None = None

    @property
    def served(self) -> bool:
        """Whether the target is or was in service since it registered (an `initial` one never was)."""
        if self.ever_healthy is None:
            return self.state != TargetState.INITIAL
        return self.ever_healthy or self.state == TargetState.HEALTHY


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything a policy may look at, at one instant. `targets` is sorted by id for determinism."""

    now: float
    zones: tuple[str, ...]
    targets: tuple[TargetView, ...]
    cross_zone: bool = False

    def in_zone(self, zone: str) -> list[TargetView]:
        return [t for t in self.targets if t.zone == zone]

    def registered(self) -> list[TargetView]:
        """Targets that count as capacity: everything not draining or unused."""
        return [t for t in self.targets if t.state not in (TargetState.DRAINING, TargetState.UNUSED)]

    def served(self) -> list[TargetView]:
        """Registered targets that are or were in service since they registered (`TargetView.served`): the
        capacity a limiter protects. New targets still in `initial`, or that failed their first checks, are not."""
        return [t for t in self.registered() if t.served]


@dataclass(slots=True)
class Decision:
    """The plan under construction. Policies mutate it in their hooks."""

    in_service: set[str]
    zone_mode: dict[str, ZoneMode]
    dns: dict[str, bool]
    excluded: set[str] = field(default_factory=set)  # left out of percentage denominators
    withheld: Counter[str] = field(default_factory=Counter)  # policy name -> ejections it withheld this step
    # (policy, reason) -> ejections it withheld this step for that reason
    withheld_reasons: Counter[tuple[str, WithholdReason]] = field(default_factory=Counter)
    suppressed: set[str] = field(default_factory=set)  # targets a policy holds out of service

    # (policy, target id or "zone:Z", reason)
    withheld_subjects: set[tuple[str, str, WithholdReason]] = field(default_factory=set)
    # Targets no zone mode routes to, not even panic or fail-open: a policy put them here because health
    # checks and the data path agree they are down (see `confirmed_down`).
    dead: set[str] = field(default_factory=set)

    def withhold(
        self,
        policy: str,
        subject: str | None = None,
        reason: WithholdReason = WithholdReason.OTHER,
        n: int = 1,
    ) -> None:
        """Record that `policy` kept `subject` (a target, or "zone:NAME") from being removed at this step, and
        why (`reason`, which the metric and the run summary report)."""
        if n > 0:
            self.withheld[policy] += n
            self.withheld_reasons[(policy, reason)] += n
            if subject is not None:
                self.withheld_subjects.add((policy, subject, reason))


def confirmed_down(t: TargetView, now: float, failures: int, window_s: float) -> bool:
    """Whether the data path confirms what the health checks say: `t` is unhealthy by probes, its last
    `failures` real connections all failed (none served since) and the latest failed within `window_s`.

    Limiters use it to tell a real failure from a false one. The 2025-10-20 failure mode was the health-check
    signal itself going wrong (late probes, flapping) while targets served, so the evidence that overrides a
    limit must be independent of that signal. Stale evidence expires, so a target that stopped getting
    traffic long ago is judged by its probes alone again. `failures` = 0 never confirms anything.
    """
    s = t.passive
    return (
        failures > 0
        and t.state == TargetState.UNHEALTHY
        and s.consecutive_failures >= failures
        and s.last_failure_at is not None
        and now - s.last_failure_at <= window_s
    )


class Stage(IntEnum):
    """Where a policy runs inside each phase: lower stages first, list order breaking ties.

    Without stages `max-ejection+flap-damping` would let flap damping eject past the cap that
    `flap-damping+max-ejection` enforces. Policies that take targets or zones away decide first; policies that
    only put some back (caps, operator switches) come after them, and velocity comes last because it must
    see every removal of the step to charge it to its budget.
    """

    DECIDE = 0  # act on the health signal: flap damping, zone modes, DNS removal
    AMEND = 10  # data-path evidence: eject on real failures, keep probe-failing targets that serve
    CAP = 20  # put back ejections beyond a cap (max-ejection)
    OVERRIDE = 30  # operator switches that force an outcome (dns-failover disabled)
    ACCOUNT = 40  # charge every removal of the step to a budget (velocity)


class Policy:
    """Base class of every protection. Subclasses set `name` and override the hooks they need."""

    name: str = "policy"
    origin: str = "user"  # where the idea comes from (AWS, Envoy, HAProxy, gRPC, lbsim), for `lbsim policies`

    def stage(self) -> int:
        """Where this policy runs within each phase (see `Stage`); may depend on its current parameters."""
        return Stage.DECIDE

    def reset(self) -> None:
        """Forget everything learnt from earlier steps (stateless policies have nothing to forget)."""
        return None

    def set_param(self, name: str, value: object) -> None:
        """Change a parameter at run time (scenario timelines, operator switches). Policies with parameters
        override this (see `lb.policies.BuiltinPolicy`); the base has none."""
        raise ValueError(f"policy {self.name!r} has no parameter {name!r} to set")

    def on_targets(self, snap: Snapshot, d: Decision) -> None:
        return None

    def on_zones(self, snap: Snapshot, d: Decision) -> None:
        return None

    def on_dns(self, snap: Snapshot, d: Decision) -> None:
        return None

    def describe(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class RoutingPlan:
    """The engine's answer for one instant."""

    at: float
    routable: Mapping[str, tuple[str, ...]]  # zone node -> target ids it may route to, sorted
    zone_mode: Mapping[str, ZoneMode]
    dns: Mapping[str, bool]  # zone node -> published in DNS
    in_service: frozenset[str]
    excluded: frozenset[str]
    withheld: Mapping[str, int]
    withheld_reasons: Mapping[tuple[str, WithholdReason], int]  # (policy, reason) -> withheld at this step
    withheld_subjects: frozenset[tuple[str, str, WithholdReason]]  # (policy, subject, reason) held at this step
    ejected: tuple[str, ...]  # targets that left the service set at this step
    restored: tuple[str, ...]  # targets that joined it at this step


class PolicyEngine:
    """Runs a list of policies over successive snapshots and remembers the previous service set."""

    def __init__(self, policies: Iterable[Policy]) -> None:
        self.policies: list[Policy] = list(policies)
        self._previous: frozenset[str] = frozenset()

    def reset(self) -> None:
        """Start over: forget the previous service set and every policy's state."""
        self._previous = frozenset()
        for p in self.policies:
            p.reset()

    def step(self, snap: Snapshot) -> RoutingPlan:
        d = Decision(
            in_service={t.id for t in snap.targets if t.state == TargetState.HEALTHY},
            zone_mode={z: ZoneMode.NORMAL for z in snap.zones},
            dns={z: True for z in snap.zones},
        )
        # Sorted at every step (a stable sort: list order breaks ties) because a stage may follow a parameter
        # flipped at run time, e.g. dns-failover switched off by an operator.
        ordered = sorted(self.policies, key=lambda p: p.stage())
        for p in ordered:
            p.on_targets(snap, d)
        for p in ordered:
            p.on_zones(snap, d)
        for p in ordered:
            p.on_dns(snap, d)
        routable = route_sets(snap, d)
        in_service = frozenset(d.in_service)
        ejected = tuple(sorted(self._previous - in_service))
        restored = tuple(sorted(in_service - self._previous))
        self._previous = in_service
        return RoutingPlan(
            at=snap.now,
            routable=routable,
            zone_mode=dict(d.zone_mode),
            dns=dict(d.dns),
            in_service=in_service,
            excluded=frozenset(d.excluded),
            withheld=dict(d.withheld),
            withheld_reasons=dict(d.withheld_reasons),
            withheld_subjects=frozenset(d.withheld_subjects),
            ejected=ejected,
            restored=restored,
        )


def route_sets(snap: Snapshot, d: Decision) -> dict[str, tuple[str, ...]]:
    """Per zone node, the targets it may route to under its mode. Cross-zone nodes see all zones' targets."""
    live = [t for t in snap.targets if t.state not in (TargetState.DRAINING, TargetState.UNUSED)]
    out: dict[str, tuple[str, ...]] = {}
    for zone in snap.zones:
        candidates: Sequence[TargetView] = live if snap.cross_zone else [t for t in live if t.zone == zone]
        mode = d.zone_mode[zone]
        if mode == ZoneMode.FAIL_CLOSED:
            chosen: list[str] = []
        elif mode in (ZoneMode.FAIL_OPEN, ZoneMode.PANIC):
            chosen = [t.id for t in candidates if t.id not in d.dead]
        else:
            chosen = [t.id for t in candidates if t.id in d.in_service]
        out[zone] = tuple(sorted(chosen))
    return out
