"""aiohttp backends: many backends in one process, one AppRunner, one site per port, state looked up by port.

Each backend is a listening socket on 127.0.0.1; every request finds its backend by the local port it
arrived on. Routes: `GET /health` (shallow), `GET /health/deep` (also checks the backend's dependency: 503
while `deep_ok` is false, a setting kept across modes) and `GET /work?bytes=N`. Modes:

- `healthy`: /health answers 200 "ok"; /work answers N bytes after `work_latency_s`, or 500 with
  probability `error_rate` (seeded per backend).
- Every answering mode has a finite `capacity_per_s` for /work (default: none): beyond it (a token bucket
  one second deep) /work answers 503 "overloaded" at once. This is how the capacity left after a DNS failover
  fails to carry the load; /health is not limited, as a load balancer's checks are cheap and prioritised.
- `unhealthy`: both routes answer `status` (default 503).
- `slow`: as healthy, with `latency_s` added to both routes.
- `hang`: requests are read and never answered; the handler ends when the client goes away, the backend
  leaves `hang` for `crash`, is removed, or the fleet stops.
- `crash`: the port stops listening (connections refused, existing ones dropped) but stays reserved;
  any other mode listens on the same port again.

Times are sim-seconds, read and slept through the fleet's clock (its world's).
"""

from __future__ import annotations

import asyncio
import random
import socket
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Literal

from aiohttp import web
from pydantic import Field, model_validator

from backends import _sockets
from backends._sockets import BACKLOG, HOST
from simconfig import ConfigModel, Flag, Fraction, PerSecond, Seconds, Whole, check_takes, validated
from worlds.base import Clock

MAX_WORK_BYTES = 64 * 1024 * 1024
_WORK_CHUNK = b"x" * 65536


class BackendMode(StrEnum):
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    SLOW = "slow"
    HANG = "hang"
    CRASH = "crash"


@dataclass(frozen=True, slots=True)
class BackendState:
    """A snapshot of one backend: its mode and settings, and what it has answered so far."""

    id: str
    port: int
    mode: BackendMode
    status: int  # what `unhealthy` answers
    latency_s: float  # what `slow` adds to every request
    work_latency_s: float  # what /work takes in every answering mode but `unhealthy`
    error_rate: float  # share of /work answered 500
    capacity_per_s: float | None  # /work requests per sim second before 503; None = unlimited
    deep_ok: bool  # what /health/deep reports of the backend's dependency
    requests: int  # every request that reached a handler
    ok: int  # answered 2xx
    errors: int  # answered 5xx (or the `unhealthy` status)
    hung: int  # held by `hang` (or caught by `crash`)
    overloaded: int = 0  # answered 503 for want of capacity (also counted in `errors`)

    def settings(self) -> dict[str, object]:
        """The mode and the parameters that apply to it, as an API shows them."""
        out: dict[str, object] = {"mode": self.mode.value}
        if self.mode is BackendMode.UNHEALTHY:
            out["status"] = self.status
        if self.mode is BackendMode.SLOW:
            out["latency_s"] = self.latency_s
        return out | {"work_latency_s": self.work_latency_s, "error_rate": self.error_rate,
                      "capacity_per_s": self.capacity_per_s, "deep_ok": self.deep_ok}


BackendModeName = Literal["healthy", "unhealthy", "slow", "hang", "crash"]
# Parameters every mode takes, and the ones only some modes take; the others are backend settings kept across modes.
_SETTINGS = frozenset({"work_latency_s", "error_rate", "capacity_per_s", "deep_ok"})
_MODE_ONLY = {"unhealthy": frozenset({"status"}), "slow": frozenset({"latency_s"})}


class ModeChange(ConfigModel):
    """A switch of a backend's mode with its parameters (see the module docstring). A mode parameter left out
    resets (`status` to 503); a setting left out, or null, is kept, except `capacity_per_s: null`: unlimited."""

    mode: BackendModeName
    status: Annotated[Whole, Field(ge=200, le=599)] | None = None  # unhealthy
    latency_s: Annotated[Seconds, Field(ge=0)] | None = None  # slow, which needs it
    work_latency_s: Annotated[Seconds, Field(ge=0)] | None = None
    error_rate: Annotated[Fraction, Field(ge=0, le=1)] | None = None
    capacity_per_s: Annotated[PerSecond, Field(gt=0)] | None = None
    deep_ok: Flag | None = None  # what /health/deep says of the backend's dependency

    def params(self) -> dict[str, object]:
        """The parameters given, by name (null counts as given only for capacity_per_s)."""
        return {k: getattr(self, k) for k in type(self).model_fields
                if k in self.model_fields_set - {"mode"} and (getattr(self, k) is not None or k == "capacity_per_s")}

    @model_validator(mode="after")
    def _fits_mode(self) -> ModeChange:
        required = {"latency_s"} if self.mode == "slow" else set()
        check_takes(f"mode {self.mode}", self.params(), required, _SETTINGS | _MODE_ONLY.get(self.mode, frozenset()))
        return self


def parse_mode(mode: str) -> BackendMode:
    try:
        return BackendMode(mode)
    except ValueError:
        allowed = ", ".join(m.value for m in BackendMode)
        raise ValueError(f"unknown backend mode {mode!r} (one of {allowed})") from None


class _Backend:
    def __init__(
        self, backend_id: str, sock: socket.socket, rng: random.Random, capacity_per_s: float | None
    ) -> None:
        self.id = backend_id
        self.capacity_per_s = capacity_per_s
        self.deep_ok = True
        self.tokens = capacity_per_s or 0.0
        self.tokens_at = float("-inf")
        self.port: int = sock.getsockname()[1]
        self.mode = BackendMode.HEALTHY
        self.status = 503
        self.latency_s = 0.0
        self.work_latency_s = 0.0
        self.error_rate = 0.0
        self.rng = rng
        self.site: web.SockSite | None = None
        # Bound but not listening: keeps the port while crashed, and is what the next site listens on.
        self.reserved: socket.socket | None = sock
        self.requests = self.ok = self.errors = self.hung = self.overloaded = 0

    def state(self) -> BackendState:
        return BackendState(
            self.id,
            self.port,
            self.mode,
            self.status,
            self.latency_s,
            self.work_latency_s,
            self.error_rate,
            self.capacity_per_s,
            self.deep_ok,
            self.requests,
            self.ok,
            self.errors,
            self.hung,
            self.overloaded,
        )


class BackendFleet:
    """Many backends served by one aiohttp AppRunner, one `SockSite` (a TCP site on our own socket) each.

    A site on a socket we bound ourselves, rather than a TCPSite, is what lets a crashed backend keep its
    port reserved and listen on exactly that port again.
    """

    def __init__(
        self, *, clock: Clock, seed: int | str = 0, host: str = HOST, capacity_per_s: float | None = None
    ) -> None:
        self.clock = clock
        # The capacity of every backend until a mode change sets its own: checked by the same rule.
        self._capacity_per_s = validated(ModeChange, {"mode": "healthy", "capacity_per_s": capacity_per_s}
                                         ).capacity_per_s
        self._seed = seed
        self._host = host
        self._backends: dict[str, _Backend] = {}
        self._by_port: dict[int, _Backend] = {}
        self._runner: web.AppRunner | None = None
        # Listener changes await; concurrent ones (crash, then heal at once) must not interleave.
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        if self._runner is not None:
            return
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/health/deep", self._deep_health)
        app.router.add_get("/work", self._work)
        # handler_cancellation: a request the client gave up on (a hung or slow one) must not outlive
        # its connection. A short shutdown timeout: stop() has already dropped every connection.
        runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
        await runner.setup()
        self._runner = runner

    async def add(self, backend_id: str) -> int:
        """Start a healthy backend on an ephemeral port of 127.0.0.1 and return the port."""
        if self._runner is None:
            raise RuntimeError("start() the fleet first")
        if backend_id in self._backends:
            raise ValueError(f"backend {backend_id!r} exists already")
        sock = _sockets.bind(self._host, 0)
        b = _Backend(backend_id, sock, random.Random(f"{self._seed}:{backend_id}"), self._capacity_per_s)
        self._backends[backend_id] = b
        self._by_port[b.port] = b
        async with self._lock:
            await self._listen(b)
        return b.port

    async def remove(self, backend_id: str) -> None:
        b = self._get(backend_id)
        del self._backends[backend_id], self._by_port[b.port]
        async with self._lock:
            await self._silence(b)
            if b.reserved is not None:
                b.reserved.close()
                b.reserved = None

    async def stop(self) -> None:
        """Close every listener and connection and release every port."""
        for backend_id in list(self._backends):
            await self.remove(backend_id)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def state(self, backend_id: str) -> BackendState:
        return self._get(backend_id).state()

    async def set_mode(self, backend_id: str, mode: BackendMode | str, /, **params: object) -> None:
        """Switch a backend's mode. Mode parameters (`status` for unhealthy, `latency_s` for slow, required)
        reset when not given; `work_latency_s` and `error_rate` are backend settings kept until changed.
        Raises ValueError (and changes nothing) on an unknown mode or a bad parameter."""
        b = self._get(backend_id)
        new = parse_mode(mode)
        change = validated(ModeChange, {**params, "mode": new.value})
        status = 503 if change.status is None else change.status
        latency_s = change.latency_s or 0.0
        work_latency_s = b.work_latency_s if change.work_latency_s is None else change.work_latency_s
        error_rate = b.error_rate if change.error_rate is None else change.error_rate
        deep_ok = b.deep_ok if change.deep_ok is None else change.deep_ok
        capacity_per_s = change.capacity_per_s if "capacity_per_s" in change.model_fields_set else b.capacity_per_s

        async with self._lock:
            old = b.mode
            b.mode, b.status, b.latency_s = new, status, latency_s
            b.work_latency_s, b.error_rate, b.deep_ok = work_latency_s, error_rate, deep_ok
            if capacity_per_s != b.capacity_per_s:
                b.capacity_per_s, b.tokens, b.tokens_at = capacity_per_s, capacity_per_s or 0.0, float("-inf")
            if new is BackendMode.CRASH and old is not BackendMode.CRASH:
                await self._silence(b)
            elif old is BackendMode.CRASH and new is not BackendMode.CRASH:
                await self._listen(b)

    def _get(self, backend_id: str) -> _Backend:
        try:
            return self._backends[backend_id]
        except KeyError:
            raise KeyError(f"unknown backend {backend_id!r}") from None

    async def _listen(self, b: _Backend) -> None:
        assert self._runner is not None and b.reserved is not None
        site = web.SockSite(self._runner, b.reserved, backlog=BACKLOG)
        await site.start()
        b.site, b.reserved = site, None

    async def _silence(self, b: _Backend) -> None:
        """Stop listening but keep the port bound, and drop the backend's connections."""
        if b.site is not None:
            await b.site.stop()  # closes the listening socket
            b.site = None
            b.reserved = _sockets.bind(self._host, b.port)
        assert self._runner is not None and self._runner.server is not None
        for handler in self._runner.server.connections:
            transport = handler.transport
            if transport is not None and _sockets.local_port(transport) == b.port:
                # Aborting cancels the handler too (handler_cancellation), which is what ends a hung one.
                transport.abort()

    def _backend_for(self, request: web.Request) -> _Backend:
        b = self._by_port.get(_sockets.local_port(request.transport) or -1)
        if b is None:  # removed while the request was on its way in
            raise web.HTTPServiceUnavailable()
        b.requests += 1
        return b

    async def _hold(self, b: _Backend, request: web.Request) -> web.StreamResponse:
        b.hung += 1
        if b.mode is BackendMode.CRASH and request.transport is not None:
            request.transport.abort()  # a request that raced the crash: the process is gone
        # Never answer. Cancellation ends this: the client closing, `crash`, `remove` or `stop`.
        await asyncio.get_running_loop().create_future()
        raise AssertionError("unreachable")

    def _admit(self, b: _Backend) -> bool:
        """Take one token of the backend's /work capacity (sim time), if it has a capacity at all."""
        rate = b.capacity_per_s
        if rate is None:
            return True
        now = self.clock.now()
        burst = max(1.0, rate)
        b.tokens = burst if b.tokens_at == float("-inf") else min(burst, b.tokens + (now - b.tokens_at) * rate)
        b.tokens_at = now
        if b.tokens < 1.0:
            return False
        b.tokens -= 1.0
        return True

    async def _answer_delay(self, b: _Backend, extra_s: float) -> None:
        delay_s = extra_s + (b.latency_s if b.mode is BackendMode.SLOW else 0.0)
        if delay_s > 0:
            await self.clock.sleep(delay_s)

    async def _health(self, request: web.Request) -> web.StreamResponse:
        b = self._backend_for(request)
        if b.mode in (BackendMode.HANG, BackendMode.CRASH):
            return await self._hold(b, request)
        if b.mode is BackendMode.UNHEALTHY:
            b.errors += 1
            return web.Response(status=b.status, text="unhealthy")
        await self._answer_delay(b, 0.0)
        b.ok += 1
        return web.Response(text="ok")

    async def _deep_health(self, request: web.Request) -> web.StreamResponse:
        """As /health, and the dependency too: a deep check fails when what the backend depends on does."""
        b = self._backend_for(request)
        if b.mode in (BackendMode.HANG, BackendMode.CRASH):
            return await self._hold(b, request)
        if b.mode is BackendMode.UNHEALTHY or not b.deep_ok:
            b.errors += 1
            return web.Response(status=b.status if b.mode is BackendMode.UNHEALTHY else 503,
                                text="dependency down" if not b.deep_ok else "unhealthy")
        await self._answer_delay(b, 0.0)
        b.ok += 1
        return web.Response(text="ok")

    async def _work(self, request: web.Request) -> web.StreamResponse:
        b = self._backend_for(request)
        try:
            n = int(request.query.get("bytes", "0"))
        except ValueError:
            n = -1
        if not 0 <= n <= MAX_WORK_BYTES:
            raise web.HTTPBadRequest(text=f"bytes must be an integer in [0, {MAX_WORK_BYTES}]")
        if b.mode in (BackendMode.HANG, BackendMode.CRASH):
            return await self._hold(b, request)
        if b.mode is BackendMode.UNHEALTHY:
            b.errors += 1
            return web.Response(status=b.status, text="unhealthy")
        if not self._admit(b):
            b.errors += 1
            b.overloaded += 1
            return web.Response(status=503, text="overloaded")
        await self._answer_delay(b, b.work_latency_s)
        if b.rng.random() < b.error_rate:
            b.errors += 1
            return web.Response(status=500, text="injected error")
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = n
        try:
            await resp.prepare(request)
            for offset in range(0, n, len(_WORK_CHUNK)):
                await resp.write(_WORK_CHUNK[: n - offset])
            await resp.write_eof()
        except ConnectionResetError:
            # The client (or a network path cut) went away mid-answer: normal in a fault scenario, not an error.
            b.errors += 1
            return resp
        b.ok += 1
        return resp
