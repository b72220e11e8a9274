"""The built-in health-check protections, their registry, and the parser for specs like `fail-open+velocity`.

Every policy is a small dataclass: its init fields are its parameters (documented, with defaults, validated
and coerced from strings so the CLI and YAML share one path); its state lives in `init=False` fields that
`reset()` clears. Each policy works in the phases of `lb.policy` and declares its `Stage`, so composition
order does not matter: `velocity+dns-failover` and `dns-failover+velocity` build the same plans.

Shared conventions:
- "registered" = targets that are not draining or unused (`Snapshot.registered`); "served" = registered targets
  that are or were in service since they registered (`Snapshot.served`). The limiters (panic, max-ejection,
  velocity) take their shares of served targets by default (`base=served`), so new targets still in `initial`
  neither inflate a budget nor raise a floor; `base=registered` takes them of every registered target.
  min-healthy keeps AWS's rule: its percentage is of registered targets.
- Thresholds apply per zone with cross-zone off and to the total with cross-zone on (AWS target-group
  health, research/aws-facts.md 4.3; Envoy computes panic per host set the same way).
- Zone modes only ever escalate (`escalate`), so two policies that both set a mode agree in any order.
- Candidates for ejection are taken in one deterministic order: earliest `since` first, then id.
"""

from __future__ import annotations

import importlib
import math
import types
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from lb.policy import (
    Decision,
    Policy,
    Snapshot,
    Stage,
    TargetView,
    WithholdReason,
    ZoneMode,
    confirmed_down,
)
from lb.targets import TargetState

__all__ = [
    "POLICY_TYPES",
    "PRESETS",
    "BuiltinPolicy",
    "DnsFailover",
    "FailOpen",
    "FlapDamping",
    "MaxEjection",
    "MinHealthy",
    "Naive",
    "Panic",
    "PassiveChecks",
    "PolicyError",
    "Velocity",
    "describe_policies",
    "escalate",
    "load_policy_class",
    "make_policy",
    "parse_policy_spec",
    "register_policy",
    "set_policy_param",
    "split_top",
]

# Float budgets such as 10% of 30 targets come out as 3.0000000000000004; compare with a little slack.
_EPS = 1e-9


class PolicyError(ValueError):
    """A policy name, parameter or value that is not allowed; the message says what is."""


# ---------------------------------------------------------------------------------------------------------
# Helpers shared by the policies


# How open a zone mode is. Policies only ever raise a zone's mode along this order, so the result does not
# depend on which policy ran first. Routing to every target beats refusing: a refused connection fails for
# sure, while an unhealthy-looking target may still serve (AWS's stated reason for fail-open, aws-facts 4.3).
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


def _groups(snap: Snapshot) -> list[tuple[tuple[str, ...], list[TargetView]]]:
    """The units a threshold applies to: each zone with its own registered targets, or, with cross-zone on,
    every zone together over all of them (each node then routes to every zone's targets)."""
    live = snap.registered()
    if snap.cross_zone:
        return [(snap.zones, live)]
    return [((z,), [t for t in live if t.zone == z]) for z in snap.zones]


Base = Literal["served", "registered"]


def _base_of(targets: Iterable[TargetView], base: Base) -> list[TargetView]:
    """The targets a limiter's shares are of (see `Base`): those that served, or every registered one."""
    return [t for t in targets if base == "registered" or t.served]


def _in_service_percent(targets: Sequence[TargetView], d: Decision) -> float:
    """Share of `targets` in service, leaving excluded ones out of the denominator (Envoy's excluded hosts).
    No counted target at all is 0%: an empty group is as unhealthy as it gets (AWS fails open on it)."""
    counted = [t for t in targets if t.id not in d.excluded]
    if not counted:
        return 0.0
    return 100.0 * sum(1 for t in counted if t.id in d.in_service) / len(counted)


def _candidate_order(t: TargetView) -> tuple[float, str]:
    return (t.since, t.id)


def _restore(d: Decision, target: str) -> None:
    """Put a target back in service; it then counts again in every share, whoever had held it out."""
    d.in_service.add(target)
    d.suppressed.discard(target)
    d.excluded.discard(target)


def _fail_over_dns(d: Decision, failing: set[str]) -> None:
    """Take `failing` zones out of DNS the AWS way: if they are all the zones, none is taken out; if the
    result would publish no zone at all, every zone is published (aws-facts 4.3: "if all zones are
    unhealthy, traffic goes to all zones"). With two such policies the outcome is the same in either order."""
    if not failing or failing >= set(d.dns):
        return
    for z in failing:
        d.dns[z] = False
    if not any(d.dns.values()):
        for z in d.dns:
            d.dns[z] = True


# ---------------------------------------------------------------------------------------------------------
# Parameters: coercion from strings / YAML values, validation, description


_NONE_WORDS = frozenset({"none", "off", "null"})
_TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
_FALSE_WORDS = frozenset({"false", "no", "off", "0"})


def _fmt(value: Any) -> str:
    """A parameter value as the spec parser reads it back."""
    if value is None:
        return "off"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, frozenset | set | tuple | list):
        return "[" + ",".join(sorted(str(v) for v in value)) + "]"
    return str(value)


def _split_items(text: str) -> list[str]:
    """`"[a,b]"`, `"a|b"` or `"a,b"` -> ["a", "b"]."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    parts = [p.strip().strip("'\"") for p in text.replace("|", ",").split(",")]
    return [p for p in parts if p]


def _coerce(where: str, hint: Any, value: Any) -> Any:
    """Convert `value` (typed, or a string from a spec) to the parameter type `hint`, or raise PolicyError."""
    origin = get_origin(hint)
    args = get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(where, inner[0], value)
    if origin is Literal:
        if isinstance(value, str) and value.strip() in args:
            return value.strip()
        allowed = ", ".join(repr(a) for a in args)
        raise PolicyError(f"{where} must be one of {allowed}, got {value!r}")
    if origin is frozenset:
        if isinstance(value, str):
            items: list[Any] = _split_items(value)
        elif isinstance(value, list | tuple | set | frozenset):
            items = list(value)
        else:
            raise PolicyError(f"{where} must be a list of names like [a,b] or a|b, got {value!r}")
        if not all(isinstance(i, str) for i in items):
            raise PolicyError(f"{where} must be a list of names, got {value!r}")
        return frozenset(i.strip() for i in items)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS | _FALSE_WORDS:
            return value.strip().lower() in _TRUE_WORDS
        raise PolicyError(f"{where} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise PolicyError(f"{where} must be a whole number, got {value!r}")
    if hint is float:
        number: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                number = None
        if number is None or math.isnan(number):
            raise PolicyError(f"{where} must be a number, got {value!r}")
        return number
    if hint is str:
        if isinstance(value, str):
            return value
        raise PolicyError(f"{where} must be a string, got {value!r}")
    raise TypeError(f"{where}: unsupported parameter type {hint!r}")  # a bug in a policy class, not in input


_HINTS: dict[type, dict[str, Any]] = {}


@dataclass(eq=False)
class BuiltinPolicy(Policy):
    """Base of the built-in policies (and a convenient one for user policies).

    Parameters are the dataclass's init fields; they are coerced to their annotated types and validated at
    construction and by `set_param`, which scenario timelines use to flip them at run time. State is kept
    in `init=False` fields with defaults, which `reset()` restores.
    """

    def __post_init__(self) -> None:
        for f in self._param_fields():
            setattr(
                self, f.name, _coerce(f"{self.name}.{f.name}", self._hints()[f.name], getattr(self, f.name))
            )
        self._check()

    # -- to override
    def _check(self) -> None:
        """Raise PolicyError if the parameters do not make sense together."""
        return None

    # -- parameters
    @classmethod
    def _hints(cls) -> dict[str, Any]:
        hints = _HINTS.get(cls)
        if hints is None:  # resolving string annotations is slow-ish; a class's never change
            hints = _HINTS[cls] = get_type_hints(cls)
        return hints

    @classmethod
    def _param_fields(cls) -> list[Any]:
        return [f for f in fields(cls) if f.init]

    @classmethod
    def param_names(cls) -> list[str]:
        return [f.name for f in cls._param_fields()]

    def params(self) -> dict[str, Any]:
        """The current parameter values, by name."""
        return {name: getattr(self, name) for name in self.param_names()}

    def set_param(self, name: str, value: Any) -> None:
        """Change one parameter now (coerced and validated; on error nothing changes). State is kept."""
        if name not in self.param_names():
            raise PolicyError(
                f"policy {self.name!r} has no parameter {name!r}; "
                f"allowed: {', '.join(self.param_names()) or 'none'}"
            )
        new = _coerce(f"{self.name}.{name}", self._hints()[name], value)
        old = getattr(self, name)
        setattr(self, name, new)
        try:
            self._check()
        except PolicyError:
            setattr(self, name, old)
            raise

    def reset(self) -> None:
        for f in fields(self):
            if f.init:
                continue
            if f.default_factory is not MISSING:
                setattr(self, f.name, f.default_factory())
            elif f.default is not MISSING:
                setattr(self, f.name, f.default)

    def describe(self) -> str:
        """`name(param=value, ...)`, in a form `parse_policy_spec` reads back."""
        params = self.params()
        if not params:
            return self.name
        return f"{self.name}(" + ", ".join(f"{k}={_fmt(v)}" for k, v in params.items()) + ")"

    # -- validation helpers
    def _require(self, ok: bool, message: str) -> None:
        if not ok:
            raise PolicyError(f"{self.name}: {message}")

    def _percent(self, name: str, value: float | None) -> None:
        self._require(
            value is None or 0.0 <= value <= 100.0, f"{name} must be between 0 and 100, got {value}"
        )


# Data-path confirmation, shared by the limiters (panic, max-ejection, velocity). Three failed connections in
# a row are the least that is not one unlucky flow, and they come within a second or two at the scenarios'
# traffic rates; evidence older than the window no longer counts.
_CONFIRM_FAILURES = 3
_CONFIRM_WINDOW_S = 30.0


def _check_confirm(policy: BuiltinPolicy, failures: int, window_s: float) -> None:
    policy._require(failures >= 0, f"confirm_failures must be >= 0 (0 = off), got {failures}")
    policy._require(window_s > 0, f"confirm_window_s must be > 0, got {window_s}")


# ---------------------------------------------------------------------------------------------------------
# The policies


@dataclass(eq=False)
class Naive(BuiltinPolicy):
    """Route to healthy targets only and refuse when none is healthy (the engine's own behaviour).

    A named no-op, so "no protection" is an arm of a comparison like any other: HAProxy without backups,
    NGINX since 1.11.5 and Kubernetes Services all behave like this (research/policies.md 1).
    """

    name = "naive"
    origin = "lbsim (the baseline: no protection)"


@dataclass(eq=False)
class FailOpen(BuiltinPolicy):
    """AWS NLB default: when no target in any zone is in service, every zone routes to all its targets.

    Source: ELB NLB guide, "Target group health checks": if all targets fail in all enabled zones, or the
    target group is empty, the NLB fails open (research/aws-facts.md 4.2). "In service" is the engine's view
    after the target phase, so a target a limiter kept in service counts as healthy.
    """

    name = "fail-open"
    origin = "AWS (NLB fail-open)"

    def on_zones(self, snap: Snapshot, d: Decision) -> None:
        if not any(t.id in d.in_service for t in snap.registered()):
            for z in snap.zones:
                escalate(d, z, ZoneMode.FAIL_OPEN)


ROUTING_FAILOVER = "routing-failover"
DNS_FAILOVER = "dns-failover"
_MIN_HEALTHY_ACTIONS = frozenset({ROUTING_FAILOVER, DNS_FAILOVER})


@dataclass(eq=False)
class MinHealthy(BuiltinPolicy):
    """AWS target-group health thresholds: below a minimum healthy count or percentage, fail over.

    Parameters:
    - `min_count`: minimum in-service targets (AWS `minimum_healthy_targets.count`, default 1); `off` = None.
    - `min_percent`: minimum in-service percentage of registered targets (AWS `...percentage`, default off),
      new targets still `initial` included: that is AWS's rule, so unlike the limiters this has no `base`.
      Either threshold breached triggers the actions.
    - `actions`: `routing-failover` (the breached zone routes to all its targets, AWS
      `unhealthy_state_routing`) and/or `dns-failover` (the breached zone leaves DNS; if every zone would
      leave, all stay).
    Thresholds apply per zone with cross-zone off and to the total with cross-zone on. Reproduces the
    documented example (2 zones x 10 targets, both thresholds 50%, 6 failing in zone B). Source: ELB NLB
    guide, "Target group health" (research/aws-facts.md 4.3). AWS allows separate DNS and routing thresholds;
    compose two instances for that, e.g. `min-healthy(min_percent=50,actions=[dns-failover])`.
    """

    name = "min-healthy"
    origin = "AWS (target-group health)"
    min_count: int | None = 1
    min_percent: float | None = None
    actions: frozenset[str] = _MIN_HEALTHY_ACTIONS

    def _check(self) -> None:
        self._require(
            self.min_count is not None or self.min_percent is not None,
            "set min_count or min_percent (or both); with neither it would never act",
        )
        self._require(
            self.min_count is None or self.min_count >= 1, f"min_count must be >= 1, got {self.min_count}"
        )
        self._percent("min_percent", self.min_percent)
        unknown = self.actions - _MIN_HEALTHY_ACTIONS
        self._require(
            bool(self.actions) and not unknown,
            f"actions must be a non-empty subset of {sorted(_MIN_HEALTHY_ACTIONS)}, "
            f"got {sorted(self.actions)}",
        )

    def breached_zones(self, snap: Snapshot, d: Decision) -> set[str]:
        """The zones whose group is below either threshold."""
        out: set[str] = set()
        for zones, targets in _groups(snap):
            healthy = sum(1 for t in targets if t.id in d.in_service)
            if (self.min_count is not None and healthy < self.min_count) or (
                self.min_percent is not None and _in_service_percent(targets, d) < self.min_percent - _EPS
            ):
                out.update(zones)
        return out

    def on_zones(self, snap: Snapshot, d: Decision) -> None:
        if ROUTING_FAILOVER in self.actions:
            for z in self.breached_zones(snap, d):
                escalate(d, z, ZoneMode.FAIL_OPEN)

    def on_dns(self, snap: Snapshot, d: Decision) -> None:
        if DNS_FAILOVER in self.actions:
            _fail_over_dns(d, self.breached_zones(snap, d))


@dataclass(eq=False)
class DnsFailover(BuiltinPolicy):
    """Automatic AZ DNS failover: a zone with too few in-service targets leaves the load balancer's DNS.

    Parameters:
    - `enabled` (default true): false publishes every zone whatever any policy decided: the operator switch
      that disabled automatic health-check failover at 09:36 on 2025-10-20 and restored the healthy capacity
      (research/aws-facts.md 2, step 7). Flip it at run time with `set_param("enabled", False)`.
    - `min_healthy` (default 1): a zone with fewer in-service targets leaves DNS (per zone; in total with
      cross-zone on, where a single target group leaves every zone in or every zone failing).
    If every zone fails, every zone stays published. Source: NLB "no healthy target in an enabled AZ ->
    its IP leaves DNS" and the outage summary, where this failover took healthy capacity out of service
    (research/aws-facts.md 2 step 6, 4.2).
    """

    name = "dns-failover"
    origin = "AWS (NLB DNS failover)"
    enabled: bool = True
    min_healthy: int = 1

    def _check(self) -> None:
        self._require(self.min_healthy >= 1, f"min_healthy must be >= 1, got {self.min_healthy}")

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
        for zones, targets in _groups(snap):
            if sum(1 for t in targets if t.id in d.in_service) < self.min_healthy:
                failing.update(zones)
        _fail_over_dns(d, failing)


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
    (research/policies.md 2.1). Envoy also truncates the threshold to whole percent; this keeps it exact.
    Data-path confirmation (lbsim's addition; `confirm_failures=0` gives the reference behaviour exactly): a
    target that probes call unhealthy and whose last `confirm_failures` (default 3) real connections failed,
    the latest within `confirm_window_s` (default 30), is really down (`lb.policy.confirmed_down`).
    In panic, confirmed-down targets get no traffic: panic is there for health checks that are wrong, and the
    data path has shown that on these targets they are right.
    """

    name = "panic"
    origin = "Envoy (healthy panic threshold; data-path confirmation lbsim)"
    threshold_percent: float = 50.0
    fail_traffic: bool = False
    base: Base = "served"
    confirm_failures: int = _CONFIRM_FAILURES
    confirm_window_s: float = _CONFIRM_WINDOW_S

    def _check(self) -> None:
        self._percent("threshold_percent", self.threshold_percent)
        _check_confirm(self, self.confirm_failures, self.confirm_window_s)

    def in_panic(self, targets: Sequence[TargetView], d: Decision) -> bool:
        return self.threshold_percent > 0 and _in_service_percent(targets, d) < self.threshold_percent - _EPS

    def on_zones(self, snap: Snapshot, d: Decision) -> None:
        mode = ZoneMode.FAIL_CLOSED if self.fail_traffic else ZoneMode.PANIC
        for zones, targets in _groups(snap):
            if self.in_panic(_base_of(targets, self.base), d):
                for z in zones:
                    escalate(d, z, mode)
                d.dead.update(
                    t.id for t in targets if confirmed_down(t, snap.now, self.confirm_failures, self.confirm_window_s)
                )


@dataclass(eq=False)
class MaxEjection(BuiltinPolicy):
    """Envoy / gRPC `max_ejection_percent`: cap the share of registered targets held out of service.

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
    `DetectorImpl::ejectHost`, research/policies.md 2.1 and 2.5.
    Data-path confirmation (lbsim's addition; `confirm_failures=0` gives the reference behaviour exactly): a
    target that probes call unhealthy and whose last `confirm_failures` (default 3) real connections failed,
    the latest within `confirm_window_s` (default 30), is really down (`lb.policy.confirmed_down`).
    A confirmed-down target leaves service without counting against the cap, so a dead zone cannot use up
    the cap that protects the rest of the fleet.
    """

    name = "max-ejection"
    origin = "Envoy / gRPC (max ejection percent; data-path confirmation lbsim)"
    max_percent: float = 10.0
    semantics: Literal["before", "inclusive"] = "inclusive"
    always_eject_one_host: bool = False
    base: Base = "served"
    confirm_failures: int = _CONFIRM_FAILURES
    confirm_window_s: float = _CONFIRM_WINDOW_S
    _ejected: set[str] = field(default_factory=set, init=False, repr=False)
    _prev_in: set[str] = field(default_factory=set, init=False, repr=False)

    def _check(self) -> None:
        self._percent("max_percent", self.max_percent)
        _check_confirm(self, self.confirm_failures, self.confirm_window_s)

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
            return 100.0 * ejected < self.max_percent * base_count - _EPS
        return 100.0 * (ejected + 1) <= self.max_percent * base_count + _EPS

    def on_targets(self, snap: Snapshot, d: Decision) -> None:
        live = snap.registered()
        out = [t for t in live if t.id not in d.in_service]
        self._ejected &= {t.id for t in out}  # back in service or gone: no longer an active ejection
        for t in sorted(
            (t for t in out if t.id in self._prev_in and t.id not in self._ejected), key=_candidate_order
        ):
            if confirmed_down(t, snap.now, self.confirm_failures, self.confirm_window_s):
                continue  # out of service, but not one of the cap's ejections
            if self.allows(len(self._ejected), len(_base_of(live, self.base))):
                self._ejected.add(t.id)
            else:
                _restore(d, t.id)
                d.withhold(self.name, t.id, WithholdReason.CAP)
        self._prev_in = {t.id for t in live if t.id in d.in_service}


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
    `floor` if it would break the floor, else `budget`. Source: the
    AWS summary of 2025-10-20 (research/aws-facts.md 2 step 8; no public setting exists, parameters are ours).
    Runs last in each phase (`Stage.ACCOUNT`) so it sees, and charges, every removal of the step.
    Data-path confirmation (lbsim's addition; `confirm_failures=0` gives the reference behaviour exactly): a
    target that probes call unhealthy and whose last `confirm_failures` (default 3) real connections failed,
    the latest within `confirm_window_s` (default 30), is really down (`lb.policy.confirmed_down`).
    A confirmed-down target leaves at once, free and whatever the floor: its capacity is gone already, and
    holding it in service only sends traffic to it (and keeps a dead zone published).
    """

    name = "velocity"
    origin = "AWS (post-incident fix; parameters and data-path confirmation lbsim)"
    max_removed_percent: float = 10.0
    window_s: float = 300.0
    floor_percent: float = 50.0
    min_budget: int = 1
    base: Base = "served"
    confirm_failures: int = _CONFIRM_FAILURES
    confirm_window_s: float = _CONFIRM_WINDOW_S
    _log: deque[tuple[float, int]] = field(default_factory=deque, init=False, repr=False)
    _prev_in: set[str] | None = field(default=None, init=False, repr=False)
    _prev_dns: set[str] | None = field(default=None, init=False, repr=False)

    def _check(self) -> None:
        self._percent("max_removed_percent", self.max_removed_percent)
        self._percent("floor_percent", self.floor_percent)
        self._require(self.window_s > 0, f"window_s must be > 0, got {self.window_s}")
        self._require(self.min_budget >= 0, f"min_budget must be >= 0, got {self.min_budget}")
        _check_confirm(self, self.confirm_failures, self.confirm_window_s)

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
        if capacity - cost < self.floor(base_count) - _EPS:
            return WithholdReason.FLOOR
        if used + cost > self.budget(base_count) + _EPS:
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
                key=_candidate_order,
            )
            if leaving:
                used = self.used(snap.now)
                capacity = sum(1 for t in live if t.id in d.in_service) + len(leaving)
                n = len(_base_of(live, self.base))
                for t in leaving:
                    refused = self.refusal(used, 1, capacity, n)
                    if refused is None:
                        self._log.append((snap.now, 1))
                        used += 1
                        capacity -= 1
                    else:
                        _restore(d, t.id)
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
                n = len(_base_of(live, self.base))
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
    penalty: float = 1000.0
    half_life_s: float = 60.0
    suppress_threshold: float = 2000.0
    reuse_threshold: float = 750.0
    max_suppress_s: float = 600.0
    _seen: dict[str, tuple[TargetState, float]] = field(default_factory=dict, init=False, repr=False)
    _merit: dict[str, tuple[float, float]] = field(default_factory=dict, init=False, repr=False)
    _suppressed: set[str] = field(default_factory=set, init=False, repr=False)

    def _check(self) -> None:
        self._require(self.penalty > 0, f"penalty must be > 0, got {self.penalty}")
        self._require(self.half_life_s > 0, f"half_life_s must be > 0, got {self.half_life_s}")
        self._require(self.max_suppress_s > 0, f"max_suppress_s must be > 0, got {self.max_suppress_s}")
        self._require(
            0 < self.reuse_threshold < self.suppress_threshold,
            f"need 0 < reuse_threshold < suppress_threshold, got {self.reuse_threshold:g} and "
            f"{self.suppress_threshold:g}",
        )
        self._require(
            self.ceiling() > self.suppress_threshold,
            f"the penalty ceiling reuse_threshold * 2^(max_suppress_s/half_life_s) = {self.ceiling():g} must "
            f"exceed suppress_threshold {self.suppress_threshold:g}, or nothing is ever suppressed",
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
    Sources: research/policies.md 2.1 (Envoy outlier table), 2.2 (HAProxy observe / error-limit).
    """

    name = "passive"
    origin = "HAProxy / Envoy (observe layer4, outlier detection)"
    consecutive_failures: int = 5
    base_ejection_s: float = 30.0
    max_ejection_s: float = 300.0
    decay_interval_s: float = 10.0
    keep_serving: bool = True
    min_successes: int = 3
    success_window_s: float = 30.0
    _until: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    _multiplier: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _decay_mark: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    _baseline: dict[str, int] = field(default_factory=dict, init=False, repr=False)

    def _check(self) -> None:
        self._require(
            self.consecutive_failures >= 1,
            f"consecutive_failures must be >= 1, got {self.consecutive_failures}",
        )
        self._require(self.base_ejection_s > 0, f"base_ejection_s must be > 0, got {self.base_ejection_s}")
        self._require(self.max_ejection_s > 0, f"max_ejection_s must be > 0, got {self.max_ejection_s}")
        self._require(self.decay_interval_s > 0, f"decay_interval_s must be > 0, got {self.decay_interval_s}")
        self._require(self.min_successes >= 1, f"min_successes must be >= 1, got {self.min_successes}")
        self._require(self.success_window_s > 0, f"success_window_s must be > 0, got {self.success_window_s}")

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


# ---------------------------------------------------------------------------------------------------------
# Registry, presets, specs


POLICY_TYPES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (
        Naive,
        FailOpen,
        MinHealthy,
        DnsFailover,
        Panic,
        MaxEjection,
        Velocity,
        FlapDamping,
        PassiveChecks,
    )
}

# Named combinations; values are specs. `aws` is the NLB default (fail-open + automatic AZ DNS failover).
PRESETS: dict[str, str] = {
    "aws": "fail-open+dns-failover",
    "aws-velocity": "fail-open+dns-failover+velocity",
    "envoy": "panic+max-ejection",
}


def _allowed_names() -> str:
    return f"policies: {', '.join(sorted(POLICY_TYPES))}; presets: {', '.join(sorted(PRESETS))}"


def make_policy(name: str, params: Mapping[str, Any] | None = None) -> Policy:
    """Build the policy registered as `name` with `params` (typed values or strings); PolicyError if not."""
    key = name.strip()
    cls = POLICY_TYPES.get(key)
    if cls is None:
        if key in PRESETS:
            raise PolicyError(
                f"{key!r} is a preset ({PRESETS[key]}), not a single policy; give it as a spec string"
            )
        raise PolicyError(f"unknown policy {name!r}; {_allowed_names()}")
    params = dict(params or {})
    if isinstance(cls, type) and issubclass(cls, BuiltinPolicy):
        allowed = cls.param_names()
        unknown = sorted(str(k) for k in params if k not in allowed)
        if unknown:
            raise PolicyError(
                f"policy {key!r} has no parameter {', '.join(repr(u) for u in unknown)}; "
                f"allowed: {', '.join(allowed) or 'none'}"
            )
    try:
        return cls(**params)
    except TypeError as e:  # a user class that is not a BuiltinPolicy
        raise PolicyError(f"policy {key!r}: {e}") from None


def split_top(text: str, sep: str) -> list[str]:
    """Split at `sep` outside parentheses and brackets; PolicyError if they do not balance."""
    parts: list[str] = []
    depth = 0
    start = 0
    for i, ch in enumerate(text):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
            if depth < 0:
                raise PolicyError(f"unbalanced {ch!r} at position {i} in {text!r}")
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise PolicyError(f"unbalanced parentheses or brackets in {text!r}")
    parts.append(text[start:])
    return parts


def _parse_term(term: str, spec: str) -> list[Policy]:
    term = term.strip()
    if not term:
        raise PolicyError(f"empty policy in spec {spec!r} (two '+' in a row, or one at an end?)")
    name, paren, rest = term.partition("(")
    name = name.strip()
    if not name or any(c.isspace() for c in name):
        raise PolicyError(f"bad policy name {name!r} in spec {spec!r}")
    if not paren:
        if name in PRESETS:
            return [p for t in split_top(PRESETS[name], "+") for p in _parse_term(t, PRESETS[name])]
        return [make_policy(name, None)]
    if not rest.rstrip().endswith(")"):
        raise PolicyError(f"missing ')' after the parameters of {name!r} in spec {spec!r}")
    if name in PRESETS:
        raise PolicyError(f"preset {name!r} takes no parameters; spell out its policies: {PRESETS[name]}")
    body = rest.rstrip()[:-1]
    params: dict[str, str] = {}
    if body.strip():
        for item in split_top(body, ","):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or not key:
                raise PolicyError(f"parameter {item.strip()!r} of {name!r} must look like name=value")
            if key in params:
                raise PolicyError(f"parameter {key!r} of {name!r} is given twice")
            params[key] = value.strip().strip("'\"")
    return [make_policy(name, params)]


def parse_policy_spec(spec: str) -> list[Policy]:
    """Parse `"fail-open+dns-failover"` or `"velocity(max_removed_percent=20,window_s=60)+aws"` into policies.

    Terms are joined with `+`; each is a policy name with optional `(name=value, ...)` parameters, or a
    preset name. List values are written `[a,b]` or `a|b`; `off`/`none` mean "not set" for optional numbers.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise PolicyError(f"empty policy spec; {_allowed_names()}")
    return [p for term in split_top(spec, "+") for p in _parse_term(term, spec)]


def describe_policies(policies: Iterable[Policy]) -> str:
    """One line describing a policy list, e.g. `fail-open + dns-failover(enabled=true, min_healthy=1)`."""
    return " + ".join(p.describe() for p in policies) or "naive"


def set_policy_param(policies: Iterable[Policy], policy: str, param: str, value: Any) -> int:
    """Set `param` on every policy named `policy` in `policies`; return how many were changed.

    For scenario timelines (e.g. `dns-failover.enabled=false` at the operator's 09:36). PolicyError if no
    such policy is in the list or it cannot take the parameter.
    """
    matched = [p for p in policies if p.name == policy]
    if not matched:
        raise PolicyError(f"no policy {policy!r} in this run")
    for p in matched:
        setter = getattr(p, "set_param", None)
        if setter is None:
            raise PolicyError(f"policy {policy!r} ({type(p).__name__}) has no run-time parameters")
        setter(param, value)
    return len(matched)


def load_policy_class(path: str) -> type[Policy]:
    """Import a user policy class from `"package.module:ClassName"`.

    This imports and therefore RUNS the module's code: only use it with code you trust. The class must
    subclass `lb.policy.Policy` (subclass `BuiltinPolicy` to get parameters, `set_param` and `describe`).
    It is not registered; pass it to `register_policy` to use its name in specs.
    """
    module_name, colon, class_name = path.partition(":")
    if not colon or not module_name.strip() or not class_name.strip():
        raise PolicyError(f"a policy class path looks like 'package.module:ClassName', got {path!r}")
    try:
        module = importlib.import_module(module_name.strip())
    except ImportError as e:
        raise PolicyError(f"cannot import {module_name.strip()!r} for policy class {path!r}: {e}") from None
    obj = getattr(module, class_name.strip(), None)
    if not isinstance(obj, type) or not issubclass(obj, Policy):
        raise PolicyError(f"{path!r} is not a subclass of lb.policy.Policy")
    return obj


def register_policy(cls: type[Policy], name: str | None = None) -> type[Policy]:
    """Make `cls` available to `make_policy` and specs under `name` (default: its `name` attribute)."""
    key = name or cls.name
    if key in PRESETS or (key in POLICY_TYPES and POLICY_TYPES[key] is not cls):
        raise PolicyError(f"policy name {key!r} is already taken; {_allowed_names()}")
    POLICY_TYPES[key] = cls
    return cls
