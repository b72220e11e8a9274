"""NetPath on real loopback sockets: every state as a client sees it on the wire, and clean shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import math
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from support import LOOPS, PinnedClock, open_sockets, run_on, wait_for

from backends import _sockets
from backends.netpath import NetPath, PathConfig, PathState, could_serve, slot_lost
from worlds.clock import ScaledClock

HOST = "127.0.0.1"
# A socket closed by the garbage collector rather than by us is a leak: make its ResourceWarning fail.
pytestmark = [pytest.mark.timeout(30), pytest.mark.filterwarnings("error::ResourceWarning")]

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


class Upstream:
    """A plain asyncio server standing in for the backend; closes what it accepted on exit."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.server: asyncio.Server | None = None
        self.port = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.writers: set[asyncio.StreamWriter] = set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        await self.handler(reader, writer)

    async def __aenter__(self) -> Upstream:
        self.server = await asyncio.start_server(self._serve, HOST, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
        for writer in self.writers:
            writer.transport.abort()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.fixture
async def echo_server() -> AsyncIterator[Upstream]:
    async with Upstream(echo) as up:
        yield up


@pytest.fixture
async def path(echo_server: Upstream) -> AsyncIterator[NetPath]:
    p = NetPath("t1", HOST, echo_server.port, rng_seed=7, clock=ScaledClock())
    await p.start()
    yield p
    await p.stop()


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection(HOST, port), 2.0)


async def ping(port: int) -> None:
    reader, writer = await connect(port)
    writer.write(b"ping\n")
    assert await asyncio.wait_for(reader.readline(), 2.0) == b"ping\n"
    writer.close()
    await writer.wait_closed()


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


@pytest.mark.parametrize(
    ("state", "params"),
    [("open", {}), ("latency", {"latency_s": 0.002, "jitter_s": 0.004})],  # jitter > latency: no reordering
)
async def test_relays_megabytes_both_ways_intact_and_honours_half_close(
    state: str, params: dict[str, Any]
) -> None:
    sent_up = os.urandom(3_000_000)
    sent_down = os.urandom(5_000_000)

    async def digest_then_send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Reads to EOF before answering: the client must be able to half-close and still read.
        received = await reader.read()
        writer.write(hashlib.sha256(received).hexdigest().encode() + sent_down)
        await writer.drain()
        writer.close()

    async with Upstream(digest_then_send) as up:
        p = NetPath("t1", HOST, up.port, rng_seed=1, clock=ScaledClock())
        port = await p.start()
        await p.set_state(state, **params)
        reader, writer = await connect(port)
        writer.write(sent_up)
        writer.write_eof()
        answer = await asyncio.wait_for(reader.read(), 10.0)
        assert answer[:64].decode() == hashlib.sha256(sent_up).hexdigest()
        assert hashlib.sha256(answer[64:]).digest() == hashlib.sha256(sent_down).digest()
        await close(writer)
        assert p.counts["relayed"] == 1
        await wait_for(lambda: p.active == 0)  # both sides closed once both EOFs went through
        await p.stop()


async def test_blackhole_makes_connect_time_out_then_open_serves_the_same_port(path: NetPath) -> None:
    await path.set_state("blackhole")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.open_connection(HOST, path.port), 0.5)
    await path.set_state("open")
    await ping(path.port)


def wire_state(sock: socket.socket, port: int) -> str:
    """What a connect of `sock` to the port meets right now: "refused", "dropped" (SYN unanswered) or "accepted".

    On loopback the kernel runs a connect's whole handshake, or its refusal, inside the connect() call, so
    a non-blocking connect's fate is known as soon as it returns: no waiting, and no loop iteration between
    the state being set and being observed."""
    sock.setblocking(False)
    assert sock.connect_ex((HOST, port)) in (0, errno.EINPROGRESS)
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNREFUSED:
        return "refused"
    try:
        sock.getpeername()
    except OSError:
        return "dropped"
    return "accepted"


def test_a_blackhole_is_full_as_soon_as_it_is_opened() -> None:
    sock = _sockets.bind(HOST, 0)
    port = sock.getsockname()[1]
    hole = _sockets.Blackhole.open(sock)  # synchronous: nothing to await, no wall time
    try:
        assert hole.filled_by_us  # our own connection took the queue's one slot inside connect()
        with socket.socket() as client:
            assert wire_state(client, port) == "dropped"
    finally:
        hole.close()
    with socket.socket() as client:
        assert wire_state(client, port) == "refused"  # nothing holds the port any more


_PARAMS: dict[str, dict[str, Any]] = {
    "latency": {"latency_s": 0.01},
    "flap": {"loss": 1.0},
    "bandwidth": {"rate_bytes_per_s": 1e6},
}
_WIRE = {"blackhole": "dropped", "refuse": "refused"}  # every other state accepts the connection


@pytest.mark.parametrize("loop_kind", list(LOOPS))
def test_every_state_change_is_complete_before_set_state_first_yields(loop_kind: str) -> None:
    """Changes of many paths started in one loop iteration all take effect in it (the runner relies on
    this): the state is in force, on the wire too, once set_state's first step has run. Only a change that
    opens a listener yields afterwards, on asyncio once, while the loop registers it."""

    async def body() -> None:
        async with Upstream(echo) as up:
            p = NetPath("t1", HOST, up.port, rng_seed=5, clock=ScaledClock())
            port = await p.start()
            try:
                for before in ("open", "blackhole", "refuse"):
                    for after in PathState:
                        await p.set_state(before, **_PARAMS.get(before, {}))
                        change = asyncio.create_task(p.set_state(after, **_PARAMS.get(after, {})))
                        await asyncio.sleep(0)  # resumed after the task's first step, in the next iteration
                        assert p.config.state is after, (before, after)
                        resets = p.counts["reset"]
                        with socket.socket() as client:
                            wire = wire_state(client, port)
                            assert wire == _WIRE.get(after, "accepted"), (before, after)
                            opens_a_listener = wire == "accepted" and before in _WIRE
                            assert change.done() or opens_a_listener, (before, after)
                            await change
                            if wire == "accepted":
                                # Let the path take the connection before the next change closes the listener
                                # (asyncio leaks a socket it accepts just as its listener closes).
                                await wait_for(lambda: p.active > 0 or p.counts["reset"] > resets)  # noqa: B023
                        await p.set_state(after, cut_existing=True, **_PARAMS.get(after, {}))
            finally:
                await p.stop()
            # The loop may still be handing the last connection it accepted to the closed listener.
            await wait_for(lambda: asyncio.all_tasks() == {asyncio.current_task()})

    run_on(loop_kind, body)


async def test_refuse_gives_connection_refused_then_open_serves_the_same_port(path: NetPath) -> None:
    await path.set_state("refuse")
    with pytest.raises(ConnectionRefusedError):
        await connect(path.port)
    await path.set_state("blackhole")  # refuse -> blackhole -> refuse -> open: every listener swap
    await path.set_state("refuse")
    with pytest.raises(ConnectionRefusedError):
        await connect(path.port)
    await path.set_state("open")
    await ping(path.port)


async def test_reset_accepts_then_resets(path: NetPath) -> None:
    await path.set_state("reset")
    reader, writer = await connect(path.port)
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(), 2.0)
    await close(writer)
    assert path.counts["reset"] == 1


async def test_upstream_down_resets_the_client() -> None:
    dead = _sockets.bind(HOST, 0)  # bound, not listening: the dial is refused
    p = NetPath("t1", HOST, dead.getsockname()[1], clock=ScaledClock())
    port = await p.start()
    reader, writer = await connect(port)
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(), 2.0)
    await close(writer)
    assert p.counts["upstream_error"] == 1
    await p.stop()
    dead.close()


async def test_latency_delays_each_direction_by_at_least_the_configured_sim_time(
    echo_server: Upstream,
) -> None:
    p = NetPath("t1", HOST, echo_server.port, clock=ScaledClock(2.0))
    port = await p.start()
    await p.set_state("latency", latency_s=0.3)  # 0.15 s wall each way
    reader, writer = await connect(port)
    t0 = time.monotonic()
    writer.write(b"ping\n")
    assert await asyncio.wait_for(reader.readline(), 2.0) == b"ping\n"
    assert time.monotonic() - t0 >= 2 * 0.15
    await close(writer)
    await p.stop()


async def test_bandwidth_limits_throughput(echo_server: Upstream) -> None:
    p = NetPath("t1", HOST, echo_server.port, clock=ScaledClock(2.0))
    port = await p.start()
    rate_wall = 400_000 * 2.0
    await p.set_state("bandwidth", rate_bytes_per_s=400_000)
    reader, writer = await connect(port)
    data = os.urandom(400_000)
    t0 = time.monotonic()
    writer.write(data)
    assert await asyncio.wait_for(reader.readexactly(len(data)), 5.0) == data
    # Each direction paces 400 kB at 800 kB/s and the echo overlaps them, so the whole trip takes at
    # least one direction's time; only the first slice leaves unpaced.
    slice_bytes = rate_wall * 0.01
    assert time.monotonic() - t0 >= (len(data) - slice_bytes) / rate_wall
    await close(writer)
    await p.stop()


async def test_flap_loses_about_loss_share_of_new_connections(path: NetPath) -> None:
    n, loss = 200, 0.5
    await path.set_state("flap", loss=loss)
    conns = await asyncio.gather(*(connect(path.port) for _ in range(n)))
    await wait_for(lambda: path.counts["relayed"] + path.counts["held"] == n)

    async def answered(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"ping\n")
        try:
            # A relayed connection answers within milliseconds; a held one never does.
            return await asyncio.wait_for(reader.readline(), 0.5) == b"ping\n"
        except TimeoutError:
            return False

    results = await asyncio.gather(*(answered(r, w) for r, w in conns))
    held = results.count(False)
    assert held == path.counts["held"]
    assert abs(held - n * loss) <= 4 * math.sqrt(n * loss * (1 - loss))
    await asyncio.gather(*(close(w) for _, w in conns))


async def test_loss_is_an_alias_of_flap_and_loss_one_holds_everything(path: NetPath) -> None:
    await path.set_state("loss", loss=1.0)
    assert path.config.state is PathState.FLAP
    reader, writer = await connect(path.port)
    writer.write(b"ping\n")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.readline(), 0.3)
    await close(writer)


def test_slot_lost_is_a_fixed_function_of_seed_and_slot_with_the_loss_share() -> None:
    slots = range(-5000, 5000)
    assert not any(slot_lost("s", k, 0.0) for k in slots)
    assert all(slot_lost("s", k, 1.0) for k in slots)
    pattern = [slot_lost("s", k, 0.4) for k in slots]
    assert pattern == [slot_lost("s", k, 0.4) for k in slots]  # no state: the same answer every time
    n = len(pattern)
    assert abs(sum(pattern) - 0.4 * n) <= 4 * math.sqrt(n * 0.4 * 0.6)
    assert pattern != [slot_lost("other seed", k, 0.4) for k in slots]
    # A higher loss holds a superset of the slots a lower one holds: one uniform draw per slot.
    assert all(slot_lost("s", k, 0.6) for k, lost in zip(slots, pattern, strict=True) if lost)


async def test_flap_with_a_period_holds_whole_slots_of_sim_time(echo_server: Upstream) -> None:
    clock = PinnedClock()
    p = NetPath("t1", HOST, echo_server.port, rng_seed="seed-1", clock=clock)
    await p.start()
    try:
        await p.set_state("flap", loss=0.5, period_s=2.0)
        assert p.config.period_s == 2.0
        lost = [k for k in range(40) if slot_lost("seed-1", k, 0.5)]
        kept = [k for k in range(40) if not slot_lost("seed-1", k, 0.5)]
        assert lost and kept
        for slot in (lost[0], kept[0]):
            for offset in (0.0, 1.0, 1.999):  # every connection of a slot shares its fate
                clock.set(slot * 2.0 + offset)
                reader, writer = await connect(p.port)
                writer.write(b"ping\n")
                if slot in lost:
                    with pytest.raises(TimeoutError):
                        await asyncio.wait_for(reader.readline(), 0.3)
                else:
                    assert await asyncio.wait_for(reader.readline(), 2.0) == b"ping\n"
                await close(writer)
        await wait_for(lambda: p.counts["held"] == 3 and p.counts["relayed"] == 3)
    finally:
        await p.stop()


async def test_flap_with_a_period_gives_the_same_pattern_to_paths_with_the_same_seed(echo_server: Upstream) -> None:
    # Two runs of a scenario: the same seed and sim times, connections arriving in a different order and number.
    async def pattern(times: list[float]) -> list[bool]:
        clock = PinnedClock()
        p = NetPath("t1", HOST, echo_server.port, rng_seed="s", clock=clock)
        await p.start()
        try:
            await p.set_state("flap", loss=0.4, period_s=1.0)
            held = []
            for t in times:
                clock.set(t)
                before = p.counts["held"]
                _, writer = await connect(p.port)
                await wait_for(lambda: p.counts["held"] + p.counts["relayed"] > len(held))
                held.append(p.counts["held"] > before)
                await close(writer)
            return held
        finally:
            await p.stop()

    first = await pattern([0.5, 1.5, 2.5, 3.5, 4.5, 5.5])
    second = await pattern([5.5, 0.2, 4.9, 3.1, 2.7, 1.1, 0.9])
    by_slot = dict(zip([0, 1, 2, 3, 4, 5], first, strict=True))
    assert second == [by_slot[5], by_slot[0], by_slot[4], by_slot[3], by_slot[2], by_slot[1], by_slot[0]]


async def test_state_change_spares_live_connections_unless_cut(path: NetPath) -> None:
    reader, writer = await connect(path.port)
    writer.write(b"one\n")
    assert await reader.readline() == b"one\n"

    await path.set_state("refuse")
    with pytest.raises(ConnectionRefusedError):
        await connect(path.port)
    writer.write(b"two\n")  # accepted under `open`, so still relayed
    assert await asyncio.wait_for(reader.readline(), 2.0) == b"two\n"

    await path.set_state("open", cut_existing=True)
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(), 2.0)
    await close(writer)
    assert path.counts["cut"] == 1
    await ping(path.port)


async def test_stop_releases_every_socket_and_task() -> None:
    before = open_sockets()
    async with Upstream(echo) as up:
        p = NetPath("t1", HOST, up.port, rng_seed=3, clock=ScaledClock())
        port = await p.start()
        relayed = await connect(port)
        relayed[1].write(b"hi\n")
        assert await relayed[0].readline() == b"hi\n"
        await p.set_state("latency", latency_s=5.0)  # data stuck in a delay queue
        delayed = await connect(port)
        delayed[1].write(b"late\n")
        await p.set_state("flap", loss=1.0)
        held = await connect(port)
        await wait_for(lambda: p.counts["held"] == 1)
        await p.set_state("blackhole")
        stuck = socket.socket()  # its SYN is dropped: the connect stays pending
        stuck.setblocking(False)
        assert stuck.connect_ex((HOST, port)) == errno.EINPROGRESS

        await p.stop()
        assert p.active == 0
        for reader, writer in (relayed, delayed, held):
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(), 2.0)
            await close(writer)
        stuck.close()
    assert open_sockets() == before
    assert asyncio.all_tasks() == {asyncio.current_task()}
    # The port is free again: something else can listen on it.
    probe = socket.socket()
    probe.bind((HOST, port))
    probe.close()


async def test_rejects_bad_states_and_parameters_without_change(path: NetPath) -> None:
    await path.set_state("latency", latency_s=0.1)
    for state, params in (
        ("sideways", {}),
        ("latency", {}),
        ("latency", {"latency_s": -1}),
        ("latency", {"latency_s": True}),
        ("latency", {"latency_s": "1"}),
        ("latency", {"latency_s": float("nan")}),
        ("flap", {"loss": 1.5}),
        ("flap", {"loss": 0.5, "period_s": -1}),
        ("flap", {"loss": 0.5, "period_s": 1e-310}),
        ("flap", {"period_s": 1}),
        ("bandwidth", {"rate_bytes_per_s": 0}),
        ("open", {"latency_s": 1}),
    ):
        with pytest.raises(ValueError):
            await path.set_state(state, **params)
        assert path.config == PathConfig(PathState.LATENCY, latency_s=0.1)


def test_could_serve_rule() -> None:
    for mode in ("healthy", "slow"):
        for state in ("open", "latency", "bandwidth"):
            assert could_serve(mode, state)
        assert could_serve(mode, "flap", 0.49)
        assert could_serve(mode, "loss", 0.0)
        assert not could_serve(mode, "flap", 0.5)
        for state in ("blackhole", "refuse", "reset"):
            assert not could_serve(mode, state)
    for mode in ("unhealthy", "hang", "crash"):
        assert not could_serve(mode, "open")
