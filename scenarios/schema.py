"""The scenario file format (YAML, validated by pydantic) and its loader with errors that name file and field."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lb.health import (
    AWS_DEFAULT_HEALTHY_THRESHOLD,
    AWS_DEFAULT_INTERVAL_S,
    AWS_DEFAULT_SUCCESS_CODES,
    AWS_DEFAULT_TIMEOUT_HTTP_S,
    AWS_DEFAULT_UNHEALTHY_THRESHOLD,
    aws_range_notes,
    parse_success_codes,
)

PathStateName = Literal["open", "blackhole", "refuse", "reset", "latency", "flap", "loss", "bandwidth"]
BackendModeName = Literal["healthy", "unhealthy", "slow", "hang", "crash"]


class ScenarioError(ValueError):
    """A scenario that cannot be run, with a message meant for the person who wrote it."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class HealthCheckSpec(_Model):
    protocol: Literal["http", "tcp"] = "http"
    path: str = "/health"
    interval_s: Annotated[float, Field(gt=0)] = AWS_DEFAULT_INTERVAL_S
    timeout_s: Annotated[float, Field(gt=0)] = AWS_DEFAULT_TIMEOUT_HTTP_S
    healthy_threshold: Annotated[int, Field(ge=1, le=100)] = AWS_DEFAULT_HEALTHY_THRESHOLD
    unhealthy_threshold: Annotated[int, Field(ge=1, le=100)] = AWS_DEFAULT_UNHEALTHY_THRESHOLD
    success_codes: str = AWS_DEFAULT_SUCCESS_CODES
    jitter: Annotated[float, Field(ge=0, lt=1)] = 0.1
    quorum: Annotated[int, Field(ge=1)] | None = None

    @field_validator("success_codes")
    @classmethod
    def _codes(cls, v: str) -> str:
        parse_success_codes(v)
        return v

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/") or any(c.isspace() for c in v):
            raise ValueError("must start with '/' and contain no whitespace")
        return v

    @model_validator(mode="after")
    def _timeout_fits(self) -> HealthCheckSpec:
        if self.timeout_s >= self.interval_s:
            raise ValueError(f"timeout_s ({self.timeout_s:g}) must be smaller than interval_s ({self.interval_s:g})")
        return self

    def aws_notes(self) -> list[str]:
        return aws_range_notes(self.interval_s, self.timeout_s, self.healthy_threshold, self.unhealthy_threshold,
                               self.success_codes)


class CheckerSpec(_Model):
    max_in_flight: Annotated[int, Field(ge=1)] = 1000
    max_per_second: Annotated[float, Field(gt=0)] = 1000.0
    transition_cost: Annotated[float, Field(ge=0)] = 0.0


class LoadBalancerSpec(_Model):
    cross_zone: bool = False
    selection: Literal["flow-hash", "round-robin"] = "flow-hash"
    deregistration_delay_s: Annotated[float, Field(ge=0, le=3600)] = 300.0  # AWS default
    terminate_unhealthy_connections: bool = True
    connect_timeout_s: Annotated[float, Field(gt=0)] = 10.0


class TrafficSpec(_Model):
    rate_per_s: Annotated[float, Field(ge=0, le=5000)] = 10.0  # requests per sim second
    timeout_s: Annotated[float, Field(gt=0)] = 5.0
    path: str = "/work?bytes=256"
    dns_ttl_s: Annotated[float, Field(ge=0)] = 60.0  # NLB's record TTL (research/aws-facts.md 4.3)
    max_outstanding: Annotated[int, Field(ge=1, le=10000)] = 500


class PathChange(_Model):
    state: PathStateName
    cut_existing: bool = False
    latency_s: Annotated[float, Field(ge=0)] | None = None
    jitter_s: Annotated[float, Field(ge=0)] | None = None
    loss: Annotated[float, Field(ge=0, le=1)] | None = None
    rate_bytes_per_s: Annotated[float, Field(gt=0)] | None = None

    def params(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if k not in ("state", "cut_existing") and v is not None}


class BackendChange(_Model):
    mode: BackendModeName
    status: Annotated[int, Field(ge=200, le=599)] | None = None
    latency_s: Annotated[float, Field(ge=0)] | None = None
    error_rate: Annotated[float, Field(ge=0, le=1)] | None = None
    capacity_per_s: Annotated[float, Field(gt=0)] | None = None
    deep_ok: bool | None = None  # what /health/deep says of the backend's dependency

    def params(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if k != "mode" and v is not None}


class Register(_Model):
    """New targets joining the target group (they start in `initial`)."""

    count: Annotated[int, Field(ge=1, le=1000)] = 1
    path: PathChange | None = None
    backend: BackendChange | None = None


class PolicyParam(_Model):
    policy: str
    param: str
    value: Any


class DnsProtectionsSpec(_Model):
    """The three DNS-plan protections (research/aws-facts.md 3); all off reproduces the 2025-10-20 race."""

    cas: bool = False
    keep_active: bool = False
    guard: bool = False
    min_fraction: Annotated[float, Field(ge=0, le=1)] = 0.5


class DnsSpec(_Model):
    planner_interval_s: Annotated[float, Field(gt=0)] = 5.0
    enactors: list[str] | None = None  # default: one per zone, as AWS runs one per AZ
    apply_time_s: Annotated[float, Field(ge=0)] = 0.5
    retry_s: Annotated[float, Field(gt=0)] = 1.0
    enactor_poll_s: Annotated[float, Field(gt=0)] = 1.0
    keep_generations: Annotated[int, Field(ge=0, le=1000)] = 3
    ttl_s: Annotated[int, Field(ge=0, le=86400)] = 5  # of the lease store's record; sim seconds
    protections: DnsProtectionsSpec = DnsProtectionsSpec()


class LeaseStoreSpec(_Model):
    capacity_per_s: Annotated[float, Field(gt=0)] = 200.0
    base_latency_s: Annotated[float, Field(ge=0)] = 0.005
    load_latency_factor: Annotated[float, Field(ge=0)] = 4.0


class HostManagerSpec(_Model):
    hosts: Annotated[int, Field(ge=1, le=5000)] = 60
    lease_ttl_s: Annotated[float, Field(gt=0)] = 300.0
    renew_interval_s: Annotated[float, Field(gt=0)] = 60.0
    ttl_spread: Annotated[float, Field(ge=0, lt=1)] = 0.5
    renew_concurrency: Annotated[int, Field(ge=1, le=1000)] = 16
    workers: Annotated[int, Field(ge=1, le=1000)] = 4
    item_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    base_service_s: Annotated[float, Field(ge=0)] = 1.0
    per_depth_s: Annotated[float, Field(ge=0)] = 0.5
    max_depth: Annotated[int, Field(ge=1)] | None = None
    throttle_per_s: Annotated[float, Field(gt=0)] | None = None
    retry_s: Annotated[float, Field(gt=0)] = 5.0
    slots_per_host: Annotated[int, Field(ge=1, le=1000)] = 4


class NetworkManagerSpec(_Model):
    rate_per_s: Annotated[float, Field(gt=0)] = 2.0
    max_depth: Annotated[int, Field(ge=1)] | None = None
    partial_s: Annotated[float, Field(ge=0)] = 0.0
    partial_loss: Annotated[float, Field(ge=0, le=1)] = 0.4


class InstancesSpec(_Model):
    launch_time_s: Annotated[float, Field(ge=0)] = 2.0
    launch_rate_per_s: Annotated[float, Field(gt=0)] | None = None
    autoscale_interval_s: Annotated[float, Field(gt=0)] = 5.0
    max_launch_per_tick: Annotated[int, Field(ge=0, le=1000)] = 5
    desired_per_zone: Annotated[int, Field(ge=0, le=500)] | None = None  # default: targets_per_zone


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


class ControlAction(_Model):
    """An operator or fault action on one control-plane component (see CONTROL_ACTIONS for what each takes)."""

    component: ComponentName
    action: str
    enactor: str | None = None
    delay_s: Annotated[float, Field(ge=0)] | None = None
    writes: Annotated[int, Field(ge=1)] | None = None
    count: Annotated[int, Field(ge=0, le=10000)] | None = None
    zone: str | None = None
    per_s: Annotated[float, Field(gt=0)] | None = None
    rate_per_s: Annotated[float, Field(gt=0)] | None = None
    capacity_per_s: Annotated[float, Field(gt=0)] | None = None
    max_depth: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _params_fit(self) -> ControlAction:
        actions = CONTROL_ACTIONS[self.component]
        if self.action not in actions:
            raise ValueError(f"action {self.action!r} of component {self.component!r} must be one of {sorted(actions)}")
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


class Event(_Model):
    """One timeline entry: at `at` sim seconds, do exactly one action to the selected targets."""

    at: Annotated[float, Field(ge=0)]
    zone: str | None = None
    targets: list[str] | None = None
    count: Annotated[int, Field(ge=1)] | None = None  # the first N targets of the selection
    path: PathChange | None = None
    backend: BackendChange | None = None
    register_: Register | None = Field(None, alias="register")  # `register` would shadow BaseModel's
    deregister: bool = False
    set_policy: PolicyParam | None = None
    control: ControlAction | None = None
    note: str = ""

    @model_validator(mode="after")
    def _one_action(self) -> Event:
        kinds = ("path", "backend", "register_", "set_policy", "control")
        actions = [n.rstrip("_") for n in kinds if getattr(self, n) is not None]
        if self.deregister:
            actions.append("deregister")
        if len(actions) != 1:
            raise ValueError(
                "each event needs exactly one action of: path, backend, register, deregister, set_policy, control "
                f"(got {', '.join(actions) or 'none'})"
            )
        if self.register_ is not None and self.zone is None:
            raise ValueError("a register event needs `zone`: the zone the new targets join")
        return self

    @property
    def action(self) -> str:
        for n in ("path", "backend", "register_", "set_policy"):
            if getattr(self, n) is not None:
                return n.rstrip("_")
        if self.control is not None:
            return f"{self.control.component}:{self.control.action}"
        return "deregister"


PolicyEntry = str | dict[str, Any]


class Scenario(_Model):
    name: str
    description: str = ""
    seed: int = 1
    speed: Annotated[float, Field(gt=0, le=1000)] = 10.0
    duration_s: Annotated[float, Field(gt=0, le=7 * 24 * 3600)] = 300.0
    zones: Annotated[list[str], Field(min_length=1, max_length=6)] = ["a", "b", "c"]
    targets_per_zone: Annotated[int, Field(ge=0, le=500)] = 3
    start_in_service: bool = True  # the fleet was healthy before the run began; False simulates a cold start
    # Requests per sim second each target serves before answering 503 (None: unlimited). With it, the capacity
    # left after a DNS failover can fail to carry the load, as applications saw on 2025-10-20.
    backend_capacity_per_s: Annotated[float, Field(gt=0)] | None = None
    health_check: HealthCheckSpec = HealthCheckSpec()
    checker: CheckerSpec = CheckerSpec()
    load_balancer: LoadBalancerSpec = LoadBalancerSpec()
    policy: list[PolicyEntry] = ["aws"]
    traffic: TrafficSpec = TrafficSpec()
    sample_interval_s: Annotated[float, Field(gt=0)] = 1.0
    record_interval_s: Annotated[float, Field(gt=0)] = 10.0  # how often the recorder scrapes /metrics
    control_plane: ControlPlaneSpec | None = None
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
    def _timeline_fits(self) -> Scenario:
        for i, ev in enumerate(self.timeline):
            if ev.at > self.duration_s:
                raise ValueError(f"timeline[{i}].at = {ev.at:g} is after duration_s = {self.duration_s:g}")
            if ev.zone is not None and ev.zone not in self.zones:
                raise ValueError(f"timeline[{i}].zone = {ev.zone!r} is not one of the zones {self.zones}")
            if ev.control is not None:
                self._check_control(i, ev.control)
        if self.control_plane is not None and self.control_plane.dns.enactors is not None:
            names = self.control_plane.dns.enactors
            if not names or len(set(names)) != len(names):
                raise ValueError("control_plane.dns.enactors must be a non-empty list of unique names")
        return self

    def enactor_names(self) -> list[str]:
        cp = self.control_plane
        return list(cp.dns.enactors) if cp is not None and cp.dns.enactors is not None else list(self.zones)

    def _check_control(self, i: int, c: ControlAction) -> None:
        where = f"timeline[{i}].control"
        if self.control_plane is None:
            raise ValueError(f"{where}: acts on the control plane, but the scenario has no `control_plane` section")
        if c.enactor is not None and c.enactor not in self.enactor_names():
            raise ValueError(f"{where}.enactor = {c.enactor!r} is not one of the enactors {self.enactor_names()}")
        if c.zone is not None and c.zone not in self.zones:
            raise ValueError(f"{where}.zone = {c.zone!r} is not one of the zones {self.zones}")


def builtin_names() -> list[str]:
    lib = resources.files("scenarios.library")
    return sorted(p.name.removesuffix(".yaml") for p in lib.iterdir() if p.name.endswith(".yaml"))


def _format_validation(source: str, err: ValidationError) -> str:
    lines = [f"{source}: invalid scenario"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] == "literal_error" and "expected" in e.get("ctx", {}):
            msg = f"must be one of {e['ctx']['expected']}"
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        got = e.get("input")
        # A whole mapping as "got" buries the message; the message names what is wrong in it instead.
        lines.append(f"  {loc}: {msg}" if isinstance(got, dict | list) else f"  {loc}: {msg} (got {got!r})")
    return "\n".join(lines)


def parse_scenario(data: Any, source: str) -> Scenario:
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}: a scenario must be a YAML mapping, got {type(data).__name__}")
    try:
        return Scenario.model_validate(data)
    except ValidationError as e:
        raise ScenarioError(_format_validation(source, e)) from None


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
            raise ScenarioError(f"--set {item!r}: the value is not valid YAML: {e}") from None
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


def load_scenario(name_or_path: str, overrides: list[str] | None = None) -> tuple[Scenario, str]:
    """Load a built-in scenario by name or a YAML file by path, with `--set` overrides applied; return it with
    the source it came from."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ScenarioError(f"{name_or_path}: no such scenario file")
        source = str(path)
        text = path.read_text()
    else:
        names = builtin_names()
        if name_or_path not in names:
            raise ScenarioError(
                f"{name_or_path!r} is neither a scenario file nor a built-in scenario (built-ins: {', '.join(names)})"
            )
        source = f"built-in:{name_or_path}"
        text = resources.files("scenarios.library").joinpath(f"{name_or_path}.yaml").read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ScenarioError(f"{source}: not valid YAML: {e}") from None
    if overrides:
        data = apply_overrides(data, overrides, source)
        source += " with --set " + " ".join(overrides)
    return parse_scenario(data, source), source
