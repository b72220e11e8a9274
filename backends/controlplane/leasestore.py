"""The lease store (the DynamoDB of the AWS story): a pure lease table with admission and latency models, served
as a JSON API over aiohttp on loopback.

In the outage (docs/sources.md#aws-summary) the host manager's leases lived in DynamoDB: while it
was unreachable renewals failed and leases expired one by one; when it came back, the whole fleet re-acquiring
at once made every attempt slow enough to time out. Rules of this model:
1. A lease is (value, version, expires_at). It is live while `now < expires_at`: at exactly `expires_at` it has
   expired. Expiry is lazy (every operation compares with `now`); `sweep(now)` drops expired entries.
2. Every successful put or renew gives the lease a new version: one more than the last version the key ever
   had, even across expiry and deletion, so a version never repeats and works as a fencing token.
3. Conditional writes: `expected_version` None = unconditional; 0 = the key must have no live lease; n = the
   live lease's version must be n. A failed condition is a CONFLICT and changes nothing.
4. An expired lease cannot be renewed (NOT_FOUND): it must be put again. Renew and delete check existence
   before the condition, so a missing key is NOT_FOUND whatever the expected version.
5. Admission: a token bucket (`capacity_per_s`, `burst`) and a cap on requests in flight. A request beyond
   either is answered 429 at once with Retry-After: the store never queues without bound.
6. Service latency = `base_latency_s * (1 + load_latency_factor * utilisation)`, utilisation = requests admitted
   in the trailing `window_s` (1 s of sim time, this one included) / (capacity_per_s * window_s). It is fixed at
   admission and slept with `clock.sleep`, then the operation is applied at the END of it (a write commits when
   its service time is over, so conflicts are judged then, and a client that gave up meanwhile does not stop
   it: wasted work, as in the congestive collapse).
7. Malformed requests are answered 400 before admission: they cost no token and change nothing.
The table, bucket and latency model are pure (the caller passes `now`); `LeaseStoreServer` is the shell.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import Field

from backends._sockets import BACKLOG, HOST
from simconfig import ConfigModel, Number, Rate, Seconds, validated
from worlds.base import Clock

# Keys travel in URL paths: a plain charset needs no quoting on either side.
KEY_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,200}")
OPS = ("put", "renew", "get", "delete")
OUTCOMES = ("ok", "conflict", "not_found", "throttled", "bad_request", "unavailable")
# Sim seconds; from well under the default base latency to well past any sensible client timeout.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check(**values: object) -> None:
    """The settings' rules (LeaseStoreSettings) for values handed to the core or an operator knob directly;
    ValueError names the field."""
    validated(LeaseStoreSettings, values)


def _expected(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected_version must be null or an integer >= 0, got {value!r}")
    return value




class LeaseStoreSettings(ConfigModel):
    """The lease store's service model (a scenario's `control_plane.lease_store`); keyword arguments of
    `LeaseStoreServer`."""

    capacity_per_s: Rate = 200.0
    base_latency_s: Annotated[Seconds, Field(ge=0)] = 0.005
    load_latency_factor: Annotated[Number, Field(ge=0)] = 4.0


# -- pure core


@dataclass(frozen=True, slots=True)
class Lease:
    value: str
    version: int
    expires_at: float

    def live(self, now: float) -> bool:
        return now < self.expires_at


class LeaseOutcome(StrEnum):
    OK = "ok"
    CONFLICT = "conflict"
    NOT_FOUND = "not_found"


@dataclass(frozen=True, slots=True)
class TableResult:
    """What a table operation did. `lease`: the new lease (put, renew), the removed one (delete), the live one
    a condition was checked against (conflict; None if the key had none), None for not_found."""

    outcome: LeaseOutcome
    lease: Lease | None = None

    @property
    def ok(self) -> bool:
        return self.outcome == LeaseOutcome.OK


class LeaseTable:
    """Leases by key, with conditional writes on version and lazy expiry (rules 1-4)."""

    def __init__(self) -> None:
        self._leases: dict[str, Lease] = {}
        # Last version each key ever had; outlives the lease so versions never repeat (rule 2). Bounded by the
        # number of distinct keys, which is the fleet size.
        self._versions: dict[str, int] = {}

    def get(self, key: str, now: float) -> Lease | None:
        lease = self._leases.get(key)
        return lease if lease is not None and lease.live(now) else None

    def put(self, key: str, value: str, ttl_s: float, now: float, expected_version: int | None = None) -> TableResult:
        ttl_s = _positive("ttl_s", ttl_s)
        expected_version = _expected(expected_version)
        current = self.get(key, now)
        if expected_version is not None and (current.version if current else 0) != expected_version:
            return TableResult(LeaseOutcome.CONFLICT, current)
        return TableResult(LeaseOutcome.OK, self._write(key, value, now + ttl_s))

    def renew(self, key: str, ttl_s: float, now: float, expected_version: int | None = None) -> TableResult:
        ttl_s = _positive("ttl_s", ttl_s)
        expected_version = _expected(expected_version)
        current = self.get(key, now)
        if current is None:
            return TableResult(LeaseOutcome.NOT_FOUND)
        if expected_version is not None and current.version != expected_version:
            return TableResult(LeaseOutcome.CONFLICT, current)
        return TableResult(LeaseOutcome.OK, self._write(key, current.value, now + ttl_s))

    def delete(self, key: str, now: float, expected_version: int | None = None) -> TableResult:
        expected_version = _expected(expected_version)
        current = self.get(key, now)
        if current is None:
            return TableResult(LeaseOutcome.NOT_FOUND)
        if expected_version is not None and current.version != expected_version:
            return TableResult(LeaseOutcome.CONFLICT, current)
        del self._leases[key]
        return TableResult(LeaseOutcome.OK, current)

    def sweep(self, now: float) -> int:
        """Drop expired leases; return how many."""
        expired = [k for k, lease in self._leases.items() if not lease.live(now)]
        for k in expired:
            del self._leases[k]
        return len(expired)

    def count(self, now: float) -> int:
        """Live leases (expired ones not yet swept are not counted)."""
        return sum(lease.live(now) for lease in self._leases.values())

    def version(self, key: str) -> int:
        """The last version `key` ever had (0: never written), live or not."""
        return self._versions.get(key, 0)

    def _write(self, key: str, value: str, expires_at: float) -> Lease:
        version = self._versions.get(key, 0) + 1
        self._versions[key] = version
        lease = self._leases[key] = Lease(value, version, expires_at)
        return lease


class TokenBucket:
    """`rate_per_s` tokens a second up to `burst`; it starts full at the first call's `now`."""

    def __init__(self, rate_per_s: float, burst: float) -> None:
        _check(capacity_per_s=rate_per_s)
        self.rate_per_s = float(rate_per_s)
        self.burst = self._check_burst(burst)
        self._tokens = self.burst
        self._last: float | None = None

    @staticmethod
    def _check_burst(burst: float) -> float:
        burst = _positive("burst", burst)
        if burst < 1:
            raise ValueError(f"burst must be >= 1 (a smaller bucket never holds a whole token), got {burst}")
        return burst

    def _refill(self, now: float) -> None:
        if self._last is not None and now > self._last:  # a clock read out of order adds nothing
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate_per_s)
        if self._last is None or now > self._last:
            self._last = now

    def tokens(self, now: float) -> float:
        self._refill(now)
        return self._tokens

    def take(self, now: float) -> bool:
        """Take one token if there is one."""
        self._refill(now)
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    def retry_after(self, now: float) -> float:
        """Sim seconds until a token is available (0 if one is now)."""
        self._refill(now)
        return max(0.0, (1 - self._tokens) / self.rate_per_s)

    def set_rate(self, rate_per_s: float, now: float, burst: float | None = None) -> None:
        """New rate (and burst); tokens earned so far at the old rate are kept, up to the new burst."""
        _check(capacity_per_s=rate_per_s)
        new_burst = self.burst if burst is None else self._check_burst(burst)
        self._refill(now)
        self.rate_per_s, self.burst = rate_per_s, new_burst
        self._tokens = min(self._tokens, new_burst)


def service_latency(base_latency_s: float, load_factor: float, utilisation: float) -> float:
    """Rule 6: grows linearly, so monotone, with utilisation; `base_latency_s` when idle."""
    return base_latency_s * (1 + load_factor * max(0.0, utilisation))


class LatencyModel:
    """Rule 6: remembers admissions in the trailing window and prices the next request from them."""

    def __init__(self, base_latency_s: float, load_factor: float, window_s: float = 1.0) -> None:
        _check(base_latency_s=base_latency_s, load_latency_factor=load_factor)
        self.base_latency_s, self.load_factor = float(base_latency_s), float(load_factor)
        self.window_s = _positive("window_s", window_s)
        # Admission times; bounded by what the bucket admits in a window (burst + rate x window).
        self._admitted: collections.deque[float] = collections.deque()

    def _prune(self, now: float) -> None:
        while self._admitted and self._admitted[0] <= now - self.window_s:
            self._admitted.popleft()

    def utilisation(self, now: float, capacity_per_s: float) -> float:
        self._prune(now)
        return len(self._admitted) / (capacity_per_s * self.window_s)

    def latency(self, now: float, capacity_per_s: float) -> float:
        """What a request admitted now would take, without admitting it."""
        self._prune(now)
        return service_latency(
            self.base_latency_s, self.load_factor, (len(self._admitted) + 1) / (capacity_per_s * self.window_s)
        )

    def admit(self, now: float, capacity_per_s: float) -> float:
        """Record an admission at `now` and return its service latency (this request counts towards its load)."""
        self._prune(now)
        self._admitted.append(now)
        return service_latency(self.base_latency_s, self.load_factor, self.utilisation(now, capacity_per_s))


class _Histogram:
    """Cumulative-ready bucket counts of observed latencies, read by the collector."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip([*map(str, self.bounds), "+Inf"], self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


# -- asyncio shell


class _BadRequest(ValueError):
    pass


class LeaseStoreServer:
    """The lease table behind a JSON API on host:port (0 = ephemeral), with throttling and modelled latency.

    - `PUT /leases/{key}` `{"value": str, "ttl_s": float, "expected_version": int|null}` -> 200 lease / 409
    - `POST /leases/{key}/renew` `{"ttl_s": float, "expected_version"?: int|null}` -> 200 / 404 / 409
    - `GET /leases/{key}` -> 200 / 404; `DELETE /leases/{key}[?expected_version=n]` -> 204 / 404 / 409
    - `GET /healthz` -> 200 `{"ok": true}`
    A lease is `{"key", "value", "version", "expires_in_s"}` (sim seconds). Errors are `{"error": ...}`, a 409
    adds the live `version` (null if none). 429 (throttled) has Retry-After in whole sim seconds (at least 1)
    and `retry_after_s` in the body; during an `outage(True)` every request, /healthz included, gets 503.
    `burst` None = one second of capacity; `max_in_flight` None = 2 x capacity; both follow `set_capacity`
    unless given.
    """

    def __init__(
        self,
        clock: Clock,
        registry: CollectorRegistry,
        capacity_per_s: float = 200.0,
        burst: float | None = None,
        base_latency_s: float = 0.005,
        load_latency_factor: float = 4.0,
        host: str = HOST,
        port: int = 0,
        *,
        max_in_flight: int | None = None,
        window_s: float = 1.0,
        sweep_interval_s: float = 1.0,
    ) -> None:
        _check(capacity_per_s=capacity_per_s)
        if max_in_flight is not None and (isinstance(max_in_flight, bool) or max_in_flight < 1):
            raise ValueError(f"max_in_flight must be an integer >= 1, got {max_in_flight!r}")
        self.clock = clock
        self.host = host
        self._port = port
        self.table = LeaseTable()
        self._burst_given = burst
        self._max_in_flight_given = max_in_flight
        self.bucket = TokenBucket(capacity_per_s, self._burst_for(capacity_per_s))
        self.latency = LatencyModel(base_latency_s, load_latency_factor, window_s)
        self._sweep_interval_s = _positive("sweep_interval_s", sweep_interval_s)
        self._last_sweep = -math.inf
        self.in_flight = 0
        self.peak_in_flight = 0
        self.requests: collections.Counter[tuple[str, str]] = collections.Counter()
        self.latencies = _Histogram(LATENCY_BUCKETS)
        self._outage = False
        self._closing = False
        # The service-time sleeps of admitted requests: close() cancels and awaits them, so it never waits out
        # a long modelled latency and no sleep outlives the server.
        self._sleeps: set[asyncio.Task[None]] = set()
        self._runner: web.AppRunner | None = None
        registry.register(_LeaseStoreCollector(self))

    # -- operator knobs

    @property
    def capacity_per_s(self) -> float:
        return self.bucket.rate_per_s

    @property
    def max_in_flight(self) -> int:
        given = self._max_in_flight_given
        return given if given is not None else max(1, math.ceil(2 * self.capacity_per_s))

    def set_capacity(self, rate_per_s: float) -> None:
        _check(capacity_per_s=rate_per_s)
        self.bucket.set_rate(rate_per_s, self.clock.now(), self._burst_for(rate_per_s))

    def outage(self, on: bool) -> None:
        """While on, every request is answered 503 (the store is down but its port still answers)."""
        self._outage = on

    @property
    def in_outage(self) -> bool:
        return self._outage

    def _is_closing(self) -> bool:
        return self._closing

    def _burst_for(self, rate_per_s: float) -> float:
        return self._burst_given if self._burst_given is not None else max(1.0, rate_per_s)

    # -- lifecycle

    @property
    def port(self) -> int:
        if self._runner is None:
            raise RuntimeError("lease store is not started")
        return self._port

    async def start(self) -> None:
        if self._runner is not None:
            return
        self._closing = False
        app = web.Application()
        app.router.add_put("/leases/{key}", self._put)
        app.router.add_post("/leases/{key}/renew", self._renew)
        app.router.add_get("/leases/{key}", self._get)
        app.router.add_delete("/leases/{key}", self._delete)
        app.router.add_get("/healthz", self._healthz)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self._port, backlog=BACKLOG)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])

    async def close(self) -> None:
        if self._runner is None:
            return
        runner, self._runner = self._runner, None
        # Requests in their service time are answered 503 at once, then aiohttp's graceful shutdown finds
        # every handler finished.
        self._closing = True
        sleeps = list(self._sleeps)
        for task in sleeps:
            task.cancel()
        await asyncio.gather(*sleeps, return_exceptions=True)
        await runner.cleanup()

    async def __aenter__(self) -> LeaseStoreServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- handlers

    async def _healthz(self, request: web.Request) -> web.Response:
        if self._outage or self._closing:
            return _error(503, "lease store unavailable")
        return web.json_response({"ok": True})

    async def _put(self, request: web.Request) -> web.Response:
        return await self._serve("put", request)

    async def _renew(self, request: web.Request) -> web.Response:
        return await self._serve("renew", request)

    async def _get(self, request: web.Request) -> web.Response:
        return await self._serve("get", request)

    async def _delete(self, request: web.Request) -> web.Response:
        return await self._serve("delete", request)

    async def _serve(self, op: str, request: web.Request) -> web.Response:
        if self._outage or self._closing:
            return self._count(op, "unavailable", _error(503, "lease store unavailable"))
        try:
            key = request.match_info["key"]
            if not KEY_PATTERN.fullmatch(key):
                raise _BadRequest(f"key must match {KEY_PATTERN.pattern}, got {key!r}")
            args = await _parse(op, request)
        except _BadRequest as e:
            return self._count(op, "bad_request", _error(400, str(e)))
        now = self.clock.now()
        if self.in_flight >= self.max_in_flight or not self.bucket.take(now):
            return self._count(op, "throttled", self._throttled(now))
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            latency = self.latency.admit(now, self.capacity_per_s)
            self.latencies.observe(latency)
            sleep = asyncio.ensure_future(self.clock.sleep(latency))
            self._sleeps.add(sleep)
            try:
                await sleep
            except asyncio.CancelledError:
                # Re-read through a method: mypy would keep the narrowing from before the await.
                if not (self._is_closing() and sleep.cancelled() and not _cancelling()):
                    raise
                return self._count(op, "unavailable", _error(503, "lease store shutting down"))
            finally:
                self._sleeps.discard(sleep)
            return self._apply(op, key, args, self.clock.now())
        finally:
            self.in_flight -= 1

    def _apply(self, op: str, key: str, args: dict[str, Any], now: float) -> web.Response:
        if now - self._last_sweep >= self._sweep_interval_s:
            self.table.sweep(now)
            self._last_sweep = now
        if op == "get":
            lease = self.table.get(key, now)
            if lease is None:
                return self._count(op, "not_found", _error(404, f"no live lease for {key!r}"))
            return self._count(op, "ok", _lease_json(key, lease, now))
        if op == "put":
            result = self.table.put(key, args["value"], args["ttl_s"], now, args["expected_version"])
        elif op == "renew":
            result = self.table.renew(key, args["ttl_s"], now, args["expected_version"])
        else:
            result = self.table.delete(key, now, args["expected_version"])
        if result.outcome == LeaseOutcome.NOT_FOUND:
            return self._count(op, "not_found", _error(404, f"no live lease for {key!r}"))
        if result.outcome == LeaseOutcome.CONFLICT:
            current = None if result.lease is None else result.lease.version
            body = {"error": f"version conflict on {key!r}", "version": current}
            return self._count(op, "conflict", web.json_response(body, status=409))
        assert result.lease is not None
        if op == "delete":
            return self._count(op, "ok", web.Response(status=204))
        return self._count(op, "ok", _lease_json(key, result.lease, now))

    def _throttled(self, now: float) -> web.Response:
        wait = self.bucket.retry_after(now) or self.latency.latency(now, self.capacity_per_s)
        return web.json_response(
            {"error": "throttled: beyond the lease store's capacity", "retry_after_s": wait},
            status=429,
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )

    def _count(self, op: str, outcome: str, response: web.Response) -> web.Response:
        self.requests[op, outcome] += 1
        return response


def _cancelling() -> bool:
    """Whether this task itself is being cancelled (not just a task it awaited)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _lease_json(key: str, lease: Lease, now: float) -> web.Response:
    return web.json_response(
        {"key": key, "value": lease.value, "version": lease.version, "expires_in_s": lease.expires_at - now}
    )


async def _parse(op: str, request: web.Request) -> dict[str, Any]:
    """The checked arguments of `op`; raises _BadRequest naming the first problem."""
    if op == "get":
        return {}
    if op == "delete":
        raw = request.query.get("expected_version")
        try:
            return {"expected_version": None if raw is None else _expected(int(raw))}
        except ValueError:
            raise _BadRequest(f"expected_version must be an integer >= 0, got {raw!r}") from None
    try:
        body = json.loads(await request.text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _BadRequest(f"body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise _BadRequest("body must be a JSON object")
    allowed = {"value", "ttl_s", "expected_version"} if op == "put" else {"ttl_s", "expected_version"}
    if unknown := sorted(set(body) - allowed):
        raise _BadRequest(f"unknown fields {unknown}; allowed: {sorted(allowed)}")
    args: dict[str, Any] = {}
    try:
        if op == "put":
            if not isinstance(body.get("value"), str):
                raise ValueError(f"value must be a string, got {body.get('value')!r}")
            args["value"] = body["value"]
        if "ttl_s" not in body:
            raise ValueError("ttl_s is required")
        args["ttl_s"] = _positive("ttl_s", body["ttl_s"])
        args["expected_version"] = _expected(body.get("expected_version"))
    except ValueError as e:
        raise _BadRequest(str(e)) from None
    return args


class _LeaseStoreCollector(Collector):
    """Reads the server's state when scraped, so the request path never touches a metric object."""

    def __init__(self, server: LeaseStoreServer) -> None:
        self._server = server

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        return self._families(fill=True)

    def _families(self, fill: bool = False) -> Iterator[Metric]:
        s = self._server
        requests = CounterMetricFamily(
            "lbsim_leasestore_requests",
            "Lease store requests by op (put, renew, get, delete) and outcome "
            "(ok, conflict, not_found, throttled, bad_request, unavailable)",
            labels=["op", "outcome"],
        )
        leases = GaugeMetricFamily("lbsim_leasestore_leases", "Live leases in the lease store")
        latency = HistogramMetricFamily(
            "lbsim_leasestore_latency_seconds", "Modelled service latency of admitted requests, in sim seconds"
        )
        in_flight = GaugeMetricFamily("lbsim_leasestore_in_flight", "Admitted requests not yet answered")
        capacity = GaugeMetricFamily(
            "lbsim_leasestore_capacity_per_second", "Requests per sim second the lease store admits (token rate)"
        )
        if fill:
            # Every series, zeros included, so rates work from the first scrape.
            for op in OPS:
                for outcome in OUTCOMES:
                    requests.add_metric([op, outcome], s.requests[op, outcome])
            leases.add_metric([], s.table.count(s.clock.now()))
            latency.add_metric([], s.latencies.cumulative(), s.latencies.sum)
            in_flight.add_metric([], s.in_flight)
            capacity.add_metric([], s.capacity_per_s)
        yield from (requests, leases, latency, in_flight, capacity)

