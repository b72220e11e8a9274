"""Socket semantics every world must share: each test body runs on real asyncio, real uvloop and the sim world.

Real worlds use the kernel's loopback sockets; the sim world its in-memory network, where times are exact
(one one-way latency per packet; the SYN retransmit schedule of worlds.sim.net). Waits are event-driven
(`add_reader`/`add_writer` futures) and bounded; the only deliberate delays are the scenario's own (draining a
full accept queue at 1.5 s) and they are waits that must time out.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import struct
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import aiohttp
import dns.asyncquery
import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from aiohttp import web

from worlds.base import Network, World
from worlds.real import RealWorld, uvloop_available
from worlds.sim import SimDeadlock, SimWorld
from worlds.sim.net import SYN_RETRANSMIT_AT_S, SYN_TIMEOUT_AT_S

T = TypeVar("T")
HOST = "127.0.0.1"
LINGER_RST = struct.pack("ii", 1, 0)
BOUND_S = 2.0  # the longest any real-world wait may take before the test fails (a loopback event is ~us)


def exactly(seconds: float) -> Any:
    """A sim time: exact but for float rounding in the subtraction."""
    return pytest.approx(seconds, abs=1e-12)


@dataclass
class Harness:
    """One world as the tests see it: run a coroutine, make sockets, and (sim only) exact expectations."""

    kind: str  # "asyncio", "uvloop" or "sim"
    world: RealWorld | SimWorld

    @property
    def sim(self) -> bool:
        return self.kind == "sim"

    @property
    def network(self) -> Network:
        return self.world.network

    @property
    def lat(self) -> float:
        """The sim network's one-way latency (sim only)."""
        assert isinstance(self.world, SimWorld)
        return self.world.network.latency_s

    def run(self, main: Coroutine[Any, Any, T]) -> T:
        return self.world.run(main)


@pytest.fixture(params=["asyncio", "uvloop", "sim"])
def w(request: pytest.FixtureRequest) -> Iterator[Harness]:
    kind: str = request.param
    if kind == "uvloop" and not uvloop_available():
        pytest.skip("uvloop is not installed")
    world: RealWorld | SimWorld
    world = SimWorld() if kind == "sim" else RealWorld(loop="uvloop" if kind == "uvloop" else "asyncio")
    yield Harness(kind, world)


@pytest.fixture
def sim() -> Harness:
    return Harness("sim", SimWorld())


# -- helpers -------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def sockets(net: Network) -> Iterator[Callable[..., socket.socket]]:
    """A factory of non-blocking sockets on `net`, all closed on exit."""
    made: list[socket.socket] = []

    def make(family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
        s = net.socket(family, type)
        made.append(s)
        s.setblocking(False)
        return s

    try:
        yield make
    finally:
        for s in made:
            s.close()


async def ready(sock: socket.socket, *, write: bool, within: float = BOUND_S) -> None:
    """Wait until `sock` is readable (or writable); TimeoutError after `within` loop seconds."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def fire() -> None:
        if not fut.done():
            fut.set_result(None)

    if write:
        loop.add_writer(fd, fire)
    else:
        loop.add_reader(fd, fire)
    try:
        await asyncio.wait_for(fut, within)
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


def listener(make: Callable[..., socket.socket], backlog: int = 16, host: str = HOST) -> socket.socket:
    s = make()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, 0))
    s.listen(backlog)
    return s


async def connect(sock: socket.socket, addr: tuple[Any, ...]) -> None:
    """Non-blocking connect: EINPROGRESS (or 0), then writable with SO_ERROR 0."""
    err = sock.connect_ex(addr)
    assert err in (0, errno.EINPROGRESS)
    if err:
        await ready(sock, write=True)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0


async def pair(make: Callable[..., socket.socket]) -> tuple[socket.socket, socket.socket]:
    """An established (client, server-side) pair of raw sockets."""
    lst = listener(make)
    client = make()
    await connect(client, lst.getsockname())
    await ready(lst, write=False)
    conn, peer = lst.accept()
    conn.setblocking(False)
    assert peer == client.getsockname()
    return client, conn


async def refused(sock: socket.socket, addr: tuple[Any, ...]) -> None:
    """The connect is refused: ECONNREFUSED at once, or EINPROGRESS and then SO_ERROR ECONNREFUSED."""
    err = sock.connect_ex(addr)
    if err == errno.EINPROGRESS:
        await ready(sock, write=True)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    assert err == errno.ECONNREFUSED


# -- TCP: handshake ----------------------------------------------------------------------------------------------


def test_listen_accept_and_data_both_ways(w: Harness) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        with sockets(w.network) as make:
            lst = listener(make)
            client = make()
            t0 = loop.time()
            err = client.connect_ex(lst.getsockname())
            assert err in (0, errno.EINPROGRESS)
            with contextlib.suppress(BlockingIOError):  # loopback has usually finished the handshake already
                client.send(b"early")
            await ready(client, write=True)
            t_connected = loop.time()
            assert client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
            assert client.getpeername() == lst.getsockname()
            await ready(lst, write=False)
            t_accept = loop.time()
            conn, peer = lst.accept()
            conn.setblocking(False)
            assert peer == client.getsockname() == conn.getpeername()
            assert conn.getsockname() == lst.getsockname()
            client.sendall(b"ping")
            got = b""
            while not got.endswith(b"ping"):
                await ready(conn, write=False)
                got += conn.recv(100)
            assert got in (b"ping", b"earlyping")
            conn.sendall(b"pong")
            await ready(client, write=False)
            assert client.recv(100) == b"pong"
            if w.sim:
                assert t_connected - t0 == exactly(2 * w.lat)  # SYN, SYN-ACK
                assert t_accept - t0 == exactly(3 * w.lat)  # ... and the ACK

    w.run(main())


def test_connect_to_bound_not_listening_port_is_refused(w: Harness) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        with sockets(w.network) as make:
            bound = make()
            bound.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            bound.bind((HOST, 0))
            client = make()
            t0 = loop.time()
            await refused(client, bound.getsockname())
            if w.sim:
                assert loop.time() - t0 == exactly(2 * w.lat)  # SYN, RST
            # asyncio's own connect paths report it as ConnectionRefusedError
            with pytest.raises(ConnectionRefusedError):
                await loop.sock_connect(make(), bound.getsockname())
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection(*bound.getsockname())
            # ... and the same port listens once the socket that holds it does
            bound.listen(4)
            _, writer = await asyncio.wait_for(asyncio.open_connection(*bound.getsockname()), BOUND_S)
            writer.close()
            await writer.wait_closed()

    w.run(main())


def test_connect_to_closed_port_is_refused(w: Harness) -> None:
    async def main() -> None:
        with sockets(w.network) as make:
            gone = make()
            gone.bind((HOST, 0))
            addr = gone.getsockname()
            gone.close()
            await refused(make(), addr)

    w.run(main())


def test_bind_conflicts_and_reuse(w: Harness) -> None:
    async def main() -> None:
        with sockets(w.network) as make:
            a = make()
            a.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            a.bind((HOST, 0))
            port = a.getsockname()[1]
            assert port > 0
            plain = make()
            with pytest.raises(OSError) as e:
                plain.bind(("0.0.0.0", port))  # the wildcard overlaps 127.0.0.1
            assert e.value.errno == errno.EADDRINUSE
            other_addr = make()
            other_addr.bind(("127.0.0.2", port))  # another loopback address: another address
            b = make()
            b.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            b.bind((HOST, port))  # both SO_REUSEADDR, neither listening: allowed
            b.listen(1)
            with pytest.raises(OSError) as e:
                a.listen(1)  # ... but only one of them may listen
            assert e.value.errno == errno.EADDRINUSE
            c = make()
            c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with pytest.raises(OSError) as e:
                c.bind((HOST, port))  # nor bind next to a listener
            assert e.value.errno == errno.EADDRINUSE
            with pytest.raises(OSError) as e:
                make().bind(("10.255.255.1", 0))
            assert e.value.errno == errno.EADDRNOTAVAIL

    w.run(main())


def test_listeners_on_two_loopback_addresses_share_a_port(w: Harness) -> None:
    async def main() -> None:
        with sockets(w.network) as make:
            one = listener(make, host="127.0.0.1")
            port = one.getsockname()[1]
            two = make()
            two.bind(("127.0.1.1", port))
            two.listen(4)
            client = make()
            await connect(client, ("127.0.1.1", port))
            await ready(two, write=False)
            conn, _ = two.accept()
            assert conn.getsockname() == ("127.0.1.1", port)
            with pytest.raises(BlockingIOError):
                one.accept()

    w.run(main())


def test_wildcard_listener_takes_every_loopback_address(w: Harness) -> None:
    async def main() -> None:
        with sockets(w.network) as make:
            lst = listener(make, host="0.0.0.0")
            port = lst.getsockname()[1]
            client = make()
            await connect(client, ("127.0.0.5", port))
            await ready(lst, write=False)
            conn, peer = lst.accept()
            with conn:
                assert conn.getsockname() == ("127.0.0.5", port)
                assert peer == client.getsockname() and peer[0] == "127.0.0.1"

    w.run(main())


def test_ipv6_loopback(w: Harness) -> None:
    if not w.sim and not socket.has_ipv6:
        pytest.skip("this kernel has no IPv6")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with sockets(w.network) as make:
            lst = make(socket.AF_INET6)
            try:
                lst.bind(("::1", 0))
            except OSError as e:
                pytest.skip(f"no IPv6 loopback here: {e}")
            lst.listen(4)
            addr = lst.getsockname()
            assert addr[0] == "::1" and len(addr) == 4
            client = make(socket.AF_INET6)
            await asyncio.wait_for(loop.sock_connect(client, addr), BOUND_S)
            assert client.getpeername() == addr
            conn, peer = await asyncio.wait_for(loop.sock_accept(lst), BOUND_S)
            with conn:
                assert peer == client.getsockname() and peer[0] == "::1"

    w.run(main())


def test_loop_sock_methods_move_more_than_a_buffer(w: Harness) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        with sockets(w.network) as make:
            lst = listener(make)
            client = make()
            accepting = asyncio.ensure_future(loop.sock_accept(lst))
            await asyncio.wait_for(loop.sock_connect(client, lst.getsockname()), BOUND_S)
            conn, peer = await asyncio.wait_for(accepting, BOUND_S)
            with conn:
                assert peer == client.getsockname()
                payload = bytes(range(256)) * 8192  # 2 MiB
                got = bytearray()

                async def receive() -> None:
                    buf = bytearray(65536)
                    while len(got) < len(payload):
                        n = await loop.sock_recv_into(conn, buf)
                        assert n > 0
                        got.extend(buf[:n])

                receiving = asyncio.ensure_future(receive())
                await asyncio.wait_for(loop.sock_sendall(client, payload), BOUND_S)
                await asyncio.wait_for(receiving, BOUND_S)
                assert bytes(got) == payload
                await loop.sock_sendall(conn, b"bye")
                assert await asyncio.wait_for(loop.sock_recv(client, 10), BOUND_S) == b"bye"

    w.run(main())


# -- TCP: the accept queue --------------------------------------------------------------------------------------


def test_full_accept_queue_drops_syns_until_drained(w: Harness) -> None:
    """listen(0) admits one connection; a second connect hangs, and connects at the SYN retransmit that follows
    the drain (the kernel resends SYNs 1 s apart at first: drained at 1.5 s, it connects at the 2 s one)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with sockets(w.network) as make:
            lst = listener(make, backlog=0)
            filler = make()
            await connect(filler, lst.getsockname())
            await ready(lst, write=False)  # the filler is on the accept queue, so it is full
            client = make()
            t0 = loop.time()
            assert client.connect_ex(lst.getsockname()) == errno.EINPROGRESS
            with pytest.raises(asyncio.TimeoutError):
                await ready(client, write=True, within=1.5)
            if w.sim:
                assert loop.time() - t0 == exactly(1.5)
            with pytest.raises(OSError) as e:
                client.getpeername()
            assert e.value.errno == errno.ENOTCONN
            conn, _ = lst.accept()  # drain: room for one more
            conn.close()
            await ready(client, write=True, within=BOUND_S)
            took = loop.time() - t0
            assert client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
            assert client.getpeername() == lst.getsockname()
            if w.sim:
                assert took == pytest.approx(SYN_RETRANSMIT_AT_S[1] + 2 * w.lat, abs=1e-9)
            else:
                assert SYN_RETRANSMIT_AT_S[1] - 0.1 <= took < SYN_RETRANSMIT_AT_S[2]

    w.run(main())


def test_full_accept_queue_times_out_an_asyncio_connect(w: Harness) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        with sockets(w.network) as make:
            lst = listener(make, backlog=0)
            await connect(make(), lst.getsockname())
            await ready(lst, write=False)
            t0 = loop.time()
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.open_connection(*lst.getsockname()), 0.5)
            if w.sim:
                assert loop.time() - t0 == exactly(0.5)
            else:
                assert 0.5 <= loop.time() - t0 < 0.5 + BOUND_S

    w.run(main())


def test_closing_a_listener_resets_unaccepted_connections(w: Harness) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        with sockets(w.network) as make:
            lst = listener(make)
            client = make()
            await connect(client, lst.getsockname())
            await ready(lst, write=False)  # queued, never accepted
            lst.close()
            t_close = loop.time()
            await ready(client, write=False)
            if w.sim:
                assert loop.time() - t_close == exactly(w.lat)
            with pytest.raises(ConnectionResetError):
                client.recv(100)
            assert client.recv(100) == b""

    w.run(main())


# -- TCP: RST ---------------------------------------------------------------------------------------------------


def test_linger_zero_close_resets_the_peer(w: Harness) -> None:
    """After an RST: recv raises ECONNRESET once, then reads EOF; send raises ECONNRESET, then EPIPE;
    shutdown raises ENOTCONN."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with sockets(w.network) as make:
            by_recv, by_send, by_shutdown = [await pair(make) for _ in range(3)]
            for _, conn in (by_recv, by_send, by_shutdown):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
                conn.close()
            t_close = loop.time()
            for client, _ in (by_recv, by_send, by_shutdown):
                await ready(client, write=False)  # the RST has arrived; nothing has read it yet
            if w.sim:
                assert loop.time() - t_close == exactly(w.lat)
            client = by_recv[0]
            with pytest.raises(ConnectionResetError):
                client.recv(100)
            assert client.recv(100) == b""
            with pytest.raises(BrokenPipeError):
                client.send(b"x")
            client = by_send[0]
            with pytest.raises(ConnectionResetError):
                client.send(b"x")
            with pytest.raises(BrokenPipeError):
                client.send(b"x")
            client = by_shutdown[0]
            with pytest.raises(OSError) as e:
                client.shutdown(socket.SHUT_WR)
            assert e.value.errno == errno.ENOTCONN

    w.run(main())


def test_close_with_unread_data_resets_the_peer(w: Harness) -> None:
    async def main() -> None:
        with sockets(w.network) as make:
            client, conn = await pair(make)
            client.sendall(b"never read")
            await ready(conn, write=False)  # it has arrived
            conn.close()
            await ready(client, write=False)
            with pytest.raises(ConnectionResetError):
                client.recv(100)

    w.run(main())


def test_data_to_a_closed_socket_resets_the_sender(w: Harness) -> None:
    async def main() -> None:
        with sockets(w.network) as make:
            client, conn = await pair(make)
            conn.close()  # graceful: FIN
            await ready(client, write=False)
            assert client.recv(100) == b""
            loop = asyncio.get_running_loop()
            deadline = loop.time() + BOUND_S
            sent = 0
            # Sends succeed locally until the peer's RST is back (nothing signals its arrival: the socket is
            # readable and writable throughout). In CLOSE_WAIT (FIN seen) the RST reads as EPIPE, not ECONNRESET.
            with pytest.raises(BrokenPipeError):
                while loop.time() < deadline:
                    sent += client.send(b"into the void")
                    await asyncio.sleep(0.001)
            assert sent > 0
            with pytest.raises(BrokenPipeError):
                client.send(b"x")

    w.run(main())


class Recorder(asyncio.Protocol):
    """A protocol that remembers what happened to it."""

    def __init__(self, keep_open_on_eof: bool = False) -> None:
        self.transport: asyncio.Transport | None = None
        self.made: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.data = bytearray()
        self.eof = False
        self.keep_open_on_eof = keep_open_on_eof
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.eof_seen: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.paused = 0
        self.resumed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.received: asyncio.Event = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio.Transport
        self.made.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.received.set()

    def eof_received(self) -> bool:
        self.eof = True
        if not self.eof_seen.done():
            self.eof_seen.set_result(None)
        return self.keep_open_on_eof

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)

    def pause_writing(self) -> None:
        self.paused += 1

    def resume_writing(self) -> None:
        if not self.resumed.done():
            self.resumed.set_result(None)


async def recording_server(keep_open_on_eof: bool = False) -> tuple[asyncio.Server, asyncio.Future[Recorder]]:
    """A server on HOST, an ephemeral port, and the future of the `Recorder` of its first connection."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[Recorder] = loop.create_future()

    def factory() -> Recorder:
        p = Recorder(keep_open_on_eof=keep_open_on_eof)
        if not accepted.done():
            accepted.set_result(p)
        return p

    return await loop.create_server(factory, HOST, 0), accepted

def test_rst_reaches_an_asyncio_protocol_as_connection_reset(w: Harness) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server, accepted = await recording_server()
        _, client = await loop.create_connection(Recorder, *server.sockets[0].getsockname())
        peer = await asyncio.wait_for(accepted, BOUND_S)
        await asyncio.wait_for(peer.made, BOUND_S)  # connection_made runs one loop pass after accept
        assert peer.transport is not None
        sock = peer.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        peer.transport.abort()
        exc = await asyncio.wait_for(client.lost, BOUND_S)
        assert isinstance(exc, ConnectionResetError)
        server.close()
        await server.wait_closed()

    w.run(main())


# -- TCP: FIN and half-close ------------------------------------------------------------------------------------


def test_half_close_raw(w: Harness) -> None:
    async def main() -> None:
        with sockets(w.network) as make:
            client, conn = await pair(make)
            client.sendall(b"request")
            client.shutdown(socket.SHUT_WR)
            got = b""
            while True:
                await ready(conn, write=False)
                chunk = conn.recv(100)
                if not chunk:
                    break
                got += chunk
            assert got == b"request"
            assert conn.recv(100) == b""  # EOF again, and again
            assert conn.recv(100) == b""
            conn.sendall(b"response")  # the other direction still flows
            await ready(client, write=False)
            assert client.recv(100) == b"response"
            with pytest.raises(BrokenPipeError):
                client.send(b"after shutdown")

    w.run(main())


def test_eof_received_true_keeps_the_other_direction_open(w: Harness) -> None:
    async def main() -> None:
        server, served = await recording_server(keep_open_on_eof=True)
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
        writer.write(b"question")
        writer.write_eof()
        peer = await asyncio.wait_for(served, BOUND_S)
        await asyncio.wait_for(peer.eof_seen, BOUND_S)
        assert bytes(peer.data) == b"question"
        assert peer.transport is not None and not peer.transport.is_closing()
        peer.transport.write(b"answer after your EOF")
        peer.transport.close()
        assert await asyncio.wait_for(reader.read(), BOUND_S) == b"answer after your EOF"
        assert await asyncio.wait_for(peer.lost, BOUND_S) is None
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()

    w.run(main())


# -- TCP: back-pressure -----------------------------------------------------------------------------------------


def test_back_pressure_raw(w: Harness) -> None:
    async def main() -> None:
        with sockets(w.network) as make:
            client, conn = await pair(make)
            chunk = b"x" * 65536
            sent = 0
            limit = 64 * 1024 * 1024
            with pytest.raises(BlockingIOError):
                while sent < limit:
                    sent += client.send(chunk)
            assert 0 < sent < limit  # finite
            with pytest.raises(asyncio.TimeoutError):
                await ready(client, write=True, within=0.05)  # stays unwritable while nobody reads
            drained = 0
            while True:
                try:
                    got = conn.recv(1 << 20)
                except BlockingIOError:
                    break
                drained += len(got)
            assert drained > 0
            await ready(client, write=True)
            assert client.send(chunk) > 0

    w.run(main())


def test_back_pressure_pauses_and_resumes_an_asyncio_writer(w: Harness) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        served: asyncio.Future[Recorder] = loop.create_future()

        class Stalled(Recorder):
            # Stops reading at its first data (uvloop ignores a pause_reading() made in connection_made).
            def data_received(self, data: bytes) -> None:
                super().data_received(data)
                assert self.transport is not None
                if not served.done():
                    self.transport.pause_reading()
                    served.set_result(self)

        server = await loop.create_server(Stalled, HOST, 0)
        transport, client = await loop.create_connection(Recorder, *server.sockets[0].getsockname())
        chunk = b"y" * 65536
        written = 0
        limit = 64 * 1024 * 1024
        while not client.paused and written < limit:
            transport.write(chunk)
            written += len(chunk)
            await asyncio.sleep(0)  # let sends and acks happen
        assert client.paused == 1, f"no pause_writing after {written} bytes"
        assert not client.resumed.done()
        peer = await asyncio.wait_for(served, BOUND_S)
        assert peer.transport is not None
        peer.transport.resume_reading()
        await asyncio.wait_for(client.resumed, BOUND_S)
        transport.close()
        server.close()
        await server.wait_closed()

    w.run(main())


# -- UDP --------------------------------------------------------------------------------------------------------


def test_udp_keeps_boundaries_and_drops_to_unbound_ports(w: Harness) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        with sockets(w.network) as make:
            a = make(type=socket.SOCK_DGRAM)
            a.bind((HOST, 0))
            b = make(type=socket.SOCK_DGRAM)
            b.bind((HOST, 0))
            gone = make(type=socket.SOCK_DGRAM)
            gone.bind((HOST, 0))
            nobody = gone.getsockname()
            gone.close()
            assert a.sendto(b"into nowhere", nobody) == 12  # no error for an unconnected socket
            t0 = loop.time()
            messages = [b"one", b"two two", b"x" * 1000]
            for m in messages:
                assert a.sendto(m, b.getsockname()) == len(m)
            got: list[tuple[bytes, Any]] = []
            while len(got) < len(messages):
                await ready(b, write=False)
                got.append(b.recvfrom(65536))
            if w.sim:
                assert loop.time() - t0 == exactly(w.lat)
            assert got == [(m, a.getsockname()) for m in messages]
            assert a.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
            with pytest.raises(BlockingIOError):
                a.recvfrom(100)
            # a truncated read drops the datagram's rest, as the kernel does
            a.sendto(b"0123456789", b.getsockname())
            await ready(b, write=False)
            assert b.recvfrom(4) == (b"0123", a.getsockname())
            with pytest.raises(BlockingIOError):
                b.recvfrom(100)

    w.run(main())


def test_udp_connected_socket_sees_port_unreachable(w: Harness) -> None:
    async def main() -> None:
        with sockets(w.network) as make:
            gone = make(type=socket.SOCK_DGRAM)
            gone.bind((HOST, 0))
            nobody = gone.getsockname()
            gone.close()
            c = make(type=socket.SOCK_DGRAM)
            c.connect(nobody)
            assert c.getpeername() == nobody
            c.send(b"hello?")
            await ready(c, write=False)
            with pytest.raises(ConnectionRefusedError):
                c.recv(100)
            with pytest.raises(BlockingIOError):
                c.recv(100)

    w.run(main())


class Datagrams(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        loop = asyncio.get_running_loop()
        self.got: asyncio.Queue[tuple[bytes, Any]] = asyncio.Queue()
        self.error: asyncio.Future[Exception] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.got.put_nowait((data, addr))

    def error_received(self, exc: Exception) -> None:
        if not self.error.done():
            self.error.set_result(exc)


def test_asyncio_datagram_endpoints(w: Harness) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        st, server = await loop.create_datagram_endpoint(Datagrams, local_addr=(HOST, 0))
        ct, client = await loop.create_datagram_endpoint(Datagrams, remote_addr=st.get_extra_info("sockname"))
        dead_t, dead = None, None
        try:
            ct.sendto(b"ping")
            data, addr = await asyncio.wait_for(server.got.get(), BOUND_S)
            assert data == b"ping" and addr == ct.get_extra_info("sockname")
            st.sendto(b"pong", addr)
            assert await asyncio.wait_for(client.got.get(), BOUND_S) == (b"pong", st.get_extra_info("sockname"))
            with sockets(w.network) as make:
                gone = make(type=socket.SOCK_DGRAM)
                gone.bind((HOST, 0))
                nobody = gone.getsockname()
            dead_t, dead = await loop.create_datagram_endpoint(Datagrams, remote_addr=nobody)
            dead_t.sendto(b"anyone?")
            assert isinstance(await asyncio.wait_for(dead.error, BOUND_S), ConnectionRefusedError)
        finally:
            for t in (st, ct, dead_t):
                if t is not None:
                    t.close()

    w.run(main())


def test_create_server_on_several_hosts(w: Harness) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(asyncio.Protocol, ["127.0.0.1", "127.0.0.2"], 0)
        try:
            addrs = sorted(s.getsockname() for s in server.sockets)
            assert [a[0] for a in addrs] == ["127.0.0.1", "127.0.0.2"]
            for addr in addrs:
                _, writer = await asyncio.wait_for(asyncio.open_connection(*addr), BOUND_S)
                writer.close()
                await writer.wait_closed()
        finally:
            server.close()
            await server.wait_closed()

    w.run(main())


# -- libraries: aiohttp and dnspython ---------------------------------------------------------------------------


def test_aiohttp_server_and_client_session(w: Harness) -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"hello {request.query.get('n', '?')}")

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/", hello)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, HOST, 0)
        await site.start()
        server = site._server
        assert server is not None
        port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        try:
            timeout = aiohttp.ClientTimeout(total=BOUND_S)
            async with aiohttp.ClientSession(connector=w.world.network.http_connector(), timeout=timeout) as session:
                for n in range(3):  # the pool reuses the connection
                    async with session.get(f"http://{HOST}:{port}/", params={"n": str(n)}) as resp:
                        assert resp.status == 200
                        assert await resp.text() == f"hello {n}"
                        date = resp.headers["Date"]
                async with session.get(f"http://localhost:{port}/") as resp:
                    assert await resp.text() == "hello ?"
            if w.sim:
                assert date == "Thu, 01 Jan 2026 00:00:00 GMT"  # virtual, not today's
        finally:
            await runner.cleanup()

    w.run(main())


class DnsResponder(asyncio.DatagramProtocol):
    """Answers every A query with 192.0.2.1."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # asyncio 3.11's is not a DatagramTransport

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        response.answer.append(dns.rrset.from_text(query.question[0].name, 60, "IN", "A", "192.0.2.1"))
        assert self.transport is not None
        self.transport.sendto(response.to_wire(), addr)


def test_dnspython_udp_query_and_timeout(w: Harness) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(DnsResponder, local_addr=(HOST, 0))
        port = transport.get_extra_info("sockname")[1]
        try:
            query = dns.message.make_query("svc.example.", "A", id=4242)
            t0 = loop.time()
            answer = await dns.asyncquery.udp(query, HOST, port=port, timeout=BOUND_S)
            assert answer.id == 4242 and answer.rcode() == dns.rcode.NOERROR
            assert [rr.address for rr in answer.answer[0]] == ["192.0.2.1"]
            if w.sim:
                assert loop.time() - t0 == exactly(2 * w.lat)
            with sockets(w.network) as make:  # a port nobody answers on
                silent = make(type=socket.SOCK_DGRAM)
                silent.bind((HOST, 0))
                t0 = loop.time()
                with pytest.raises(dns.exception.Timeout):
                    await dns.asyncquery.udp(query, HOST, port=silent.getsockname()[1], timeout=0.5)
                took = loop.time() - t0
            if w.sim:
                assert took == pytest.approx(0.5, abs=1e-9)
            else:
                assert 0.45 <= took < 0.5 + BOUND_S
        finally:
            transport.close()

    w.run(main())


# -- sim only ---------------------------------------------------------------------------------------------------


def test_sim_deadlock_is_an_error(sim: Harness) -> None:
    async def main() -> None:
        await asyncio.get_running_loop().create_future()  # nothing will ever complete it

    with pytest.raises(SimDeadlock, match="no timer is pending"):
        sim.run(main())


def test_sim_timers_at_one_time_run_first_in_first_out(sim: Harness) -> None:
    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        order: list[int] = []
        done = loop.create_future()
        for i in range(40):
            if i % 2:
                loop.call_at(1.0, order.append, i)
            else:
                loop.call_later(1.0, order.append, i)  # from t=0 this is the same deadline
        loop.call_at(1.0, done.set_result, None)
        await done
        assert loop.time() == 1.0
        return order

    assert sim.run(main()) == list(range(40))


def test_sim_run_in_executor_is_refused(sim: Harness) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        with pytest.raises(RuntimeError, match="runs no threads"):
            await loop.run_in_executor(None, time.sleep, 0)
        with pytest.raises(RuntimeError, match="runs no threads"):
            await asyncio.to_thread(time.sleep, 0)

    sim.run(main())


def test_sim_getaddrinfo_knows_literals_and_localhost_only(sim: Harness) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo("localhost", 80, type=socket.SOCK_STREAM)
        assert [i[4] for i in infos] == [("127.0.0.1", 80)]
        infos = await loop.getaddrinfo("::1", "53", type=socket.SOCK_DGRAM)
        assert [i[4] for i in infos] == [("::1", 53, 0, 0)]
        with pytest.raises(socket.gaierror):
            await loop.getaddrinfo("backend.example", 80)

    sim.run(main())


@pytest.mark.parametrize(("drain_at", "connects_at"), [(0.5, 1.0), (4.5, 5.0), (5.5, 7.0), (8.0, 11.0)])
def test_sim_syn_retransmit_schedule(sim: Harness, drain_at: float, connects_at: float) -> None:
    """Linux 6.18 on this project's CI box connected at 5.12, 7.14 and 11.26 s after drains at 4.5, 5.5 and 8 s."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with sockets(sim.network) as make:
            lst = listener(make, backlog=0)
            await connect(make(), lst.getsockname())
            await ready(lst, write=False)
            client = make()
            t0 = loop.time()
            assert client.connect_ex(lst.getsockname()) == errno.EINPROGRESS
            loop.call_at(t0 + drain_at, lambda: lst.accept()[0].close())
            await ready(client, write=True, within=200)
            assert loop.time() - t0 == pytest.approx(connects_at + 2 * sim.lat, abs=1e-9)
            assert client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0

    sim.run(main())


def test_sim_syn_retries_give_up_with_etimedout(sim: Harness) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        with sockets(sim.network) as make:
            lst = listener(make, backlog=0)
            await connect(make(), lst.getsockname())
            await ready(lst, write=False)
            client = make()
            t0 = loop.time()
            assert client.connect_ex(lst.getsockname()) == errno.EINPROGRESS
            await ready(client, write=True, within=1000)
            assert loop.time() - t0 == SYN_TIMEOUT_AT_S
            assert client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ETIMEDOUT

    sim.run(main())


def workload(world: SimWorld) -> list[tuple[float, str]]:
    """A mixed run (TCP handshakes, data, RSTs, refusals, a full queue, UDP, timers) and its event trace."""
    trace: list[tuple[float, str]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        rng = world.rng("workload")

        def note(event: str) -> None:
            trace.append((loop.time(), event))

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            data = await reader.read(100)
            note(f"server got {data!r} from {writer.get_extra_info('peername')}")
            writer.write(data[::-1])
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(echo, HOST, 0)
        port = server.sockets[0].getsockname()[1]

        async def client(i: int) -> None:
            await asyncio.sleep(rng.random() * 0.01)
            try:
                reader, writer = await asyncio.open_connection(HOST, port + (i % 4 == 3))
            except ConnectionRefusedError:
                note(f"client {i} refused")
                return
            writer.write(f"msg{i}".encode())
            note(f"client {i} got {await reader.read()!r}")
            writer.close()

        await asyncio.gather(*(client(i) for i in range(12)))
        with sockets(world.network) as make:
            lst = listener(make, backlog=0)
            await connect(make(), lst.getsockname())
            probe = make()
            probe.connect_ex(lst.getsockname())
            loop.call_later(2.5, lambda: note(f"drain fd {lst.accept()[0].fileno()}"))
            await ready(probe, write=True, within=10)
            note(f"probe connected as {probe.getsockname()}")
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
            u1, u2 = make(type=socket.SOCK_DGRAM), make(type=socket.SOCK_DGRAM)
            u2.bind((HOST, 0))
            u1.sendto(b"dgram", u2.getsockname())
            await ready(u2, write=False)
            note(f"udp {u2.recvfrom(100)}")
        server.close()
        await server.wait_closed()
        note("end")

    world.run(main())
    return trace


def test_sim_two_runs_of_a_seed_trace_the_same() -> None:
    first = workload(SimWorld(seed=7))
    second = workload(SimWorld(seed=7))
    assert len(first) > 20
    assert first == second
    assert workload(SimWorld(seed=8)) != first  # the seed matters (client start times)


def test_sim_world_runs_once_and_restores_library_clocks(sim: Harness) -> None:
    import aiohttp.connector
    import dns.query

    async def main() -> None:
        await asyncio.sleep(10)
        assert aiohttp.connector.monotonic() == 10.0  # type: ignore[attr-defined]
        assert vars(dns.query)["time"].time() == 10.0
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        sim.run(main())
    assert aiohttp.connector.monotonic is time.monotonic  # type: ignore[attr-defined]
    assert vars(dns.query)["time"] is time
    with pytest.raises(RuntimeError, match="runs once"):
        sim.run(asyncio.sleep(0))


def test_sim_signal_handlers_run_as_callbacks(sim: Harness) -> None:
    before = signal.getsignal(signal.SIGUSR1)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        got: asyncio.Future[str] = loop.create_future()
        loop.add_signal_handler(signal.SIGUSR1, got.set_result, "usr1")
        os.kill(os.getpid(), signal.SIGUSR1)
        assert await asyncio.wait_for(got, 1.0) == "usr1"
        assert loop.remove_signal_handler(signal.SIGUSR1)

    sim.run(main())
    assert signal.getsignal(signal.SIGUSR1) == before


def test_sim_ctrl_c_stops_the_run(sim: Harness) -> None:
    async def main() -> None:
        signal.raise_signal(signal.SIGINT)
        await asyncio.sleep(3600)

    with pytest.raises(KeyboardInterrupt):
        sim.run(main())


def test_sim_udp_receive_queue_is_bounded(sim: Harness) -> None:
    async def main() -> None:
        assert isinstance(sim.world, SimWorld)
        limit = sim.world.network.udp_queue
        with sockets(sim.network) as make:
            a, b = make(type=socket.SOCK_DGRAM), make(type=socket.SOCK_DGRAM)
            b.bind((HOST, 0))
            for _ in range(limit // 1000 + 50):
                a.sendto(b"z" * 1000, b.getsockname())
            await asyncio.sleep(0.001)  # all of them have arrived (or been dropped)
            kept = 0
            with contextlib.suppress(BlockingIOError):
                while True:
                    assert len(b.recvfrom(2000)[0]) == 1000
                    kept += 1
            assert kept == limit // 1000

    sim.run(main())


def test_sim_blocking_calls_that_would_wait_are_refused(sim: Harness) -> None:
    async def main() -> None:
        with contextlib.closing(sim.network.socket()) as s:
            with pytest.raises(RuntimeError, match="blocking"):
                s.connect((HOST, 9))
            s.setblocking(False)
            assert s.connect_ex((HOST, 9)) == errno.EINPROGRESS

    sim.run(main())


def test_sim_world_is_a_world() -> None:
    def as_world(world: SimWorld) -> World:
        return world  # mypy checks SimWorld against the World protocol here

    world = as_world(SimWorld(seed="s"))
    assert world.name == "sim" and world.clock.now() == 0.0
    assert world.rng("x").random() == SimWorld(seed="s").rng("x").random() != SimWorld(seed="t").rng("x").random()
    assert world.new_event_loop() is world.new_event_loop()
    world.new_event_loop().close()
