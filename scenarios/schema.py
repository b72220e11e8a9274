"""The scenario file format (YAML, validated by pydantic) and its loader with errors that name file and field.

Rules of the format, each enforced at load time so a mistake is reported before anything starts:
1. Durations are plain numbers of sim seconds, in fields whose names end in `_s` (and `at`); rates are numbers
   per sim second (`_per_s`). Strings (`"10"`, `"10s"`, `"10 ms"`) and booleans are rejected wherever a number
   is expected, with one message per field; ints are accepted where floats are.
2. Unknown fields are rejected with a "did you mean" from the fields allowed at that place (aliases included).
3. Thresholds are 1-10 (AWS allows 2-10; 1 is allowed for speed and noted), fractions 0-1, intervals > 0.
4. Timeline events happen within the run, select zones and targets this scenario has (`<zone>-<n>`, or
   `<zone>-i<n>` for instances a control plane launches), and two events at the same `at` must not conflict:
   the same kind of change (path, backend, deregister) to overlapping selections, the same control action, or
   the same policy parameter.
5. A scenario's `policy:` entries name only built-in policies and presets, and are built when the file is
   loaded; `module:Class` paths belong to `lbsim compare --allow-import`, and the term `scenario` to `--policy`.
6. A scenario has targets: some per zone, a `register` event, or a control plane that launches them.
Invalid YAML is reported as `FILE:LINE:COL: ...`; every other problem as one line naming its field.

Each rule is written once: the number types are `simconfig`'s, and `health_check`, `checker`, `load_balancer`, a
path change, a backend change and the `control_plane` sections are the components' own configuration models
(the load balancer's CheckSettings, CheckerCapacity and BalancerSettings, PathParams, ModeChange, the settings of
each control-plane component), so a file is refused for exactly what the component would refuse when built.
"""

from __future__ import annotations

import difflib
import re
import types
from collections.abc import Callable, Hashable
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, BeforeValidator, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from backends.app import ModeChange
from backends.controlplane.dnsautomation import EnactorNames
from backends.controlplane.dnsservice import DnsSettings
from backends.controlplane.hostmanager import HostManagerSettings
from backends.controlplane.instances import InstanceSettings
from backends.controlplane.leasestore import LeaseStoreSettings
from backends.controlplane.netmanager import NetworkManagerSettings, PropagationRate
from backends.netpath import FLAP_CAN_SERVE_BELOW, PathParams
from lb.balancer import BalancerSettings
from lb.checker import CheckerCapacity, CheckSettings, TransitionCost
from lb.health import aws_range_notes, check_quorum
from lb.policies import (
    POLICY_TYPES,
    PRESETS,
    BuiltinPolicy,
    PolicyError,
    builtin_policy,
    make_policy,
    parse_policy_spec,
    split_top,
)
from lb.policy import Policy
from scenarios.outcomes import Headline
from simconfig import ConfigModel, Flag, MaxDepth, PerSecond, Rate, Seconds, Speed, Whole

PathStateName = Literal["open", "blackhole", "refuse", "reset", "latency", "flap", "loss", "bandwidth"]

# The error type of the checks that need the whole scenario; their message already says what was given.
_RULE = "scenario_rule"


class ScenarioError(ValueError):
    """A scenario that cannot be run, with a message meant for the person who wrote it."""


# The base of every spec: the same as the components' own configs, which most specs are.
_Model = ConfigModel


class HealthCheckSpec(CheckSettings):
    """The target group's health check by the checker's own rules (lb's CheckSettings), whose timeout must also
    end before the next check is due, as AWS requires (the checker itself allows overlapping checks)."""

    @model_validator(mode="after")
    def _timeout_fits(self) -> HealthCheckSpec:
        if self.timeout_s >= self.interval_s:
            raise ValueError(f"timeout_s ({self.timeout_s:g}) must be smaller than interval_s ({self.interval_s:g})")
        return self

    def aws_notes(self) -> list[str]:
        return aws_range_notes(self.interval_s, self.timeout_s, self.healthy_threshold, self.unhealthy_threshold,
                               self.success_codes)


# The checker's capacity and the load balancer's settings, by their own rules.
CheckerSpec = CheckerCapacity
LoadBalancerSpec = BalancerSettings


class TrafficSpec(_Model):
    rate_per_s: Annotated[PerSecond, Field(ge=0, le=5000)] = 10.0  # requests per sim second
    timeout_s: Annotated[Seconds, Field(gt=0)] = 5.0
    path: str = "/work?bytes=256"
    dns_ttl_s: Annotated[Seconds, Field(ge=0)] = 60.0  # NLB's record TTL (docs/sources.md#nlb-health)
    max_outstanding: Annotated[Whole, Field(ge=1, le=10000)] = 500


class PathChange(PathParams):
    """A path state and its parameters, by the path's own rules (PathParams)."""

    state: PathStateName
    cut_existing: Flag = False

    def params(self) -> dict[str, float]:
        return self.given()

    @model_validator(mode="after")
    def _fits_state(self) -> PathChange:
        # On load: a parameter the state does not take (or a missing one) would otherwise only fail when the
        # event fires, mid-run.
        self.fit(self.state)
        return self


# A backend's mode and its parameters, by the backend's own rules (`slow` needs latency_s, ...).
BackendChange = ModeChange


class Register(_Model):
    """New targets joining the target group (they start in `initial`)."""

    count: Annotated[Whole, Field(ge=1, le=1000)] = 1
    path: PathChange | None = None
    backend: BackendChange | None = None


class PolicyParam(_Model):
    policy: str
    param: str
    value: Any


class DnsSpec(DnsSettings):
    # Default: one per zone, as AWS runs one per AZ.
    enactors: EnactorNames | None = None


# The components' own settings, with their own rules (lease TTLs outlive renewals, a partial window's flap fits a
# path, ...), are the specs: a file is checked by the rules the component enforces when it is built.
LeaseStoreSpec = LeaseStoreSettings
HostManagerSpec = HostManagerSettings
NetworkManagerSpec = NetworkManagerSettings


class InstancesSpec(InstanceSettings):
    desired_per_zone: Annotated[Whole, Field(ge=0, le=500)] | None = None  # default: targets_per_zone


class ControlPlaneSpec(_Model):
    """The emulated control plane the backends depend on; absent = targets with no control plane at all."""

    dns: DnsSpec = DnsSpec()
    lease_store: LeaseStoreSpec = LeaseStoreSpec()
    host_manager: HostManagerSpec = HostManagerSpec()
    network_manager: NetworkManagerSpec = NetworkManagerSpec()
    instances: InstancesSpec = InstancesSpec()


ComponentName = Literal["dns", "lease_store", "host_manager", "network_manager", "instances"]

# component -> action -> (required parameters, optional parameters). A parameter set to null counts as given:
# `per_s: null` lifts a throttle.
CONTROL_ACTIONS: dict[str, dict[str, tuple[frozenset[str], frozenset[str]]]] = {
    "dns": {
        "delay-enactor": (frozenset({"enactor", "delay_s"}), frozenset({"writes"})),
        "fail-writes": (frozenset({"enactor", "count"}), frozenset()),
        "restore": (frozenset(), frozenset()),
        "pause": (frozenset(), frozenset()),
        "resume": (frozenset(), frozenset()),
    },
    "lease_store": {"set-capacity": (frozenset({"capacity_per_s"}), frozenset())},
    "host_manager": {
        "throttle": (frozenset({"per_s"}), frozenset()),
        "restart": (frozenset(), frozenset()),
        "set-admission": (frozenset({"max_depth"}), frozenset()),
    },
    "network_manager": {
        "set-rate": (frozenset({"rate_per_s"}), frozenset()),
        "set-admission": (frozenset({"max_depth"}), frozenset()),
    },
    "instances": {
        "set-desired": (frozenset({"count"}), frozenset({"zone"})),
        "launch": (frozenset({"zone", "count"}), frozenset()),
        "terminate": (frozenset({"count"}), frozenset({"zone"})),
        "set-launch-rate": (frozenset({"per_s"}), frozenset()),
    },
}


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""


class ControlAction(_Model):
    """An operator or fault action on one control-plane component (see CONTROL_ACTIONS for what each takes)."""

    component: ComponentName
    action: str
    enactor: str | None = None
    delay_s: Annotated[Seconds, Field(ge=0)] | None = None
    writes: Annotated[Whole, Field(ge=1)] | None = None
    count: Annotated[Whole, Field(ge=0, le=10000)] | None = None
    zone: str | None = None
    # The components' own rules for the values these actions set (`per_s`: host throttle and launch rate alike).
    per_s: Rate | None = None  # a host-manager throttle or a launch rate
    rate_per_s: PropagationRate | None = None
    capacity_per_s: Rate | None = None
    max_depth: MaxDepth | None = None

    @model_validator(mode="after")
    def _params_fit(self) -> ControlAction:
        actions = CONTROL_ACTIONS[self.component]
        if self.action not in actions:
            raise ValueError(f"action {self.action!r} of component {self.component!r} must be one of {sorted(actions)}"
                             + _did_you_mean(self.action, sorted(actions)))
        required, optional = actions[self.action]
        given = set(self.model_fields_set) - {"component", "action"}
        missing = sorted(required - given)
        extra = sorted(given - required - optional)
        if missing:
            raise ValueError(f"{self.component} {self.action} needs {', '.join(missing)}")
        if extra:
            allowed = sorted(required | optional)
            raise ValueError(
                f"{self.component} {self.action} takes {', '.join(allowed) or 'no parameters'}, not {', '.join(extra)}"
            )
        return self

    def params(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in sorted(self.model_fields_set - {"component", "action"})}


class CheckerChange(_Model):
    """An operator change to the health-check subsystem, from now on."""

    transition_cost: TransitionCost


class Event(_Model):
    """One timeline entry: at `at` sim seconds, do exactly one action to the selected targets."""

    at: Annotated[Seconds, Field(ge=0)]
    zone: str | None = None
    targets: Annotated[list[str], Field(min_length=1)] | None = None
    count: Annotated[Whole, Field(ge=1)] | None = None  # the first N targets of the selection
    path: PathChange | None = None
    backend: BackendChange | None = None
    register_: Register | None = Field(None, alias="register")  # `register` would shadow BaseModel's
    deregister: Flag = False
    set_policy: PolicyParam | None = None
    control: ControlAction | None = None
    checker: CheckerChange | None = None
    note: str = ""

    @model_validator(mode="after")
    def _one_action(self) -> Event:
        kinds = ("path", "backend", "register_", "set_policy", "control", "checker")
        actions = [n.rstrip("_") for n in kinds if getattr(self, n) is not None]
        if self.deregister:
            actions.append("deregister")
        if len(actions) != 1:
            raise ValueError(
                "each event needs exactly one action of: path, backend, register, deregister, set_policy, control, "
                "checker "
                f"(got {', '.join(actions) or 'none'})"
            )
        if self.register_ is not None and self.zone is None:
            raise ValueError("a register event needs `zone`: the zone the new targets join")
        return self

    @property
    def action(self) -> str:
        for n in ("path", "backend", "register_", "set_policy", "checker"):
            if getattr(self, n) is not None:
                return n.rstrip("_")
        if self.control is not None:
            return f"{self.control.component}:{self.control.action}"
        return "deregister"


def _policy_entry(v: Any) -> Any:
    # Checked here rather than by a `str | dict` union, whose failure is one line per branch.
    if not isinstance(v, str | dict):
        msg = "must be a policy spec like 'fail-open+dns-failover' or a mapping like {name: velocity, window_s: 60}"
        raise PydanticCustomError("policy_type", "{m}", {"m": msg})
    return v


PolicyEntry = str | dict[str, Any]

# The term `ScenarioRun` replaces by a scenario's own policy list (scenarios.runner.SCENARIO_POLICY).
_SCENARIO_TERM = "scenario"
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def _builtin_policy(name: str) -> type[BuiltinPolicy] | None:
    """The built-in policy class called `name`; None for unknown names and for classes registered by users."""
    return builtin_policy(name)


def _builtin_names() -> str:
    names = sorted(n for n in POLICY_TYPES if _builtin_policy(n) is not None)
    return f"built-in policies: {', '.join(names)}; presets: {', '.join(sorted(PRESETS))}"


def _spec_terms(spec: str) -> list[str]:
    """The policy names of a spec's `+`-joined terms (parameters, in parentheses or brackets, left out)."""
    return [term.partition("(")[0].strip() for term in split_top(spec, "+")]


def build_scenario_policies(entry: Any) -> list[Policy]:
    """The policies one `policy:` entry of a scenario file stands for; PolicyError says what is not allowed."""
    if isinstance(entry, str):
        names = _spec_terms(entry)
    elif isinstance(entry, dict):
        name = entry.get("name")
        if not isinstance(name, str):
            raise PolicyError(f"a policy given as a mapping needs a `name`; {_builtin_names()}")
        names = [name.strip()]
    else:
        raise PolicyError(f"must be a spec string or a mapping with a `name`; {_builtin_names()}")
    for name in names:
        if name == _SCENARIO_TERM:
            raise PolicyError(f"the term {_SCENARIO_TERM!r} stands for a scenario's own policies and is only for "
                              f"`--policy` on the command line; here name the policies: {_builtin_names()}")
        if _IMPORT_PATH.match(name):
            raise PolicyError(f"{name!r} is a Python import path; a scenario file may only name built-in policies "
                              f"and presets ({_builtin_names()}). To try your own class, use `lbsim compare SCENARIO "
                              f"--allow-import --policy {name}`")
    if isinstance(entry, str):
        policies = parse_policy_spec(entry)
    else:
        params = {k: v for k, v in entry.items() if k != "name"}
        policies = [make_policy(names[0], params)]
    for p in policies:
        if _builtin_policy(p.name) is not type(p):
            raise PolicyError(f"{p.name!r} is not a built-in policy; a scenario file may only name "
                              f"{_builtin_names()}")
    return policies


# -- target selections (rule 4) ----------------------------------------------------------------------------------

_TARGET_ID = re.compile(r"^(?P<zone>.+)-(?P<instance>i?)(?P<n>\d+)$")


def target_zone(target: str) -> str | None:
    """The zone in a target id (`a-3` and the control plane's instance `a-i3` are in zone `a`)."""
    m = _TARGET_ID.match(target)
    return m.group("zone") if m else None


def _selected(ev: Event) -> set[str] | None:
    """The target ids an event lists (narrowed to its zone, as the runner does); None if it selects by zone."""
    if ev.targets is None:
        return None
    return {t for t in ev.targets if ev.zone is None or target_zone(t) == ev.zone}


def selections_overlap(a: Event, b: Event) -> bool:
    """Whether two events may act on a common target. `count` is ignored: which N targets it picks depends on
    the run, so two counted selections of one zone are taken to overlap."""
    sa, sb = _selected(a), _selected(b)
    if sa is not None and sb is not None:
        return bool(sa & sb)
    if sa is not None or sb is not None:
        listed, other = (sa, b) if sa is not None else (sb, a)
        assert listed is not None
        return other.zone is None or any(target_zone(t) == other.zone for t in listed)
    return a.zone is None or b.zone is None or a.zone == b.zone


def _describe_selection(ev: Event) -> str:
    if ev.targets is not None:
        return f"targets {ev.targets}"
    return f"zone {ev.zone}" if ev.zone is not None else "every target"


def event_conflict(a: Event, b: Event) -> str | None:
    """Why two events at the same `at` cannot both be applied in either order (with what to do instead), or
    None if they can. `register` never conflicts: new targets are not in any other event's selection."""
    if a.at != b.at:
        return None
    disjoint = "give them different `at` or disjoint selections"
    selections = f"({_describe_selection(a)}; {_describe_selection(b)})"
    for kind in ("path", "backend"):
        if getattr(a, kind) is not None and getattr(b, kind) is not None and selections_overlap(a, b):
            return f"both change `{kind}` of overlapping selections {selections}; {disjoint}"
    if a.deregister and b.deregister and selections_overlap(a, b):
        return f"both deregister overlapping selections {selections}; {disjoint}"
    one = "only one can take effect: keep one, or give them different `at`"
    if a.control is not None and b.control is not None:
        ca, cb = a.control, b.control
        # The same action for different enactors or zones is two actions (delay enactors a and b at once).
        if (ca.component, ca.action) == (cb.component, cb.action) \
                and not (ca.enactor is not None and cb.enactor is not None and ca.enactor != cb.enactor) \
                and not (ca.zone is not None and cb.zone is not None and ca.zone != cb.zone):
            return f"both do `{ca.component} {ca.action}`; {one}"
    if a.checker is not None and b.checker is not None:
        return f"both change the checker; {one}"
    if a.set_policy is not None and b.set_policy is not None:
        pa, pb = a.set_policy, b.set_policy
        if (pa.policy, pa.param) == (pb.policy, pb.param):
            return f"both set `{pa.policy}.{pa.param}`; {one}"
    return None


class GroundTruthSpec(_Model):
    """What counts as a target that could serve, where the scenario has to choose."""

    # A flapping path can serve while it loses less than this share of new connections; it decides whether
    # ejecting a flapping target is a false ejection (flapping-new-targets, aws-2025-10-20).
    flap_can_serve_below: Annotated[float, Field(gt=0, le=1)] = FLAP_CAN_SERVE_BELOW


class Scenario(_Model):
    name: str
    description: str = ""
    # The policies the scenario's author expects to do best (specs, as for --policy), shown by `lbsim scenarios`.
    should_win: list[str] = []
    # The metric on which every `should_win` policy beats naive (scenarios.outcomes.beats).
    headline: Headline = "availability"
    seed: Whole = 1
    speed: Annotated[Speed, Field(gt=0, le=1000)] = 10.0
    duration_s: Annotated[Seconds, Field(gt=0, le=7 * 24 * 3600)] = 300.0
    zones: Annotated[list[str], Field(min_length=1, max_length=6)] = ["a", "b", "c"]
    targets_per_zone: Annotated[Whole, Field(ge=0, le=500)] = 3
    start_in_service: Flag = True  # the fleet was healthy before the run began; False simulates a cold start
    # Requests per sim second each target serves before answering 503 (None: unlimited). With it, the capacity
    # left after a DNS failover can fail to carry the load, as applications saw on 2025-10-20.
    backend_capacity_per_s: Annotated[PerSecond, Field(gt=0)] | None = None
    health_check: HealthCheckSpec = HealthCheckSpec()
    checker: CheckerSpec = CheckerSpec()
    load_balancer: LoadBalancerSpec = LoadBalancerSpec()
    policy: list[Annotated[PolicyEntry, BeforeValidator(_policy_entry)]] = ["aws"]
    traffic: TrafficSpec = TrafficSpec()
    sample_interval_s: Annotated[Seconds, Field(gt=0)] = 1.0
    record_interval_s: Annotated[Seconds, Field(gt=0)] = 10.0  # how often the recorder scrapes /metrics
    control_plane: ControlPlaneSpec | None = None
    ground_truth: GroundTruthSpec = GroundTruthSpec()
    timeline: list[Event] = []

    @field_validator("zones")
    @classmethod
    def _zones(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("zone names must be unique")
        for z in v:
            if not z or not all(c.isalnum() or c in "-_" for c in z):
                raise ValueError(f"zone name {z!r} must be letters, digits, '-' or '_'")
        return v

    @model_validator(mode="after")
    def _whole_scenario(self) -> Scenario:
        problems: list[tuple[tuple[str | int, ...], str]] = []
        if self.health_check.quorum is not None:
            try:
                check_quorum(self.health_check.quorum, len(self.zones))
            except ValueError as e:
                problems.append((("health_check", "quorum"), str(e)))
        policies = self._check_policies(problems)
        for i, ev in enumerate(self.timeline):
            self._check_event(i, ev, problems)
        self._check_set_policy(policies, problems)
        for j, b in enumerate(self.timeline):
            for i, a in enumerate(self.timeline[:j]):
                why = event_conflict(a, b)
                if why is not None:
                    problems.append((("timeline", j), f"timeline[{i}] and timeline[{j}] happen at {a.at:g} and {why}"))
        if self.targets_per_zone == 0 and self.control_plane is None \
                and not any(ev.register_ is not None for ev in self.timeline):
            problems.append((("targets_per_zone",), "the scenario has no targets: targets_per_zone is 0, no timeline "
                                                   "event registers any and there is no control_plane to launch "
                                                   "them; set targets_per_zone to 1-500 or add a `register` event"))
        if problems:
            # In the order of the file's fields, then of the timeline, rather than in the order of the checks.
            fields = list(type(self).model_fields)
            problems.sort(key=lambda p: (fields.index(str(p[0][0])), p[0][1] if len(p[0]) > 1 else -1))
            raise ValidationError.from_exception_data(
                "Scenario",
                [InitErrorDetails(type=PydanticCustomError(_RULE, "{m}", {"m": msg}), loc=loc, input=None)
                 for loc, msg in problems],
            )
        return self

    def enactor_names(self) -> list[str]:
        cp = self.control_plane
        return list(cp.dns.enactors) if cp is not None and cp.dns.enactors is not None else list(self.zones)

    def _check_policies(self, problems: list[tuple[tuple[str | int, ...], str]]) -> list[Policy]:
        out: list[Policy] = []
        for i, entry in enumerate(self.policy):
            try:
                out.extend(build_scenario_policies(entry))
            except PolicyError as e:
                problems.append((("policy", i), str(e)))
        return out

    def _check_event(self, i: int, ev: Event, problems: list[tuple[tuple[str | int, ...], str]]) -> None:
        where: tuple[str | int, ...] = ("timeline", i)
        if ev.at > self.duration_s:
            problems.append(((*where, "at"), f"{ev.at:g} is after duration_s = {self.duration_s:g}; events happen "
                                             f"from 0 to duration_s"))
        if ev.zone is not None and ev.zone not in self.zones:
            problems.append(((*where, "zone"), f"{ev.zone!r} is not one of the zones {self.zones}"
                                               + _did_you_mean(ev.zone, self.zones)))
        if ev.targets is not None:
            form = "<zone>-<n>" + (" or <zone>-i<n> (an instance)" if self.control_plane is not None else "")
            bad = [t for t in ev.targets if not self._known_form(t)]
            if bad:
                problems.append(((*where, "targets"), f"{bad} are not target ids of this scenario: ids look like "
                                                      f"{form} with a zone of {self.zones}, e.g. {self.zones[0]}-0"))
            elif ev.zone is not None:
                elsewhere = [t for t in ev.targets if target_zone(t) != ev.zone]
                if elsewhere:
                    problems.append(((*where, "targets"), f"{elsewhere} are not in zone {ev.zone!r}, so the event "
                                                          "would not select them; list targets of that zone or "
                                                          "leave out `zone`"))
        c = ev.control
        if c is not None:
            if self.control_plane is None:
                problems.append(((*where, "control"), "acts on the control plane, but the scenario has no "
                                                      "`control_plane` section"))
            if c.enactor is not None and c.enactor not in self.enactor_names():
                problems.append(((*where, "control", "enactor"),
                                 f"{c.enactor!r} is not one of the enactors {self.enactor_names()}"))
            if c.zone is not None and c.zone not in self.zones:
                problems.append(((*where, "control", "zone"), f"{c.zone!r} is not one of the zones {self.zones}"))

    def _known_form(self, target: str) -> bool:
        m = _TARGET_ID.match(target)
        if m is None or m.group("zone") not in self.zones:
            return False
        return not m.group("instance") or self.control_plane is not None

    def _check_set_policy(self, policies: list[Policy], problems: list[tuple[tuple[str | int, ...], str]]) -> None:
        """Check each `set_policy` of a built-in policy as the run will apply it: on this scenario's own policies
        (or a default one, if it has none by that name), in timeline order. Names that are not built-in are left
        to the run, which may have the user's policy of that name."""
        defaults: dict[str, BuiltinPolicy] = {}
        order = sorted(range(len(self.timeline)), key=lambda k: self.timeline[k].at)
        for i in order:
            sp = self.timeline[i].set_policy
            if sp is None:
                continue
            where: tuple[str | int, ...] = ("timeline", i, "set_policy")
            if sp.policy in PRESETS:
                problems.append(((*where, "policy"), f"{sp.policy!r} is a preset; name one of its policies: "
                                                     f"{PRESETS[sp.policy].replace('+', ', ')}"))
                continue
            cls = _builtin_policy(sp.policy)
            if cls is None:
                continue
            if sp.param not in cls.param_names():
                problems.append(((*where, "param"), f"policy {sp.policy!r} has no parameter {sp.param!r}; allowed: "
                                                    f"{', '.join(cls.param_names()) or 'none'}"
                                                    + _did_you_mean(sp.param, cls.param_names())))
                continue
            targets = [p for p in policies if p.name == sp.policy and isinstance(p, BuiltinPolicy)]
            if not targets:
                targets = [defaults.setdefault(sp.policy, cls())]
            try:
                for p in targets:
                    p.set_param(sp.param, sp.value)
            except PolicyError as e:
                problems.append(((*where, "value"), str(e)))


# -- loading and messages ------------------------------------------------------------------------------------------


def builtin_names() -> list[str]:
    lib = resources.files("scenarios.library")
    return sorted(p.name.removesuffix(".yaml") for p in lib.iterdir() if p.name.endswith(".yaml"))


def _all_models() -> dict[str, type[BaseModel]]:
    out: dict[str, type[BaseModel]] = {}
    todo: list[type[BaseModel]] = [_Model]
    while todo:
        cls = todo.pop()
        out[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return out


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds, looking through `X | None`, `list[X]` and `Annotated`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType, list, Annotated):
        for arg in get_args(annotation):
            found = _submodel(arg)
            if found is not None:
                return found
    return None


def _field_names_at(root: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The names a user may write at `loc` (a field's parent), as spelled in files: aliases, not Python names."""
    model: type[BaseModel] | None = root
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        by_key = {f.alias or n: f for n, f in model.model_fields.items()} | model.model_fields
        field = by_key.get(part)
        model = _submodel(field.annotation) if field is not None else None
    if model is None:
        return []
    return [f.alias or n for n, f in model.model_fields.items()]


_PLAIN = {
    "model_type": "must be a mapping of fields, e.g. {field: value}",
    "dict_type": "must be a mapping, e.g. {name: velocity}",
    "list_type": "must be a list, e.g. [a, b]",
    "string_type": "must be text",
    "int_from_float": "must be a whole number",
}


def _short(value: Any) -> str:
    # As YAML spells them, since that is what the user wrote.
    text = {True: "true", False: "false"}.get(value, repr(value)) if isinstance(value, bool) else repr(value)
    if value is None:
        text = "null"
    return text if len(text) <= 80 else text[:77] + "..."


def _format_validation(source: str, err: ValidationError) -> str:
    """One line per problem: the field's dotted path, what is wrong and what is allowed, and what was given."""
    root = _all_models().get(err.title, Scenario)
    lines = [f"{source}: invalid scenario"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ").replace("Input should be", "must be", 1)
        got = e.get("input")
        if e["type"] == "extra_forbidden":
            names = _field_names_at(root, e["loc"][:-1])
            hint = _did_you_mean(str(e["loc"][-1]), names)
            msg = "unknown field" + (hint or (f"; allowed here: {', '.join(names)}" if names else ""))
        elif e["type"] == "literal_error" and "expected" in e.get("ctx", {}):
            expected = e["ctx"]["expected"]
            msg = f"must be one of {expected}"
            if isinstance(got, str):
                msg += _did_you_mean(got, re.findall(r"'([^']*)'", expected))
        elif e["type"] in _PLAIN:
            msg = _PLAIN[e["type"]]
        # A whole mapping as "got" buries the message; the message names what is wrong in it instead.
        if e["type"] == _RULE or isinstance(got, dict | list):
            lines.append(f"  {loc}: {msg}")
        else:
            lines.append(f"  {loc}: {msg} (got {_short(got)})")
    return "\n".join(lines)


def parse_scenario(data: Any, source: str) -> Scenario:
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}: a scenario must be a YAML mapping, got {type(data).__name__}")
    try:
        return Scenario.model_validate(data)
    except ValidationError as e:
        raise ScenarioError(_format_validation(source, e)) from None


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            if key in seen:
                first = seen[key]
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (first at line {first.line + 1}, column "
                                f"{first.column + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)



def _yaml_error(source: str, e: yaml.YAMLError) -> str:
    """`FILE:LINE:COL: not valid YAML: problem (context)`, on one line; lines and columns count from 1."""
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        mark = e.problem_mark
        msg = f"{source}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {e.problem}"
        if e.context:
            cm = e.context_mark
            at = f" at line {cm.line + 1}, column {cm.column + 1}" if cm is not None and cm != mark else ""
            msg += f" ({e.context}{at})"
        if e.problem and "'\\t'" in e.problem:
            msg += "; YAML indents with spaces, not tabs"
        elif e.problem == "mapping values are not allowed here":
            msg += "; check the indentation of this line and the one before, or quote a value that holds ': '"
        return msg
    return f"{source}: not valid YAML: {' '.join(str(e).split())}"


def parse_yaml(text: str, source: str) -> Any:
    """The data in a YAML document; ScenarioError with file, line and column if it is not valid YAML."""
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader: builds only plain data
    except yaml.YAMLError as e:
        raise ScenarioError(_yaml_error(source, e)) from None


def apply_overrides(data: Any, overrides: list[str], source: str) -> Any:
    """Set dotted fields of a scenario's raw mapping from `KEY=VALUE` strings (VALUE is YAML), before validation,
    so an override is checked exactly as if it had been written in the file."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ScenarioError(f"--set {item!r}: expected KEY=VALUE with a dotted KEY, e.g. speed=4 or "
                                "control_plane.dns.protections.cas=true")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ScenarioError(f"--set {item!r}: the value is not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(data, dict):
            break  # parse_scenario reports what is wrong with the file itself
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ScenarioError(f"{source}: --set {item!r}: {'.'.join(parts[: depth + 1])} is not a mapping")
            node = child
        node[parts[-1]] = value
    return data


def _read(path: Path, read: Callable[[], str]) -> str:
    try:
        return read()
    except UnicodeDecodeError as e:
        raise ScenarioError(f"{path}: not a text file (UTF-8 expected; byte {e.start} is not)") from None
    except OSError as e:
        raise ScenarioError(f"{path}: cannot be read: {e.strerror or e}") from None


def load_scenario(name_or_path: str, overrides: list[str] | None = None) -> tuple[Scenario, str]:
    """Load a built-in scenario by name or a YAML file by path, with `--set` overrides applied; return it with
    the source it came from."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ScenarioError(f"{name_or_path}: no such scenario file")
        source = str(path)
        text = _read(path, lambda: path.read_text(encoding="utf-8"))
    else:
        names = builtin_names()
        if name_or_path not in names:
            raise ScenarioError(
                f"{name_or_path!r} is neither a scenario file nor a built-in scenario (built-ins: {', '.join(names)})"
            )
        source = f"built-in:{name_or_path}"
        text = resources.files("scenarios.library").joinpath(f"{name_or_path}.yaml").read_text(encoding="utf-8")
    data = parse_yaml(text, source)
    if overrides:
        data = apply_overrides(data, overrides, source)
        source += " with --set " + " ".join(overrides)
    return parse_scenario(data, source), source
