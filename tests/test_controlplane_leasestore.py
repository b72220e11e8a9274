"""The lease store: the pure table, bucket and latency model, then the server and its client on real loopback."""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import AsyncIterator

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from support import LOOPS, open_sockets, run_on, wait_for

from backends.controlplane.leaseclient import LeaseClient, LeaseResult
from backends.controlplane.leasestore import (
    LatencyModel,
    Lease,
    LeaseOutcome,
    LeaseStoreServer,
    LeaseTable,
    TokenBucket,
    service_latency,
)
from worlds.clock import ScaledClock

SPEED = 25.0  # 100 left a loaded CI machine 10 ms of wall time per sim 1 s; two of five requests timed out
NAME = "dynamodb.us-east-1.sim"

# -- pure core: the table


def test_a_lease_expires_exactly_at_its_boundary() -> None:
    t = LeaseTable()
    assert t.put("h1", "dwfm-a", 10.0, now=5.0).lease == Lease("dwfm-a", 1, 15.0)
    assert t.get("h1", 14.999) == Lease("dwfm-a", 1, 15.0)
    assert t.get("h1", 15.0) is None
    assert t.count(14.999) == 1 and t.count(15.0) == 0
    # An expired lease cannot be renewed, even at the very instant it expires; a put brings it back.
    assert t.renew("h1", 10.0, 15.0).outcome == LeaseOutcome.NOT_FOUND
    assert t.renew("h1", 10.0, 14.999).ok


def test_every_write_takes_a_new_version_that_never_repeats() -> None:
    t = LeaseTable()
    assert t.put("h1", "a", 5, 0).lease == Lease("a", 1, 5)
    renewed = t.renew("h1", 5, 1).lease
    assert renewed == Lease("a", 2, 6)  # renew keeps the value, moves the expiry
    assert t.put("h1", "b", 5, 2).lease == Lease("b", 3, 7)
    assert t.delete("h1", 3).lease == Lease("b", 3, 7)
    assert t.get("h1", 3) is None
    # After a delete, and after expiry and sweep, the next version still continues from the last one.
    assert t.put("h1", "c", 1, 4).lease == Lease("c", 4, 5)
    assert t.sweep(10) == 1 and t.version("h1") == 4
    assert t.put("h1", "d", 1, 10).lease == Lease("d", 5, 11)
    assert t.put("h2", "x", 1, 10).lease == Lease("x", 1, 11)  # versions are per key


def test_conditional_put() -> None:
    t = LeaseTable()
    assert t.put("h1", "a", 10, 0, expected_version=3).outcome == LeaseOutcome.CONFLICT  # absent is version 0
    assert t.put("h1", "a", 10, 0, expected_version=0).ok
    conflict = t.put("h1", "b", 10, 1, expected_version=0)
    assert conflict.outcome == LeaseOutcome.CONFLICT and conflict.lease == Lease("a", 1, 10)
    assert t.put("h1", "b", 10, 1, expected_version=2).outcome == LeaseOutcome.CONFLICT
    assert t.get("h1", 1) == Lease("a", 1, 10)  # failed conditions change nothing
    assert t.put("h1", "b", 10, 1, expected_version=1).lease == Lease("b", 2, 11)
    assert t.put("h1", "c", 10, 2).lease == Lease("c", 3, 12)  # unconditional
    # Expired: reads as absent, so only "must not exist" (0) passes, not the old version.
    assert t.put("h1", "d", 10, 12, expected_version=3).outcome == LeaseOutcome.CONFLICT
    assert t.put("h1", "d", 10, 12, expected_version=0).lease == Lease("d", 4, 22)


def test_conditional_renew_and_delete() -> None:
    t = LeaseTable()
    assert t.renew("nope", 10, 0).outcome == LeaseOutcome.NOT_FOUND
    assert t.delete("nope", 0).outcome == LeaseOutcome.NOT_FOUND
    t.put("h1", "a", 10, 0)
    assert t.renew("h1", 10, 1, expected_version=7).outcome == LeaseOutcome.CONFLICT
    assert t.renew("h1", 10, 1, expected_version=1).lease == Lease("a", 2, 11)
    assert t.delete("h1", 2, expected_version=1).outcome == LeaseOutcome.CONFLICT
    assert t.get("h1", 2) is not None
    assert t.delete("h1", 2, expected_version=2).ok
    assert t.delete("h1", 2).outcome == LeaseOutcome.NOT_FOUND
    t.put("h2", "b", 1, 0)
    assert t.delete("h2", 1).outcome == LeaseOutcome.NOT_FOUND  # expired at exactly 1


def test_sweep_drops_only_expired_leases() -> None:
    t = LeaseTable()
    for i in range(5):
        t.put(f"h{i}", "a", i + 1, 0)
    assert t.sweep(3) == 3
    assert t.count(3) == 2 and t.get("h3", 3) is not None and t.get("h4", 3) is not None
    assert t.sweep(3) == 0


@pytest.mark.parametrize("ttl", [0, -1, float("inf"), float("nan")])
def test_bad_ttl_is_rejected(ttl: float) -> None:
    t = LeaseTable()
    with pytest.raises(ValueError, match="ttl_s"):
        t.put("h1", "a", ttl, 0)
    assert t.get("h1", 0) is None


def test_bad_expected_version_is_rejected() -> None:
    with pytest.raises(ValueError, match="expected_version"):
        LeaseTable().put("h1", "a", 1, 0, expected_version=-1)


# -- pure core: admission and latency


def test_token_bucket_starts_full_refills_at_its_rate_and_caps_at_burst() -> None:
    b = TokenBucket(rate_per_s=2.0, burst=3)
    assert [b.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert b.retry_after(0.0) == pytest.approx(0.5)
    assert not b.take(0.49)
    assert b.take(0.5)  # one token per 1/rate seconds
    assert not b.take(0.5)
    assert b.tokens(100.0) == 3  # a long idle spell refills up to burst, no more
    assert b.retry_after(100.0) == 0.0
    assert b.tokens(50.0) == 3  # time read out of order adds nothing and removes nothing


def test_token_bucket_set_rate_keeps_tokens_up_to_the_new_burst() -> None:
    b = TokenBucket(10.0, 10)
    assert b.tokens(0.0) == 10
    b.set_rate(1.0, 0.0, burst=2)
    assert b.tokens(0.0) == 2
    assert b.take(0) and b.take(0) and not b.take(0.5) and b.take(1.0)


@pytest.mark.parametrize(("rate", "burst", "match"), [(0, 1, "capacity"), (-5, 1, "capacity"), (1, 0.5, "burst")])
def test_token_bucket_rejects_bad_config(rate: float, burst: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TokenBucket(rate, burst)


def test_service_latency_is_monotone_in_utilisation() -> None:
    values = [service_latency(0.01, 4.0, u / 10) for u in range(0, 21)]
    assert values[0] == pytest.approx(0.01)
    assert values[10] == pytest.approx(0.05)  # fully used: base x (1 + factor)
    assert all(a < b for a, b in itertools.pairwise(values))


def test_latency_model_grows_with_admissions_in_the_window_and_recovers_after_it() -> None:
    m = LatencyModel(base_latency_s=0.01, load_factor=4.0, window_s=1.0)
    latencies = [m.admit(10.0 + i * 0.01, capacity_per_s=10.0) for i in range(10)]
    assert latencies[0] == pytest.approx(0.01 * (1 + 4 * 0.1))
    assert latencies[-1] == pytest.approx(0.05)
    assert all(a < b for a, b in itertools.pairwise(latencies))
    assert m.utilisation(10.5, 10.0) == pytest.approx(1.0)
    assert m.utilisation(11.2, 10.0) == 0.0  # all admissions left the 1 s window
    assert m.admit(11.2, 10.0) == pytest.approx(latencies[0])


def test_latency_model_rejects_bad_config() -> None:
    with pytest.raises(ValueError, match="base_latency_s"):
        LatencyModel(-0.1, 1.0)
    with pytest.raises(ValueError, match="load_latency_factor"):
        LatencyModel(0.1, -1.0)


def test_server_rejects_bad_capacity() -> None:
    clock = ScaledClock(SPEED)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="capacity_per_s"):
            LeaseStoreServer(clock, CollectorRegistry(), capacity_per_s=bad)
    with pytest.raises(ValueError, match="max_in_flight"):
        LeaseStoreServer(clock, CollectorRegistry(), max_in_flight=0)
    server = LeaseStoreServer(clock, CollectorRegistry())
    with pytest.raises(ValueError, match="capacity_per_s"):
        server.set_capacity(0)
    assert server.capacity_per_s == 200.0


# -- the server over loopback


def url(server: LeaseStoreServer, path: str) -> str:
    return f"http://127.0.0.1:{server.port}{path}"


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    assert value is not None, (name, labels)
    return value


@pytest.fixture
async def store() -> AsyncIterator[tuple[LeaseStoreServer, CollectorRegistry]]:
    registry = CollectorRegistry()
    async with LeaseStoreServer(ScaledClock(SPEED), registry) as s:
        yield s, registry


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_crud_over_http(
    store: tuple[LeaseStoreServer, CollectorRegistry], http: aiohttp.ClientSession
) -> None:
    server, registry = store
    async with http.put(url(server, "/leases/h1"), json={"value": "dwfm-a", "ttl_s": 60}) as r:
        assert r.status == 200
        body = await r.json()
    assert body["key"] == "h1" and body["value"] == "dwfm-a" and body["version"] == 1
    assert 59 < body["expires_in_s"] <= 60
    async with http.get(url(server, "/leases/h1")) as r:
        assert r.status == 200 and (await r.json())["version"] == 1
    async with http.post(url(server, "/leases/h1/renew"), json={"ttl_s": 120, "expected_version": 1}) as r:
        body = await r.json()
        assert r.status == 200 and body["version"] == 2 and body["value"] == "dwfm-a"
        assert 119 < body["expires_in_s"] <= 120
    async with http.put(url(server, "/leases/h1"), json={"value": "x", "ttl_s": 1, "expected_version": 0}) as r:
        assert r.status == 409
        assert await r.json() == {"error": "version conflict on 'h1'", "version": 2}
    async with http.delete(url(server, "/leases/h1"), params={"expected_version": "1"}) as r:
        assert r.status == 409
    async with http.delete(url(server, "/leases/h1"), params={"expected_version": "2"}) as r:
        assert r.status == 204
    async with http.get(url(server, "/leases/h1")) as r:
        assert r.status == 404 and "error" in await r.json()
    async with http.post(url(server, "/leases/h1/renew"), json={"ttl_s": 5}) as r:
        assert r.status == 404
    async with http.delete(url(server, "/leases/h1")) as r:
        assert r.status == 404
    async with http.get(url(server, "/healthz")) as r:
        assert r.status == 200
    assert sample(registry, "lbsim_leasestore_requests_total", op="put", outcome="ok") == 1
    assert sample(registry, "lbsim_leasestore_requests_total", op="put", outcome="conflict") == 1
    assert sample(registry, "lbsim_leasestore_requests_total", op="get", outcome="not_found") == 1
    assert sample(registry, "lbsim_leasestore_requests_total", op="delete", outcome="ok") == 1
    assert sample(registry, "lbsim_leasestore_leases") == 0
    assert sample(registry, "lbsim_leasestore_latency_seconds_count") == 9  # every admitted request


@pytest.mark.parametrize(
    ("method", "path", "body", "match"),
    [
        ("PUT", "/leases/h1", "not json", "not valid JSON"),
        ("PUT", "/leases/h1", "[1]", "JSON object"),
        ("PUT", "/leases/h1", '{"ttl_s": 5}', "value must be a string"),
        ("PUT", "/leases/h1", '{"value": "a", "ttl_s": 0}', "ttl_s"),
        ("PUT", "/leases/h1", '{"value": "a", "ttl_s": Infinity}', "ttl_s"),
        ("PUT", "/leases/h1", '{"value": "a", "ttl_s": true}', "ttl_s"),
        ("PUT", "/leases/h1", '{"value": "a", "ttl_s": 5, "expected_version": -2}', "expected_version"),
        ("PUT", "/leases/h1", '{"value": "a", "ttl_s": 5, "expected_version": "1"}', "expected_version"),
        ("PUT", "/leases/h1", '{"value": "a", "ttl_s": 5, "owner": "me"}', "unknown fields"),
        ("POST", "/leases/h1/renew", "{}", "ttl_s is required"),
        ("POST", "/leases/h1/renew", '{"ttl_s": 5, "value": "a"}', "unknown fields"),
        ("DELETE", "/leases/h1?expected_version=abc", "", "expected_version"),
        ("GET", "/leases/h%20one", "", "key must match"),
    ],
)
async def test_bad_requests_get_400_with_a_reason_and_change_nothing(
    store: tuple[LeaseStoreServer, CollectorRegistry],
    http: aiohttp.ClientSession,
    method: str,
    path: str,
    body: str,
    match: str,
) -> None:
    server, _ = store
    async with http.put(url(server, "/leases/h1"), json={"value": "orig", "ttl_s": 60}) as r:
        assert r.status == 200
    tokens = server.bucket.tokens(server.clock.now())
    async with http.request(method, url(server, path), data=body) as r:
        assert r.status == 400
        assert match in (await r.json())["error"]
    lease = server.table.get("h1", server.clock.now())
    assert lease is not None and lease.value == "orig" and lease.version == 1
    assert server.bucket.tokens(server.clock.now()) >= tokens  # a bad request costs no token


async def test_beyond_capacity_requests_get_429_at_once() -> None:
    registry = CollectorRegistry()
    clock = ScaledClock(SPEED)
    # A slow refill keeps the bound below n even when a loaded machine stretches the run to twice `base`.
    capacity, burst, n = 0.5, 10, 40
    # A long service time makes "at once" measurable: a queued 429 would take at least this long.
    base = 10.0
    async with (
        LeaseStoreServer(clock, registry, capacity, burst, base, 0.0, max_in_flight=1000) as server,
        LeaseClient(clock, _resolves_to(["127.0.0.1"]), NAME, server.port, timeout_s=60) as client,
    ):
        start = clock.now()
        results = await asyncio.gather(*(client.get(f"h{i}") for i in range(n)))
        elapsed = clock.now() - start
    admitted = [r for r in results if r.outcome == "not_found"]
    throttled = [r for r in results if r.outcome == "throttled"]
    assert len(admitted) + len(throttled) == n
    # The burst is admitted, plus at most what refilled while the requests were arriving (all of them had
    # arrived by the time the last was answered); elapsed is about `base`, so about 25 of the 40 are throttled.
    assert burst <= len(admitted) <= burst + capacity * elapsed + 1 < n
    assert all(r.latency_s < base for r in throttled)
    assert all(r.latency_s >= base for r in admitted)
    assert sample(registry, "lbsim_leasestore_requests_total", op="get", outcome="throttled") == len(throttled)


async def test_429_carries_retry_after(http: aiohttp.ClientSession) -> None:
    async with LeaseStoreServer(ScaledClock(SPEED), CollectorRegistry(), capacity_per_s=0.5, burst=1) as server:
        async with http.get(url(server, "/leases/a")) as r:
            assert r.status == 404
        async with http.get(url(server, "/leases/a")) as r:
            assert r.status == 429
            retry_after_s = (await r.json())["retry_after_s"]
            assert 0 < retry_after_s <= 2  # one token at 0.5/s
            assert r.headers["Retry-After"] == str(max(1, math.ceil(retry_after_s)))  # whole sim seconds


async def test_in_flight_requests_are_capped() -> None:
    registry = CollectorRegistry()
    clock = ScaledClock(SPEED)
    async with (
        LeaseStoreServer(clock, registry, 1000.0, base_latency_s=5.0, load_latency_factor=0.0, max_in_flight=2) as s,
        LeaseClient(clock, _resolves_to(["127.0.0.1"]), NAME, s.port, timeout_s=60) as client,
    ):
        results = await asyncio.gather(*(client.get(f"h{i}") for i in range(10)))
        assert s.peak_in_flight == 2
        assert s.in_flight == 0 and sample(registry, "lbsim_leasestore_in_flight") == 0
    outcomes = [r.outcome for r in results]
    assert 2 <= outcomes.count("not_found") < 10 and outcomes.count("throttled") == 10 - outcomes.count("not_found")


async def test_latency_under_load_is_higher_than_idle() -> None:
    registry = CollectorRegistry()
    clock = ScaledClock(SPEED / 2)  # a window of 1 sim s is 20 ms wall: the burst lands well within it
    capacity = 20.0

    def mean_latency() -> tuple[float, float]:
        return sample(registry, "lbsim_leasestore_latency_seconds_sum"), sample(
            registry, "lbsim_leasestore_latency_seconds_count"
        )

    async with (
        LeaseStoreServer(clock, registry, capacity, base_latency_s=0.5, load_latency_factor=4.0) as s,
        LeaseClient(clock, _resolves_to(["127.0.0.1"]), NAME, s.port, timeout_s=60) as client,
    ):
        idle = await client.get("h0")
        idle_sum, idle_count = mean_latency()
        assert idle_count == 1 and idle_sum == pytest.approx(0.5 * (1 + 4 / capacity))
        await clock.sleep(s.latency.window_s)  # let the idle request leave the load window
        loaded = await asyncio.gather(*(client.get(f"h{i}") for i in range(int(capacity))))
        total_sum, total_count = mean_latency()
    assert all(r.outcome == "not_found" for r in [idle, *loaded])
    load_mean = (total_sum - idle_sum) / (total_count - idle_count)
    assert load_mean > 2 * idle_sum
    assert max(r.latency_s for r in loaded) > 0.5 * (1 + 4 * 0.5)  # the clients saw it too


async def test_outage_and_capacity_knobs(
    store: tuple[LeaseStoreServer, CollectorRegistry], http: aiohttp.ClientSession
) -> None:
    server, registry = store
    server.outage(True)
    async with http.get(url(server, "/healthz")) as r:
        assert r.status == 503
    async with http.put(url(server, "/leases/h1"), json={"value": "a", "ttl_s": 5}) as r:
        assert r.status == 503
    assert server.table.get("h1", server.clock.now()) is None
    assert sample(registry, "lbsim_leasestore_requests_total", op="put", outcome="unavailable") == 1
    server.outage(False)
    async with http.put(url(server, "/leases/h1"), json={"value": "a", "ttl_s": 5}) as r:
        assert r.status == 200
    server.set_capacity(7.0)
    assert sample(registry, "lbsim_leasestore_capacity_per_second") == 7.0
    assert server.max_in_flight == 14 and server.bucket.burst == 7.0
    text = generate_latest(registry).decode()
    for name in ("requests_total", "latency_seconds_bucket", "leases", "in_flight", "capacity_per_second"):
        assert f"lbsim_leasestore_{name}" in text


async def test_start_and_close_are_idempotent() -> None:
    server = LeaseStoreServer(ScaledClock(SPEED), CollectorRegistry())
    await server.start()
    port = server.port
    await server.start()
    assert server.port == port
    await server.close()
    await server.close()
    with pytest.raises(RuntimeError, match="not started"):
        _ = server.port


# -- the client


def _resolves_to(addresses: list[str]) -> Resolver:
    return Resolver(addresses)


class Resolver:
    """A stand-in DNS view whose answer the test sets, and which counts lookups."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses
        self.calls = 0

    async def __call__(self, name: str) -> list[str]:
        assert name == NAME
        self.calls += 1
        return list(self.addresses)


async def test_client_lease_lifecycle(store: tuple[LeaseStoreServer, CollectorRegistry]) -> None:
    server, _ = store
    clock = server.clock
    resolve = _resolves_to(["127.0.0.1"])
    async with LeaseClient(clock, resolve, NAME, server.port, holder="dwfm-1") as client:
        acquired = await client.acquire_lease("h1", ttl_s=2.0)
        assert acquired.ok and acquired.outcome == "ok" and acquired.version == 1 and acquired.value == "dwfm-1"
        assert 0 <= acquired.latency_s < 2.0
        renewed = await client.renew_lease("h1", ttl_s=2.0)
        assert renewed == LeaseResult(True, "ok", 2, renewed.latency_s, "dwfm-1")
        conflict = await client.put("h1", "other", 5, expected_version=0)
        assert not conflict.ok and conflict.outcome == "conflict" and conflict.version == 2
        got = await client.get("h1")
        assert got.ok and got.version == 2 and got.value == "dwfm-1"
        await clock.sleep_until(clock.now() + 2.0)  # let the lease lapse
        expired = await client.renew_lease("h1", ttl_s=2.0)
        assert expired.outcome == "not_found" and not expired.ok and expired.version is None
        again = await client.acquire_lease("h1", ttl_s=2.0)
        assert again.ok and again.version == 3
        assert (await client.delete("h1", expected_version=2)).outcome == "conflict"
        assert (await client.delete("h1", expected_version=3)).ok
        assert (await client.delete("h1")).outcome == "not_found"
    assert resolve.calls == 9  # every call resolved the name


async def test_client_with_an_empty_record_is_unresolvable_and_connects_nowhere(
    store: tuple[LeaseStoreServer, CollectorRegistry],
) -> None:
    server, _ = store
    resolve = _resolves_to([])
    async with LeaseClient(server.clock, resolve, NAME, server.port) as client:
        result = await client.acquire_lease("h1", 10)
        assert result == LeaseResult(False, "unresolvable", None, result.latency_s)
        assert sum(server.requests.values()) == 0
        resolve.addresses = ["127.0.0.1"]  # the record is fixed
        assert (await client.acquire_lease("h1", 10)).ok
        assert sum(server.requests.values()) == 1


async def test_client_reports_throttled_and_unavailable(store: tuple[LeaseStoreServer, CollectorRegistry]) -> None:
    server, _ = store
    async with LeaseClient(server.clock, _resolves_to(["127.0.0.1"]), NAME, server.port) as client:
        server.outage(True)
        assert (await client.get("h1")).outcome == "unavailable"
        server.outage(False)
        server.set_capacity(0.001)  # burst follows: one token
        await client.get("h1")  # takes the one token
        assert (await client.get("h1")).outcome == "throttled"


async def test_client_against_a_closed_port_is_unavailable() -> None:
    clock = ScaledClock(SPEED)
    server = LeaseStoreServer(clock, CollectorRegistry())
    await server.start()
    port = server.port
    await server.close()
    async with LeaseClient(clock, _resolves_to(["127.0.0.1"]), NAME, port) as client:
        result = await client.get("h1")
    assert result.outcome == "unavailable" and not result.ok


async def test_client_times_out_when_the_store_is_slower_than_its_timeout() -> None:
    clock = ScaledClock(SPEED)
    timeout_s = 1.0
    async with (
        LeaseStoreServer(clock, CollectorRegistry(), base_latency_s=5 * timeout_s, load_latency_factor=0) as s,
        LeaseClient(clock, _resolves_to(["127.0.0.1"]), NAME, s.port, timeout_s=timeout_s) as client,
    ):
        result = await client.acquire_lease("h1", 30)
        assert result.outcome == "timeout" and not result.ok
        assert timeout_s <= result.latency_s < 5 * timeout_s
        # The store does not know the client gave up: the write still commits when its service time is over.
        await wait_for(lambda: s.table.get("h1", clock.now()) is not None, within=2.0)


def test_client_rejects_bad_arguments() -> None:
    clock = ScaledClock(SPEED)
    resolve = _resolves_to([])
    with pytest.raises(ValueError, match="timeout_s"):
        LeaseClient(clock, resolve, NAME, 80, timeout_s=0)
    with pytest.raises(ValueError, match="port"):
        LeaseClient(clock, resolve, NAME, 0)
    with pytest.raises(ValueError, match="name"):
        LeaseClient(clock, resolve, "", 80)


async def test_client_rejects_a_bad_key_and_use_after_close() -> None:
    client = LeaseClient(ScaledClock(SPEED), _resolves_to([]), NAME, 80)
    with pytest.raises(ValueError, match="key"):
        await client.get("a/b")
    await client.close()
    with pytest.raises(RuntimeError, match="closed"):
        await client.get("h1")


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_server_and_client_on_both_loops_leak_no_sockets(loop: str) -> None:
    async def body() -> None:
        before = open_sockets()
        clock = ScaledClock(SPEED)
        server = LeaseStoreServer(clock, CollectorRegistry())
        await server.start()
        client = LeaseClient(clock, _resolves_to(["127.0.0.1"]), NAME, server.port, timeout_s=30.0)
        # 30 sim s is 1.2 s of wall time at SPEED: room for a loaded CI machine
        results = await asyncio.gather(*(client.acquire_lease(f"h{i}", 30) for i in range(5)))
        assert [r.outcome for r in results] == ["ok"] * 5
        server.latency.base_latency_s = 10_000.0
        timed_out = await client.renew_lease("h0", 30)  # 10,000 s of service against a 30 s timeout
        assert timed_out.outcome == "timeout"
        await client.close()
        await server.close()  # with the timed-out renewal still in its service time: answered 503 at once
        assert server.requests["renew", "unavailable"] == 1 and server.in_flight == 0
        await wait_for(lambda: open_sockets() == before, within=2.0)

    run_on(loop, body)
