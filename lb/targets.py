"""The vocabulary every part of the load balancer shares: targets as addresses, their states, probe outcomes."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class TargetState(StrEnum):
    """AWS ELB target health states (archived NLB user guide; see docs/sources.md#nlb-health)."""

    INITIAL = "initial"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    DRAINING = "draining"
    UNUSED = "unused"


class ProbeOutcome(StrEnum):
    """How one probe ended. Only SUCCESS counts towards health; the rest say why it failed."""

    SUCCESS = "success"
    FAILURE = "failure"  # the target answered, with a status outside the success codes
    TIMEOUT = "timeout"  # no verdict within the probe timeout (including probes started too late)
    REFUSED = "refused"  # connection refused
    RESET = "reset"  # connection reset or closed before a complete status line
    MALFORMED = "malformed"  # bytes arrived but were not an HTTP/1.x status line


@dataclass(frozen=True, slots=True)
class Target:
    """A registered target: an id, the zone it lives in and the address the load balancer reaches it at."""

    id: str
    zone: str
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"
