"""Targets and the admin API on real loopback sockets: end to end through the net path, errors, metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from support import PinnedClock, open_sockets, wait_for

from backends.admin import AdminServer
from backends.fleet import Targets, UnknownTarget
from backends.netpath import slot_lost
from worlds.clock import ScaledClock

HOST = "127.0.0.1"
# A socket closed by the garbage collector rather than by us is a leak: make its ResourceWarning fail.
pytestmark = [pytest.mark.timeout(30), pytest.mark.filterwarnings("error::ResourceWarning")]


class Api:
    def __init__(self, http: aiohttp.ClientSession, port: int) -> None:
        self.http = http
        self.base = f"http://{HOST}:{port}"

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.http.get(self.base + path) as resp:
            return resp.status, await resp.json()

    async def post(self, path: str, body: object = None, *, raw: bytes | None = None) -> tuple[int, Any]:
        data = raw if raw is not None else None if body is None else aiohttp.JsonPayload(body)
        async with self.http.post(self.base + path, data=data) as resp:
            return resp.status, await resp.json()

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        async with self.http.get(self.base + "/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


@pytest.fixture
async def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def targets(registry: CollectorRegistry) -> AsyncIterator[Targets]:
    async with Targets(clock=ScaledClock(2.0), seed=5, registry=registry) as t:
        await t.add("a1", "az-a")
        await t.add("a2", "az-a")
        await t.add("b1", "az-b")
        yield t


@pytest.fixture
async def api(targets: Targets) -> AsyncIterator[Api]:
    server = AdminServer(targets)
    port = await server.start()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        yield Api(http, port)
    await server.stop()


async def health_via_path(address: str) -> int:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http,
        http.get(f"http://{address}/health") as resp,
    ):
        return resp.status


async def test_lists_targets_with_their_path_address_and_ground_truth(api: Api, targets: Targets) -> None:
    status, listed = await api.get("/targets")
    assert status == 200
    assert [
        (t["id"], t["zone"], t["backend"]["mode"], t["path"]["state"], t["can_serve"]) for t in listed
    ] == [
        ("a1", "az-a", "healthy", "open", True),
        ("a2", "az-a", "healthy", "open", True),
        ("b1", "az-b", "healthy", "open", True),
    ]
    a1 = targets.info("a1")
    assert listed[0]["address"] == a1.address != f"{HOST}:{a1.backend.port}"
    assert await health_via_path(a1.address) == 200  # the path relays to the backend
    assert (await api.get("/targets/b1")) == (200, listed[2])


async def test_backend_and_path_changes_reach_the_wire(api: Api, targets: Targets) -> None:
    address = targets.info("a1").address
    status, body = await api.post("/targets/a1/backend", {"mode": "unhealthy", "status": 500})
    assert status == 200
    assert (body["backend"]["mode"], body["backend"]["status"], body["can_serve"]) == (
        "unhealthy",
        500,
        False,
    )
    assert await health_via_path(address) == 500

    await api.post("/targets/a1/backend", {"mode": "healthy"})
    status, body = await api.post("/targets/a1/path", {"state": "refuse"})
    assert (status, body["path"]["state"], body["can_serve"]) == (200, "refuse", False)
    host, port = address.split(":")
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(host, int(port))

    status, body = await api.post("/targets/a1/path", {"state": "loss", "loss": 0.25, "cut_existing": True})
    assert (status, body["path"]["state"], body["path"]["loss"], body["can_serve"]) == (
        200,
        "flap",
        0.25,
        True,
    )
    assert targets.can_serve("a1")


BAD_REQUESTS: list[tuple[str, str, Any, bytes | None, int]] = [
    ("backend", "a1", None, b"{not json", 400),
    ("backend", "a1", None, b"\xff\xfe", 400),
    ("backend", "a1", None, b"", 400),
    ("backend", "a1", ["healthy"], None, 400),
    ("backend", "a1", {}, None, 400),
    ("backend", "a1", {"mode": 3}, None, 400),
    ("backend", "a1", {"mode": "sleepy"}, None, 400),
    ("backend", "a1", {"mode": "unhealthy", "status": 700}, None, 400),
    ("backend", "a1", {"mode": "slow"}, None, 400),
    ("backend", "a1", {"mode": "healthy", "error_rate": -0.1}, None, 400),
    ("backend", "a1", {"mode": "healthy", "colour": "red"}, None, 400),
    ("backend", "zz", {"mode": "healthy"}, None, 404),
    ("path", "a1", {"state": "sideways"}, None, 400),
    ("path", "a1", {"state": "latency"}, None, 400),
    ("path", "a1", {"state": "latency", "latency_s": "slow"}, None, 400),
    ("path", "a1", {"state": "flap", "loss": 2}, None, 400),
    ("path", "a1", {"state": "bandwidth", "rate_bytes_per_s": 0}, None, 400),
    ("path", "a1", {"state": "open", "cut_existing": "yes"}, None, 400),
    ("path", "a1", {"state": "open", "loss": 0.1}, None, 400),
    ("path", "zz", {"state": "open"}, None, 404),
]


@pytest.mark.parametrize(("kind", "target", "body", "raw", "expected"), BAD_REQUESTS)
async def test_rejected_requests_say_why_and_change_nothing(
    api: Api, targets: Targets, kind: str, target: str, body: Any, raw: bytes | None, expected: int
) -> None:
    await targets.set_path("a1", "latency", latency_s=0.5)
    await targets.set_backend("a1", "unhealthy", status=502)
    before = [t.to_json() for t in targets.snapshot()]
    status, error = await api.post(f"/targets/{target}/{kind}", body, raw=raw)
    assert status == expected
    assert isinstance(error["error"], str) and error["error"]
    assert [t.to_json() for t in targets.snapshot()] == before


async def test_unknown_target_and_route_are_json_404s(api: Api) -> None:
    status, body = await api.get("/targets/nope")
    assert (status, body) == (404, {"error": "unknown target 'nope'"})
    status, body = await api.get("/nowhere")
    assert status == 404 and "error" in body


async def test_metrics_come_from_the_injected_registry(
    api: Api, targets: Targets, registry: CollectorRegistry
) -> None:
    assert await health_via_path(targets.info("a1").address) == 200
    await targets.set_backend("a2", "hang")
    await targets.set_path("b1", "blackhole")
    m = await api.metrics()
    assert m["lbsim_targets_can_serve", (("zone", "az-a"),)] == 1
    assert m["lbsim_targets_can_serve", (("zone", "az-b"),)] == 0
    assert m["lbsim_targets_by_path_state", (("state", "open"), ("zone", "az-a"))] == 2
    assert m["lbsim_targets_by_path_state", (("state", "blackhole"), ("zone", "az-b"))] == 1
    assert m["lbsim_targets_by_path_state", (("state", "refuse"), ("zone", "az-b"))] == 0
    assert m["lbsim_backend_requests_total", (("outcome", "ok"), ("zone", "az-a"))] == 1
    assert m["lbsim_netpath_connections_total", (("outcome", "relayed"), ("zone", "az-a"))] == 1
    assert registry.get_sample_value("lbsim_targets_can_serve", {"zone": "az-a"}) == 1
    assert REGISTRY.get_sample_value("lbsim_targets_can_serve", {"zone": "az-a"}) is None

    await targets.remove("a1")  # a removed target's counts stay in the totals
    m = await api.metrics()
    assert m["lbsim_backend_requests_total", (("outcome", "ok"), ("zone", "az-a"))] == 1
    assert m["lbsim_targets_can_serve", (("zone", "az-a"),)] == 0


async def test_registry_add_remove_and_errors() -> None:
    async with Targets(clock=ScaledClock()) as targets:
        host, port = await targets.add("t", "z")
        assert (host, port) == (HOST, targets.info("t").port)
        with pytest.raises(ValueError):
            await targets.add("t", "z")
        await targets.remove("t")
        for call in (targets.remove("t"), targets.set_backend("t", "healthy"), targets.set_path("t", "open")):
            with pytest.raises(UnknownTarget):
                await call
        with pytest.raises(UnknownTarget):
            targets.can_serve("t")
        assert targets.snapshot() == []


async def test_the_flap_threshold_of_the_ground_truth_is_the_one_the_targets_were_given() -> None:
    """A path losing 40% of new connections can serve by the default rule (below half) and cannot with 0.3."""
    for threshold, expected in ((0.5, True), (0.3, False)):
        async with Targets(clock=ScaledClock(), flap_can_serve_below=threshold) as targets:
            await targets.add("a-0", "a")
            await targets.set_path("a-0", "flap", loss=0.4)
            assert targets.can_serve("a-0") is expected


async def test_a_slotted_flap_follows_the_sim_clock_the_targets_were_given() -> None:
    clock = PinnedClock()
    async with Targets(seed=3, clock=clock) as targets:
        host, port = await targets.add("a-0", "a")
        await targets.set_path("a-0", "flap", loss=0.5, period_s=10.0)
        # The path's seed is "<seed>:<target id>"; pick one slot it holds and one it relays, neither slot 0 (where
        # a path left on its own clock would be, a moment after it was made).
        held = next(k for k in range(1, 100) if slot_lost("3:a-0", k, 0.5))
        kept = next(k for k in range(1, 100) if not slot_lost("3:a-0", k, 0.5))
        for slot in (held, kept):
            clock.set(slot * 10.0 + 5.0)
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET /health HTTP/1.0\r\n\r\n")
            if slot == held:
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(reader.readline(), 0.3)
            else:
                assert (await asyncio.wait_for(reader.readline(), 2.0)).startswith(b"HTTP/1.")
            writer.close()
        await wait_for(lambda: targets.info("a-0").connections.get("held") == 1)


async def test_close_releases_every_socket_and_task() -> None:
    before = open_sockets()
    targets = Targets(clock=ScaledClock(), seed=9)
    server = AdminServer(targets)
    await server.start()
    ports = (await targets.add("a", "z"))[1], (await targets.add("b", "z"))[1]
    await targets.set_backend("a", "hang")
    await targets.set_path("b", "flap", loss=1.0)
    async with aiohttp.ClientSession() as http:
        pending = [asyncio.create_task(http.get(f"http://{HOST}:{port}/health")) for port in ports]
        await wait_for(
            lambda: targets.info("a").backend.hung == 1 and targets.info("b").connections["held"] == 1
        )
        await targets.close()
        await server.stop()
        for task in pending:
            with pytest.raises(aiohttp.ClientError):
                await task
    assert open_sockets() == before
    assert asyncio.all_tasks() == {asyncio.current_task()}
