"""BackendFleet on real loopback sockets: every mode as a client sees it, port reuse, clean shutdown."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from support import open_sockets, wait_for

from backends.app import BackendFleet, BackendMode
from worlds.clock import ScaledClock

HOST = "127.0.0.1"
# A socket closed by the garbage collector rather than by us is a leak: make its ResourceWarning fail.
pytestmark = [pytest.mark.timeout(30), pytest.mark.filterwarnings("error::ResourceWarning")]


@pytest.fixture
async def fleet() -> AsyncIterator[BackendFleet]:
    f = BackendFleet(clock=ScaledClock(2.0), seed=1)
    await f.start()
    yield f
    await f.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


async def get(http: aiohttp.ClientSession, port: int, path: str) -> tuple[int, bytes]:
    async with http.get(f"http://{HOST}:{port}{path}") as resp:
        return resp.status, await resp.read()


async def test_healthy_backend_answers_health_and_work(
    fleet: BackendFleet, http: aiohttp.ClientSession
) -> None:
    port = await fleet.add("a")
    assert await get(http, port, "/health") == (200, b"ok")
    status, body = await get(http, port, "/work?bytes=300000")
    assert (status, len(body)) == (200, 300_000)
    assert await get(http, port, "/work") == (200, b"")
    assert (await get(http, port, "/work?bytes=-1"))[0] == 400
    assert (await get(http, port, "/work?bytes=lots"))[0] == 400
    s = fleet.state("a")
    assert (s.port, s.mode, s.requests, s.ok, s.errors) == (port, BackendMode.HEALTHY, 5, 3, 0)


async def test_backends_share_the_process_but_not_their_state(
    fleet: BackendFleet, http: aiohttp.ClientSession
) -> None:
    a, b = await fleet.add("a"), await fleet.add("b")
    await fleet.set_mode("a", "unhealthy")
    assert (await get(http, a, "/health"))[0] == 503
    assert (await get(http, b, "/health"))[0] == 200
    assert (fleet.state("a").errors, fleet.state("b").ok) == (1, 1)


async def test_unhealthy_answers_its_status_on_every_route(
    fleet: BackendFleet, http: aiohttp.ClientSession
) -> None:
    port = await fleet.add("a")
    await fleet.set_mode("a", "unhealthy")
    assert (await get(http, port, "/health"))[0] == 503
    await fleet.set_mode("a", "unhealthy", status=500)
    assert (await get(http, port, "/health"))[0] == 500
    assert (await get(http, port, "/work?bytes=10"))[0] == 500
    assert fleet.state("a").errors == 3


async def test_slow_and_work_latency_add_sim_time(fleet: BackendFleet, http: aiohttp.ClientSession) -> None:
    port = await fleet.add("a")
    await fleet.set_mode("a", "slow", latency_s=0.4, work_latency_s=0.2)  # speed 2: 0.2 s and 0.1 s wall
    t0 = time.monotonic()
    assert await get(http, port, "/health") == (200, b"ok")
    t1 = time.monotonic()
    assert (await get(http, port, "/work?bytes=1"))[0] == 200
    t2 = time.monotonic()
    assert t1 - t0 >= 0.2
    assert t2 - t1 >= 0.3
    await fleet.set_mode("a", "healthy")  # work_latency_s is a setting and stays; latency_s goes
    assert fleet.state("a").settings() == {"mode": "healthy", "work_latency_s": 0.2, "error_rate": 0.0,
                                           "capacity_per_s": None, "deep_ok": True}


async def test_capacity_answers_503_beyond_its_rate_and_leaves_health_checks_alone(
    fleet: BackendFleet, http: aiohttp.ClientSession
) -> None:
    """A back-to-back burst gets the bucket's depth (one second of capacity) plus what refills meanwhile; the
    rest is 503 "overloaded" at once, and /health is never limited."""
    port = await fleet.add("a")
    rate = 5.0
    await fleet.set_mode("a", "healthy", capacity_per_s=rate)
    t0 = fleet.clock.now()
    statuses = [(await get(http, port, "/work?bytes=1"))[0] for _ in range(30)]
    elapsed_sim = fleet.clock.now() - t0
    ok = statuses.count(200)
    assert statuses.count(200) + statuses.count(503) == 30
    assert rate <= ok <= rate + elapsed_sim * rate + 1
    st = fleet.state("a")
    assert st.overloaded == 30 - ok and st.errors == 30 - ok
    assert all([(await get(http, port, "/health"))[0] == 200 for _ in range(10)])
    # A mode change keeps the capacity, as it keeps the other backend settings.
    await fleet.set_mode("a", "slow", latency_s=0.01)
    assert fleet.state("a").capacity_per_s == rate
    with pytest.raises(ValueError, match="capacity_per_s"):
        await fleet.set_mode("a", "healthy", capacity_per_s=0)


async def test_deep_health_fails_with_the_dependency_while_work_and_shallow_health_go_on(
    fleet: BackendFleet, http: aiohttp.ClientSession
) -> None:
    port = await fleet.add("a")
    assert (await get(http, port, "/health/deep"))[0] == 200
    await fleet.set_mode("a", "healthy", deep_ok=False)
    assert await get(http, port, "/health/deep") == (503, b"dependency down")
    assert (await get(http, port, "/health"))[0] == 200
    assert (await get(http, port, "/work?bytes=3")) == (200, b"xxx")
    await fleet.set_mode("a", "slow", latency_s=0.01)  # a setting: kept across modes
    assert (await get(http, port, "/health/deep"))[0] == 503
    await fleet.set_mode("a", "healthy", deep_ok=True)
    assert (await get(http, port, "/health/deep"))[0] == 200
    with pytest.raises(ValueError, match="deep_ok"):
        await fleet.set_mode("a", "healthy", deep_ok="no")


async def test_error_rate_answers_that_share_of_work_with_500(
    fleet: BackendFleet, http: aiohttp.ClientSession
) -> None:
    port = await fleet.add("a")
    n, rate = 300, 0.3
    await fleet.set_mode("a", "healthy", error_rate=rate)
    statuses = [(await get(http, port, "/work?bytes=1"))[0] for _ in range(n)]
    errors = statuses.count(500)
    assert statuses.count(200) + errors == n
    assert errors == fleet.state("a").errors
    assert abs(errors - n * rate) <= 4 * math.sqrt(n * rate * (1 - rate))
    assert (await get(http, port, "/health"))[0] == 200  # error_rate is for /work only


async def test_hang_holds_the_request_until_the_client_gives_up(
    fleet: BackendFleet, http: aiohttp.ClientSession
) -> None:
    port = await fleet.add("a")
    await fleet.set_mode("a", "hang")
    with pytest.raises(asyncio.TimeoutError):
        async with http.get(f"http://{HOST}:{port}/health", timeout=aiohttp.ClientTimeout(total=0.3)):
            pass
    assert fleet.state("a").hung == 1
    # The client closed the connection; the handler must have ended with it.
    await wait_for(lambda: asyncio.all_tasks() == {asyncio.current_task()})


async def test_crash_refuses_and_healthy_listens_on_the_same_port_again(
    fleet: BackendFleet, http: aiohttp.ClientSession
) -> None:
    port = await fleet.add("a")
    reader, writer = await asyncio.open_connection(HOST, port)  # a live connection the crash must drop
    await fleet.set_mode("a", "crash")
    assert await asyncio.wait_for(reader.read(), 2.0) == b""
    writer.close()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(HOST, port)
    await fleet.set_mode("a", "healthy")
    assert await get(http, port, "/health") == (200, b"ok")
    assert fleet.state("a").port == port
    # Changes issued together apply in order: crash, then heal.
    await asyncio.gather(fleet.set_mode("a", "crash"), fleet.set_mode("a", "healthy"))
    assert await get(http, port, "/health") == (200, b"ok")


async def test_rejected_mode_changes_leave_the_backend_as_it_was(fleet: BackendFleet) -> None:
    await fleet.add("a")
    await fleet.set_mode("a", "unhealthy", status=502, error_rate=0.1)
    before = fleet.state("a")
    for mode, params in (
        ("sleepy", {}),
        ("slow", {}),  # latency_s is required
        ("slow", {"latency_s": -1.0}),
        ("unhealthy", {"status": 99}),
        ("unhealthy", {"status": 503.5}),
        ("unhealthy", {"status": "503"}),
        ("healthy", {"status": 500}),  # status is for unhealthy only
        ("healthy", {"error_rate": 1.5}),
        ("healthy", {"work_latency_s": float("inf")}),
    ):
        with pytest.raises(ValueError):
            await fleet.set_mode("a", mode, **params)
        assert fleet.state("a") == before
    with pytest.raises(KeyError):
        await fleet.set_mode("nobody", "healthy")
    with pytest.raises(ValueError):
        await fleet.add("a")


async def test_stop_releases_every_socket_and_task() -> None:
    before = open_sockets()
    fleet = BackendFleet(clock=ScaledClock(), seed=2)
    await fleet.start()
    ports = [await fleet.add(name) for name in ("healthy", "hung", "slow", "crashed", "removed")]
    await fleet.set_mode("hung", "hang")
    await fleet.set_mode("slow", "slow", latency_s=60.0)
    await fleet.set_mode("crashed", "crash")
    await fleet.remove("removed")
    async with aiohttp.ClientSession() as http:
        assert (await get(http, ports[0], "/health"))[0] == 200
        pending = [asyncio.create_task(get(http, port, "/work?bytes=1")) for port in ports[1:3]]
        await wait_for(lambda: fleet.state("hung").hung == 1 and fleet.state("slow").requests == 1)
        await fleet.stop()
        for task in pending:
            with pytest.raises(aiohttp.ClientError):
                await task
    assert open_sockets() == before
    assert asyncio.all_tasks() == {asyncio.current_task()}
