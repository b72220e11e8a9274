"""The target registry: each target is a backend plus the net path in front of it, with its ground truth.

The net path's address is what the load balancer registers; the backend's own port stays private. A
target "could serve" per `netpath.could_serve`: that is the truth false and missed ejections are
measured against.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry

from backends._sockets import HOST
from backends.app import BackendFleet, BackendState
from backends.metrics import TargetsCollector
from backends.netpath import FLAP_CAN_SERVE_BELOW, NetPath, PathConfig, could_serve
from worlds.base import Clock


class UnknownTarget(LookupError):
    def __init__(self, target_id: str) -> None:
        super().__init__(f"unknown target {target_id!r}")
        self.target_id = target_id


@dataclass(frozen=True, slots=True)
class TargetInfo:
    """One target as it is now."""

    id: str
    zone: str
    host: str
    port: int  # the net path's port: the address the load balancer sees
    backend: BackendState
    path: PathConfig
    connections: dict[str, int]  # the path's accepted connections by outcome, plus `cut`
    can_serve: bool

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def to_json(self) -> dict[str, Any]:
        b = self.backend
        return {
            "id": self.id,
            "zone": self.zone,
            "address": self.address,
            "can_serve": self.can_serve,
            "backend": b.settings()
            | {"port": b.port, "requests": b.requests, "ok": b.ok, "errors": b.errors, "hung": b.hung},
            "path": {"state": self.path.state.value, **self.path.params(), "connections": self.connections},
        }


@dataclass(slots=True)
class _Target:
    zone: str
    path: NetPath


class Targets:
    """Targets by id, each a zone label, a backend and a net path.

    All times and rates are per sim-second, on `clock` (the run's). The targets' metrics
    (see `backends.metrics`) are registered in `registry`: the one given, or a fresh one, never the global.
    """

    def __init__(
        self,
        *,
        clock: Clock,
        seed: int = 0,
        host: str = HOST,
        registry: CollectorRegistry | None = None,
        capacity_per_s: float | None = None,
        flap_can_serve_below: float = FLAP_CAN_SERVE_BELOW,
    ) -> None:
        """`capacity_per_s`: every backend's /work capacity (requests per sim second), None for unlimited.
        `flap_can_serve_below`: the ground truth's loss threshold for a flapping path (see `could_serve`)."""
        self.registry = registry if registry is not None else CollectorRegistry()
        self.registry.register(TargetsCollector(self))
        self._fleet = BackendFleet(clock=clock, seed=seed, host=host, capacity_per_s=capacity_per_s)
        self._seed = seed
        self._clock = clock
        self._flap_can_serve_below = flap_can_serve_below
        self._host = host
        self._targets: dict[str, _Target] = {}
        # Counts of removed targets, so that counters summed per zone never go down.
        self._retired_requests: collections.Counter[tuple[str, str]] = collections.Counter()
        self._retired_connections: collections.Counter[tuple[str, str]] = collections.Counter()

    async def __aenter__(self) -> Targets:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def add(self, target_id: str, zone: str) -> tuple[str, int]:
        """Start a healthy backend and an open path in front of it; return the path's (host, port)."""
        if target_id in self._targets:
            raise ValueError(f"target {target_id!r} exists already")
        await self._fleet.start()
        backend_port = await self._fleet.add(target_id)
        seed = f"{self._seed}:{target_id}"
        path = NetPath(
            target_id, self._host, backend_port, seed, clock=self._clock, host=self._host
        )
        try:
            port = await path.start()
        except BaseException:
            await self._fleet.remove(target_id)
            raise
        self._targets[target_id] = _Target(zone, path)
        return self._host, port

    async def remove(self, target_id: str) -> None:
        path = self._get(target_id).path
        await path.stop()
        info = self.info(target_id)
        for outcome, n in _request_outcomes(info.backend).items():
            self._retired_requests[info.zone, outcome] += n
        for outcome, n in info.connections.items():
            self._retired_connections[info.zone, outcome] += n
        del self._targets[target_id]
        await self._fleet.remove(target_id)

    async def set_backend(self, target_id: str, mode: str, /, **params: object) -> None:
        """See `BackendFleet.set_mode`; UnknownTarget or ValueError change nothing."""
        self._get(target_id)
        await self._fleet.set_mode(target_id, mode, **params)

    async def set_path(
        self, target_id: str, state: str, /, *, cut_existing: bool = False, **params: object
    ) -> None:
        """See `NetPath.set_state`; UnknownTarget or ValueError change nothing."""
        await self._get(target_id).path.set_state(state, cut_existing=cut_existing, **params)

    def __contains__(self, target_id: object) -> bool:
        return target_id in self._targets

    def can_serve(self, target_id: str) -> bool:
        return self.info(target_id).can_serve

    def info(self, target_id: str) -> TargetInfo:
        t = self._get(target_id)
        backend = self._fleet.state(target_id)
        cfg = t.path.config
        truth = could_serve(backend.mode, cfg.state, cfg.loss, self._flap_can_serve_below)
        return TargetInfo(target_id, t.zone, t.path.host, t.path.port, backend, cfg, t.path.counts, truth)

    def snapshot(self) -> list[TargetInfo]:
        return [self.info(target_id) for target_id in self._targets]

    def totals(self) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], int]]:
        """Backend requests and path connections by (zone, outcome), since start, removed targets included."""
        requests = collections.Counter(self._retired_requests)
        connections = collections.Counter(self._retired_connections)
        for info in self.snapshot():
            for outcome, n in _request_outcomes(info.backend).items():
                requests[info.zone, outcome] += n
            for outcome, n in info.connections.items():
                connections[info.zone, outcome] += n
        return dict(requests), dict(connections)

    async def close(self) -> None:
        """Stop every path and backend and release every socket."""
        await asyncio.gather(*(target.path.stop() for target in self._targets.values()))
        self._targets.clear()
        await self._fleet.stop()

    def _get(self, target_id: str) -> _Target:
        try:
            return self._targets[target_id]
        except KeyError:
            raise UnknownTarget(target_id) from None


def _request_outcomes(b: BackendState) -> dict[str, int]:
    return {"ok": b.ok, "error": b.errors - b.overloaded, "overloaded": b.overloaded, "hung": b.hung}
