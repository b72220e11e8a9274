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
    note: str = ""

    @model_validator(mode="after")
    def _one_action(self) -> Event:
        kinds = ("path", "backend", "register_", "set_policy")
        actions = [n.rstrip("_") for n in kinds if getattr(self, n) is not None]
        if self.deregister:
            actions.append("deregister")
        if len(actions) != 1:
            raise ValueError(
                "each event needs exactly one action of: path, backend, register, deregister, set_policy "
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
    health_check: HealthCheckSpec = HealthCheckSpec()
    checker: CheckerSpec = CheckerSpec()
    load_balancer: LoadBalancerSpec = LoadBalancerSpec()
    policy: list[PolicyEntry] = ["aws"]
    traffic: TrafficSpec = TrafficSpec()
    sample_interval_s: Annotated[float, Field(gt=0)] = 1.0
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
        return self


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
        lines.append(f"  {loc}: {msg} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_scenario(data: Any, source: str) -> Scenario:
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}: a scenario must be a YAML mapping, got {type(data).__name__}")
    try:
        return Scenario.model_validate(data)
    except ValidationError as e:
        raise ScenarioError(_format_validation(source, e)) from None


def load_scenario(name_or_path: str) -> tuple[Scenario, str]:
    """Load a built-in scenario by name or a YAML file by path; return it with the source it came from."""
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
    return parse_scenario(data, source), source
