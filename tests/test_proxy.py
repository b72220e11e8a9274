"""Tests for lb.proxy on real loopback sockets, on both the default asyncio loop and uvloop.

Backends are small Protocol-based servers defined here. Nothing waits with a sleep: tests await futures and
events, or poll a condition against a deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import socket
import struct
import time
from collections.abc import Callable
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import LOOPS, run_on

import lb.proxy as proxy_module
from lb.proxy import ConnectionReport, ConnOutcome, FlowKey, NodeProxy
from lb.targets import Target

HOST = "127.0.0.1"
MiB = 1024 * 1024


# -- harness ------------------------------------------------------------------------------------------------


@pytest.fixture(params=list(LOOPS))
def loop_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def until(cond: Callable[[], bool], limit_s: float = 5.0, what: str = "condition") -> None:
    """Poll `cond` once per loop iteration until it holds; fail after `limit_s` wall seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0)


def rst(transport: asyncio.Transport) -> None:
    sock = transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class Endpoint(asyncio.Protocol):
    """One side of a test connection (client or backend): records what it receives and how it ended.

    With `echo`, everything received is written back and EOF is echoed too. It closes its transport once it
    has both sent and received EOF, like a well-behaved peer.
    """

    def __init__(self, *, echo: bool = False, keep: bool = True, slow: bool = False) -> None:
        self.transport: asyncio.Transport | None = None
        self.echo = echo
        self.slow = slow  # after each chunk, stop reading for 1 ms: a reader slower than the proxy
        self.keep = keep
        self.data = bytearray()
        self.nbytes = 0
        self.sha = hashlib.sha256()
        self.eof = asyncio.Event()
        self.made = asyncio.Event()
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.sent_eof = False
        self._want: list[tuple[int, asyncio.Future[None]]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.made.set()

    def data_received(self, data: bytes) -> None:
        self.nbytes += len(data)
        self.sha.update(data)
        if self.keep:
            self.data += data
        if self.echo:
            self.t.write(data)
        if self.slow:
            self.t.pause_reading()
            asyncio.get_running_loop().call_later(0.001, self.t.resume_reading)
        for _, fut in [w for w in self._want if w[0] <= self.nbytes]:
            if not fut.done():
                fut.set_result(None)
        self._want = [w for w in self._want if w[0] > self.nbytes]

    def eof_received(self) -> bool:
        self.eof.set()
        if self.echo:
            self.write_eof()
            return True
        return not self.sent_eof  # False: asyncio closes the transport for us

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)
        for _, fut in self._want:
            if not fut.done():
                fut.set_exception(ConnectionError("lost before the expected bytes arrived"))
        self.eof.set()

    @property
    def t(self) -> asyncio.Transport:
        assert self.transport is not None
        return self.transport

    def write_eof(self) -> None:
        if self.sent_eof or self.lost.done():
            return
        self.sent_eof = True
        self.t.write_eof()
        if self.eof.is_set():
            self.t.close()

    async def wait_bytes(self, n: int) -> None:
        if self.nbytes >= n:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._want.append((n, fut))
        await fut


class Backend:
    """A listening test server; every accepted connection becomes an Endpoint made by `factory`."""

    def __init__(self, factory: Callable[[], Endpoint] = Endpoint, *, rcvbuf: int | None = None) -> None:
        self.factory = factory
        self.rcvbuf = rcvbuf
        self.conns: list[Endpoint] = []
        self.accepted: asyncio.Queue[Endpoint] = asyncio.Queue()
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    def _make(self) -> Endpoint:
        ep = self.factory()
        self.conns.append(ep)
        self.accepted.put_nowait(ep)
        return ep

    async def next_conn(self) -> Endpoint:
        """The next accepted connection, once its connection_made has run."""
        ep = await self.accepted.get()
        await ep.made.wait()
        return ep

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.rcvbuf is not None:
            # Inherited by accepted sockets; a fixed buffer disables autotuning, which could otherwise absorb
            # the whole payload in the kernel and hide the proxy's backpressure.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.bind((HOST, 0))
        sock.setblocking(False)
        # create_server calls listen() itself, with backlog 100 unless told otherwise: too short for bursts of
        # concurrent connects, whose dropped SYNs come back only after a 1 s retransmit.
        self.server = await loop.create_server(self._make, sock=sock, backlog=1024)
        self.port = sock.getsockname()[1]
        return self.port

    async def close(self) -> None:
        """Stop listening; wait until every accepted connection is closed (aborting those still open)."""
        assert self.server is not None
        self.server.close()
        await until(lambda: all(ep.made.is_set() for ep in self.conns), what="backend connection_made")
        for ep in self.conns:
            if not ep.lost.done():
                ep.t.abort()
        await asyncio.gather(*(ep.lost for ep in self.conns))


async def connect(port: int, factory: Callable[[], Endpoint] = Endpoint, *, rcvbuf: int | None = None) -> Endpoint:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await loop.sock_connect(sock, (HOST, port))
    _, ep = await loop.create_connection(factory, sock=sock)
    return ep


class Harness:
    """A NodeProxy whose reports are collected, with helpers to await them."""

    def __init__(self, choose: Callable[[FlowKey], Target | None], **kwargs: Any) -> None:
        self.reports: list[ConnectionReport] = []
        self.flows_seen: list[FlowKey] = []

        def chooser(flow: FlowKey) -> Target | None:
            self.flows_seen.append(flow)
            return choose(flow)

        self.proxy = NodeProxy("az-a", chooser, self.reports.append, **kwargs)
        self.port = 0

    async def start(self) -> int:
        self.port = await self.proxy.start(HOST, 0)
        return self.port

    async def wait_reports(self, n: int, limit_s: float = 5.0) -> list[ConnectionReport]:
        await until(lambda: len(self.reports) >= n, limit_s, f"{n} reports (have {len(self.reports)})")
        return self.reports

    async def stop(self) -> None:
        await self.proxy.stop()
        assert self.proxy.active == 0
        # Exactly one report per accepted connection.
        assert len(self.reports) == self.proxy.accepted, (len(self.reports), self.proxy.accepted)


def target(port: int, tid: str = "t1") -> Target:
    return Target(tid, "az-a", HOST, port)


def fixed(t: Target | None) -> Callable[[FlowKey], Target | None]:
    return lambda _flow: t


def refused_port() -> socket.socket:
    """A bound, not listening socket: connecting to its port is refused; holding it keeps the port ours."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((HOST, 0))
    return s


def black_hole() -> tuple[socket.socket, list[socket.socket]]:
    """A listener whose accept queue is full: the kernel drops further SYNs, so a connect just hangs."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((HOST, 0))
    listener.listen(0)
    fillers = []
    for _ in range(2):  # backlog 0 still queues one connection; the second makes sure the queue is full
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex(listener.getsockname())
        fillers.append(s)
    return listener, fillers


def socket_fds(match: Callable[[int, int], bool]) -> list[str]:
    """This process's open TCP socket fds whose (local port, remote port) satisfy `match`, from /proc."""
    ports: dict[str, tuple[int, int]] = {}
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            cols = line.split()
            ports[cols[9]] = (int(cols[1].split(":")[1], 16), int(cols[2].split(":")[1], 16))
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if link.startswith("socket:[") and (p := ports.get(link[8:-1])) is not None and match(*p):
            found.append(fd)
    return found


def proxy_buffered(proxy: NodeProxy) -> int:
    """Bytes the proxy holds in user space now: both write buffers and the early-data buffer of each flow."""
    total = 0
    for flow in proxy._flows:
        total += flow.pending_size
        if flow.client is not None and not flow.client.is_closing():
            total += flow.client.get_write_buffer_size()
        if flow.up is not None and not flow.up.is_closing():
            total += flow.up.get_write_buffer_size()
    return total


class Sampler:
    """Records the peak of proxy_buffered() once per loop iteration while a transfer runs."""

    def __init__(self, proxy: NodeProxy) -> None:
        self.proxy = proxy
        self.peak = 0
        self._stop = False
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, proxy_buffered(self.proxy))
            await asyncio.sleep(0)

    async def stop(self) -> int:
        self._stop = True
        await self._task
        return self.peak


# Upper bound for what one flow may buffer: a write buffer high-water mark (64 KiB) plus one read chunk
# (asyncio reads up to 256 KiB at a time) per direction, with room to spare. The payloads are 8 MiB.
BUFFER_BOUND = 1 * MiB


# -- data path ----------------------------------------------------------------------------------------------


def test_upload_with_slow_backend_is_intact_and_bounded(loop_kind: str) -> None:
    """8 MiB client -> backend while the backend does not read, then reads slowly: the proxy pauses the client,
    holds < 1 MiB, and everything arrives intact."""

    async def body() -> None:
        backend = Backend(lambda: Endpoint(slow=True), rcvbuf=64 * 1024)
        bport = await backend.start()
        h = Harness(fixed(target(bport)))
        await h.start()
        payload = random.Random(1).randbytes(8 * MiB)
        client = await connect(h.port, lambda: Endpoint(keep=True))
        srv = await backend.next_conn()
        srv.t.pause_reading()  # the slow backend: read nothing until the proxy has had to push back
        sampler = Sampler(h.proxy)
        client.t.write(payload)
        client.write_eof()
        await until(lambda: h.proxy.backpressure_pauses >= 1, what="the proxy to pause the client")
        flow = next(iter(h.proxy._flows))
        assert flow.read_pause != 0  # the client side is not being read
        srv.t.resume_reading()
        await srv.eof.wait()
        peak = await sampler.stop()
        assert srv.nbytes == len(payload)
        assert srv.sha.digest() == hashlib.sha256(payload).digest()
        srv.t.write(srv.sha.digest())  # the answer, so the flow is not a no_response
        srv.write_eof()
        await client.lost
        assert bytes(client.data) == hashlib.sha256(payload).digest()
        (report,) = await h.wait_reports(1)
        assert report.outcome == ConnOutcome.OK
        assert (report.bytes_up, report.bytes_down) == (len(payload), 32)
        assert report.target_id == "t1" and report.zone == "az-a"
        # Loop seconds: uvloop's clock ticks in milliseconds, so a fast loopback connect may read 0.
        assert 0 <= report.connect_s <= report.duration_s and report.duration_s > 0
        assert 0 < peak < BUFFER_BOUND, peak
        await h.stop()
        await backend.close()

    run_on(loop_kind, body)


def test_download_with_slow_client_is_intact_and_bounded(loop_kind: str) -> None:
    """8 MiB backend -> client while the client does not read: the proxy stops reading the backend."""

    async def body() -> None:
        payload = random.Random(2).randbytes(8 * MiB)

        def source() -> Endpoint:
            class Source(Endpoint):
                def eof_received(self) -> bool:  # on the request's EOF, answer with the payload
                    self.t.write(payload)
                    self.write_eof()
                    return True

            return Source()

        backend = Backend(source)
        bport = await backend.start()
        h = Harness(fixed(target(bport)))
        await h.start()
        client = await connect(h.port, lambda: Endpoint(keep=False), rcvbuf=64 * 1024)
        client.t.pause_reading()
        sampler = Sampler(h.proxy)
        client.t.write(b"GET /big\r\n")
        client.write_eof()
        await until(lambda: h.proxy.backpressure_pauses >= 1, what="the proxy to pause the backend")
        flow = next(iter(h.proxy._flows))
        assert flow.up_paused
        client.t.resume_reading()
        await client.lost
        peak = await sampler.stop()
        assert client.nbytes == len(payload)
        assert client.sha.digest() == hashlib.sha256(payload).digest()
        (report,) = await h.wait_reports(1)
        assert report.outcome == ConnOutcome.OK
        assert (report.bytes_up, report.bytes_down) == (10, len(payload))
        assert 0 < peak < BUFFER_BOUND, peak
        await h.stop()
        await backend.close()

    run_on(loop_kind, body)


def test_full_duplex_echo_of_8mib_is_intact(loop_kind: str) -> None:
    async def body() -> None:
        backend = Backend(lambda: Endpoint(echo=True, keep=False))
        bport = await backend.start()
        h = Harness(fixed(target(bport)))
        await h.start()
        payload = os.urandom(8 * MiB)
        client = await connect(h.port, lambda: Endpoint(keep=False))
        sampler = Sampler(h.proxy)
        client.t.write(payload)
        client.write_eof()
        assert await client.lost is None
        peak = await sampler.stop()
        assert client.sha.digest() == hashlib.sha256(payload).digest()
        (report,) = await h.wait_reports(1)
        assert report.outcome == ConnOutcome.OK
        assert report.bytes_up == report.bytes_down == len(payload)
        assert peak < BUFFER_BOUND, peak
        await h.stop()
        await backend.close()

    run_on(loop_kind, body)


def test_half_close_server_answers_after_client_eof(loop_kind: str) -> None:
    async def body() -> None:
        class AnswerAfterEof(Endpoint):
            def eof_received(self) -> bool:
                self.eof.set()
                self.t.write(b"answer to " + bytes(self.data))
                self.write_eof()
                return True

        backend = Backend(AnswerAfterEof)
        bport = await backend.start()
        h = Harness(fixed(target(bport)))
        await h.start()
        client = await connect(h.port)
        client.t.write(b"question")
        client.write_eof()  # the client is done sending but keeps reading
        assert await client.lost is None
        assert bytes(client.data) == b"answer to question"
        (report,) = await h.wait_reports(1)
        assert report.outcome == ConnOutcome.OK
        assert (report.bytes_up, report.bytes_down) == (8, 18)
        await h.stop()
        await backend.close()

    run_on(loop_kind, body)


def test_server_speaks_first_then_half_closes(loop_kind: str) -> None:
    """The backend sends a banner and EOF at once; the client can still send afterwards and is heard."""

    async def body() -> None:
        class Banner(Endpoint):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                super().connection_made(transport)
                self.t.write(b"hello")
                self.write_eof()

        backend = Backend(Banner)
        bport = await backend.start()
        h = Harness(fixed(target(bport)))
        await h.start()
        client = await connect(h.port)
        await client.wait_bytes(5)
        await client.eof.wait()
        client.t.write(b"late words")
        client.write_eof()
        assert await client.lost is None
        srv = backend.conns[0]
        assert await srv.lost is None
        assert bytes(srv.data) == b"late words"
        (report,) = await h.wait_reports(1)
        assert report.outcome == ConnOutcome.OK
        await h.stop()
        await backend.close()

    run_on(loop_kind, body)


def test_nodelay_is_set_on_both_sides(loop_kind: str) -> None:
    async def body() -> None:
        backend = Backend(lambda: Endpoint(echo=True))
        bport = await backend.start()
        h = Harness(fixed(target(bport)))
        await h.start()
        client = await connect(h.port)
        client.t.write(b"ping")
        await client.wait_bytes(4)
        (flow,) = h.proxy._flows
        for tr in (flow.client, flow.up):
            assert tr is not None
            assert tr.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        client.write_eof()
        await client.lost
        await h.wait_reports(1)
        await h.stop()
        await backend.close()

    run_on(loop_kind, body)


def test_flow_key_is_client_address_and_listener_port(loop_kind: str) -> None:
    async def body() -> None:
        backend = Backend(lambda: Endpoint(echo=True))
        bport = await backend.start()
        h = Harness(fixed(target(bport)))
        await h.start()
        client = await connect(h.port)
        local = client.t.get_extra_info("sockname")
        client.write_eof()
        await client.lost
        await h.wait_reports(1)
        assert h.flows_seen == [(local[0], local[1], h.port)]
        await h.stop()
        await backend.close()

    run_on(loop_kind, body)


# -- failures and resets ------------------------------------------------------------------------------------


def test_no_target_resets_the_client(loop_kind: str) -> None:
    async def body() -> None:
        h = Harness(fixed(None))
        await h.start()
        client = await connect(h.port)
        exc = await client.lost
        assert isinstance(exc, ConnectionResetError), repr(exc)
        (report,) = await h.wait_reports(1)
        assert report.outcome == ConnOutcome.NO_TARGET
        assert report.target_id is None and report.bytes_up == 0 and report.connect_s == 0.0
        await h.stop()

    run_on(loop_kind, body)


def test_no_target_resets_a_blocking_client_too(loop_kind: str) -> None:
    """Seen from a plain socket: recv raises ECONNRESET rather than returning b'' (a clean EOF)."""

    async def body() -> None:
        h = Harness(fixed(None))
        await h.start()
        loop = asyncio.get_running_loop()
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            await loop.sock_connect(s, (HOST, h.port))
            await h.wait_reports(1)
            with pytest.raises(ConnectionResetError):
                await loop.sock_recv(s, 100)
        finally:
            s.close()
        await h.stop()

    run_on(loop_kind, body)


def test_choose_raising_is_reported_and_treated_as_no_target(loop_kind: str) -> None:
    def boom(_flow: FlowKey) -> Target | None:
        raise RuntimeError("broken chooser")

    async def body() -> None:
        seen: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: seen.append(ctx))
        h = Harness(boom)
        await h.start()
        client = await connect(h.port)
        assert isinstance(await client.lost, ConnectionResetError)
        (report,) = await h.wait_reports(1)
        assert report.outcome == ConnOutcome.NO_TARGET
        assert len(seen) == 1 and isinstance(seen[0]["exception"], RuntimeError)
        await h.stop()

    run_on(loop_kind, body)


def test_refused_upstream_resets_the_client(loop_kind: str) -> None:
    async def body() -> None:
        closed = refused_port()
        try:
            h = Harness(fixed(target(closed.getsockname()[1])))
            await h.start()
            client = await connect(h.port)
            client.t.write(b"hello?")
            assert isinstance(await client.lost, ConnectionResetError)
            (report,) = await h.wait_reports(1)
            assert report.outcome == ConnOutcome.CONNECT_FAILED
            assert report.target_id == "t1" and report.bytes_up in (0, 6) and report.connect_s >= 0  # ms ticks
            await h.stop()
        finally:
            closed.close()

    run_on(loop_kind, body)


def test_connect_timeout_resets_the_client(loop_kind: str) -> None:
    async def body() -> None:
        listener, fillers = black_hole()
        try:
            h = Harness(fixed(target(listener.getsockname()[1])), connect_timeout_s_loop=0.2)
            await h.start()
            client = await connect(h.port)
            assert isinstance(await client.lost, ConnectionResetError)
            (report,) = await h.wait_reports(1)
            assert report.outcome == ConnOutcome.CONNECT_TIMEOUT
            assert 0.15 < report.connect_s < 2.0
            await h.stop()
        finally:
            for s in [listener, *fillers]:
                s.close()

    run_on(loop_kind, body)


def test_early_client_bytes_are_bounded_while_connecting(loop_kind: str) -> None:
    """A client that streams before the upstream accepts is paused once the early-data buffer is full."""

    async def body() -> None:
        listener, fillers = black_hole()
        try:
            h = Harness(fixed(target(listener.getsockname()[1])), connect_timeout_s_loop=30.0)
            await h.start()
            client = await connect(h.port)
            client.t.write(b"x" * (4 * MiB))
            await until(lambda: any(f.read_pause for f in h.proxy._flows), what="early-data pause")
            (flow,) = h.proxy._flows
            assert 64 * 1024 <= flow.pending_size < 64 * 1024 + 256 * 1024
            assert h.proxy.close_target("t1") == 1
            assert isinstance(await client.lost, ConnectionResetError)
            (report,) = await h.wait_reports(1)
            assert report.outcome == ConnOutcome.TERMINATED
            await h.stop()
        finally:
            for s in [listener, *fillers]:
                s.close()

    run_on(loop_kind, body)


def test_upstream_reset_resets_the_client(loop_kind: str) -> None:
    async def body() -> None:
        class Resetter(Endpoint):
            def data_received(self, data: bytes) -> None:
                rst(self.t)

        backend = Backend(Resetter)
        bport = await backend.start()
        h = Harness(fixed(target(bport)))
        await h.start()
        client = await connect(h.port)
        client.t.write(b"request")
        assert isinstance(await client.lost, ConnectionResetError)
        (report,) = await h.wait_reports(1)
        assert report.outcome == ConnOutcome.UPSTREAM_RESET
        await h.stop()
        await backend.close()

    run_on(loop_kind, body)


IDLE_S = 0.2  # wall seconds; the proxy sweeps every quarter of it


def test_a_silent_flow_is_reset_after_the_idle_timeout(loop_kind: str) -> None:
    """NLB's idle timeout: no byte either way for IDLE_S resets both sides, 1 to 1.25 timeouts after the last
    byte (plus the loop's own lag, bounded here by one more sweep period)."""

    async def body() -> None:
        backend = Backend(Endpoint)
        bport = await backend.start()
        h = Harness(fixed(target(bport)), idle_timeout_s_loop=IDLE_S)
        await h.start()
        client = await connect(h.port)
        client.t.write(b"request")
        srv = await backend.next_conn()
        await srv.wait_bytes(7)
        last_byte = asyncio.get_running_loop().time()
        assert isinstance(await client.lost, ConnectionResetError)
        silent_for = asyncio.get_running_loop().time() - last_byte
        assert isinstance(await srv.lost, ConnectionResetError)
        (report,) = await h.wait_reports(1)
        assert report.outcome == ConnOutcome.IDLE_TIMEOUT
        # Never before the timeout (less the loop clock's millisecond ticks); at most a sweep period after it, plus
        # one more period for a sweep that just missed it, plus loop lag.
        assert IDLE_S - 0.005 <= silent_for <= IDLE_S * 1.25 + IDLE_S / 4 + 0.05
        await h.stop()
        await backend.close()

    run_on(loop_kind, body)


def test_a_flow_that_keeps_moving_bytes_outlives_the_idle_timeout(loop_kind: str) -> None:
    async def body() -> None:
        backend = Backend(lambda: Endpoint(echo=True))
        bport = await backend.start()
        h = Harness(fixed(target(bport)), idle_timeout_s_loop=IDLE_S)
        await h.start()
        client = await connect(h.port)
        loop = asyncio.get_running_loop()
        start, sent = loop.time(), 0
        while loop.time() - start < 4 * IDLE_S:  # bounded: four idle timeouts of a byte every tenth of one
            client.t.write(b"x")
            sent += 1
            await client.wait_bytes(sent)
            await asyncio.sleep(IDLE_S / 10)
        assert not client.lost.done() and h.reports == []
        client.write_eof()
        (report,) = await h.wait_reports(1)
        assert report.outcome == ConnOutcome.OK
        await h.stop()
        await backend.close()

    run_on(loop_kind, body)


def test_no_idle_timeout_by_default_and_a_bad_one_is_refused() -> None:
    assert NodeProxy("a", fixed(None), lambda _r: None)._idle_timeout is None
    with pytest.raises(ValueError, match="idle_timeout_s_loop"):
        NodeProxy("a", fixed(None), lambda _r: None, idle_timeout_s_loop=0.0)


def test_client_reset_resets_the_upstream(loop_kind: str) -> None:
    async def body() -> None:
        backend = Backend(Endpoint)
        bport = await backend.start()
        h = Harness(fixed(target(bport)))
        await h.start()
        client = await connect(h.port)
        client.t.write(b"abc")
        srv = await backend.next_conn()
        await srv.wait_bytes(3)
        rst(client.t)
        assert isinstance(await srv.lost, ConnectionResetError)
        (report,) = await h.wait_reports(1)
        assert report.outcome == ConnOutcome.CLIENT_RESET
        assert report.bytes_up == 3
        await h.stop()
        await backend.close()

    run_on(loop_kind, body)


def test_upstream_closing_without_an_answer_is_no_response(loop_kind: str) -> None:
    async def body() -> None:
        class Hangup(Endpoint):
            def data_received(self, data: bytes) -> None:
                super().data_received(data)
                self.t.close()  # read the request, answer nothing, close

        backend = Backend(Hangup)
        bport = await backend.start()
        h = Harness(fixed(target(bport)))
        await h.start()
        client = await connect(h.port)
        client.t.write(b"GET / HTTP/1.1\r\n\r\n")
        await client.eof.wait()  # the client sees the backend's FIN passed through...
        assert client.nbytes == 0
        client.t.close()  # ...and hangs up
        assert await client.lost is None
        (report,) = await h.wait_reports(1)
        assert report.outcome == ConnOutcome.NO_RESPONSE
        assert (report.bytes_up, report.bytes_down) == (18, 0)
        await h.stop()
        await backend.close()

    run_on(loop_kind, body)


def test_close_target_resets_only_that_targets_connections(loop_kind: str) -> None:
    async def body() -> None:
        backend = Backend(lambda: Endpoint(echo=True))
        bport = await backend.start()
        targets = [target(bport, "t1"), target(bport, "t2")]
        chosen: dict[int, str] = {}  # client port -> target id

        def alternate(flow: FlowKey) -> Target:
            t = targets[len(chosen) % 2]
            chosen[flow[1]] = t.id
            return t

        h = Harness(alternate)
        await h.start()
        clients = [await connect(h.port) for _ in range(6)]
        for i, c in enumerate(clients):
            c.t.write(b"x%d" % i)
        for c in clients:
            await c.wait_bytes(2)  # every flow is established end to end
        on_t1 = [c for c in clients if chosen[c.t.get_extra_info("sockname")[1]] == "t1"]
        assert len(on_t1) == 3
        assert h.proxy.active_for("t1") == 3 and h.proxy.active_for("t2") == 3
        assert h.proxy.close_target("t1") == 3
        assert h.proxy.close_target("t1") == 0  # already being reset: not counted twice
        for c in on_t1:
            assert isinstance(await c.lost, ConnectionResetError)
        reports = await h.wait_reports(3)
        assert sorted((r.target_id, r.outcome) for r in reports) == [("t1", ConnOutcome.TERMINATED)] * 3
        # The other target's connections still work.
        others = [c for c in clients if c not in on_t1]
        for c in others:
            c.t.write(b"more")
            await c.wait_bytes(6)
            c.write_eof()
            assert await c.lost is None
        await h.wait_reports(6)
        assert sorted(r.outcome for r in h.reports[3:]) == [ConnOutcome.OK] * 3
        await h.stop()
        await backend.close()

    run_on(loop_kind, body)


def test_many_connections_each_report_exactly_once(loop_kind: str) -> None:
    async def body() -> None:
        backend = Backend(lambda: Endpoint(echo=True))
        bport = await backend.start()
        h = Harness(fixed(target(bport)))
        await h.start()

        async def one(i: int) -> None:
            c = await connect(h.port)
            c.t.write(b"%05d" % i)
            c.write_eof()
            assert await c.lost is None
            assert bytes(c.data) == b"%05d" % i

        await asyncio.gather(*(one(i) for i in range(200)))
        reports = await h.wait_reports(200)
        assert [r.outcome for r in reports] == [ConnOutcome.OK] * 200
        assert h.proxy.active == 0
        await h.stop()
        await backend.close()

    run_on(loop_kind, body)


def test_stop_resets_everything_and_leaves_no_fds_or_tasks(loop_kind: str) -> None:
    async def body() -> None:
        backend = Backend(lambda: Endpoint(echo=True))
        bport = await backend.start()
        listener, fillers = black_hole()
        hanging = target(listener.getsockname()[1], "hang")
        live = target(bport, "live")
        n = 0

        def choose(_flow: FlowKey) -> Target:
            nonlocal n
            n += 1
            return hanging if n == 1 else live

        fds_before = set(os.listdir("/proc/self/fd"))
        h = Harness(choose, connect_timeout_s_loop=30.0)
        await h.start()
        connecting = await connect(h.port)  # stuck connecting to the black hole
        clients = [await connect(h.port) for _ in range(5)]
        for c in clients:
            c.t.write(b"hi")
        for c in clients:
            await c.wait_bytes(2)
        assert h.proxy.active == 6
        proxy_port, target_ports = h.port, {bport, hanging.port}
        fillers_fds = {str(s.fileno()) for s in fillers}  # the test's own connections to the black hole

        def proxy_fds() -> set[str]:
            return set(socket_fds(lambda lport, rport: lport == proxy_port or rport in target_ports)) - fillers_fds

        assert len(proxy_fds()) == 1 + 6 + 6  # listener, accepted sockets, upstream sockets (one connecting)
        await h.stop()
        # Everything the proxy owned is gone the moment stop() returns: no task, no socket (neither the
        # listener and the accepted sockets, on the proxy's port, nor the sockets towards the targets).
        assert asyncio.all_tasks() == {asyncio.current_task()}
        assert not proxy_fds()
        assert sorted(r.outcome for r in h.reports) == [ConnOutcome.TERMINATED] * 6
        for c in [connecting, *clients]:
            assert isinstance(await c.lost, ConnectionResetError)
        await backend.close()
        for s in [listener, *fillers]:
            s.close()
        # What remains are the test's own client and backend sockets, which their loops release within a few
        # iterations (uvloop closes handles on the next one).
        await until(lambda: set(os.listdir("/proc/self/fd")) <= fds_before, what="fds to be released")

    run_on(loop_kind, body)


def test_stop_right_after_connects_race(loop_kind: str) -> None:
    """Connections accepted by the kernel while stop() runs are still reported exactly once."""

    async def body() -> None:
        backend = Backend(lambda: Endpoint(echo=True))
        bport = await backend.start()
        h = Harness(fixed(target(bport)))
        await h.start()
        socks = []
        for _ in range(20):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.connect_ex((HOST, h.port))
            socks.append(s)
        await h.stop()  # asserts one report per accepted connection
        for s in socks:
            s.close()
        await backend.close()

    run_on(loop_kind, body)


def test_stop_finishes_a_flow_whose_transport_never_reports_its_close(
    loop_kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvloop can close an upstream transport underneath a flow without calling connection_lost (a connect that
    completes in the iteration its task is cancelled). stop() must not wait for that callback forever: after
    its grace period it finishes the flow itself, reports it once and releases its sockets."""

    async def body() -> None:
        backend = Backend(lambda: Endpoint(echo=True))
        bport = await backend.start()
        h = Harness(fixed(target(bport)))
        await h.start()
        client = await connect(h.port)
        client.t.write(b"hi")
        await client.wait_bytes(2)
        # The fault: the upstream side's close is never reported.
        monkeypatch.setattr(proxy_module._Upstream, "connection_lost", lambda self, exc: None)
        t0 = time.monotonic()
        await h.stop()  # asserts one report per accepted connection
        assert time.monotonic() - t0 < proxy_module._STOP_GRACE_S + 1.0
        assert h.proxy.forced_finishes == 1
        assert [r.outcome for r in h.reports] == [ConnOutcome.TERMINATED]
        assert isinstance(await client.lost, ConnectionResetError)
        await backend.close()

    run_on(loop_kind, body)


def test_concurrent_stops_both_return(loop_kind: str) -> None:
    async def body() -> None:
        backend = Backend(lambda: Endpoint(echo=True))
        bport = await backend.start()
        h = Harness(fixed(target(bport)))
        await h.start()
        clients = [await connect(h.port) for _ in range(3)]
        for c in clients:
            c.t.write(b"hi")
        for c in clients:
            await c.wait_bytes(2)
        await asyncio.gather(h.proxy.stop(), h.proxy.stop())
        await h.stop()  # a third, sequential stop is a no-op
        assert [r.outcome for r in h.reports] == [ConnOutcome.TERMINATED] * 3
        await backend.close()

    run_on(loop_kind, body)


def test_on_outcome_raising_does_not_break_the_proxy(loop_kind: str) -> None:
    async def body() -> None:
        seen: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: seen.append(ctx))
        backend = Backend(lambda: Endpoint(echo=True))
        bport = await backend.start()

        def bad(_r: ConnectionReport) -> None:
            raise ValueError("metrics exploded")

        proxy = NodeProxy("az-a", fixed(target(bport)), bad)
        port = await proxy.start()
        for _ in range(3):
            c = await connect(port)
            c.write_eof()
            await c.lost
        await until(lambda: len(seen) == 3, what="three callback errors")
        assert proxy.active == 0
        await proxy.stop()
        await backend.close()

    run_on(loop_kind, body)


# -- property: random chunking and close orders -------------------------------------------------------------

SCENARIOS = [
    "client_first",  # client sends, EOF; backend answers after EOF, EOF
    "server_first",  # backend sends, EOF at once; client sends after it saw EOF
    "concurrent",  # both send and EOF without waiting for each other
    "client_reset",  # client sends, then resets
    "server_reset",  # backend resets once it has read something (or at once if the client sends nothing)
    "client_close_early",  # client sends, then closes (FIN) without waiting for an answer
    "server_close_early",  # backend closes (FIN) right after accepting
]

chunks = st.lists(st.integers(min_value=1, max_value=200_000), max_size=4)


async def scenario(kind: str, up_sizes: list[int], down_sizes: list[int], seed: int) -> None:
    rng = random.Random(seed)
    up = [rng.randbytes(n) for n in up_sizes]
    down = [rng.randbytes(n) for n in down_sizes]
    up_all, down_all = b"".join(up), b"".join(down)

    class Scripted(Endpoint):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            if kind == "server_first" or kind == "concurrent":
                for c in down:
                    self.t.write(c)
                self.write_eof()
            elif kind == "server_close_early":
                self.t.close()
            elif kind == "server_reset" and not up_all:
                rst(self.t)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if kind == "server_reset" and not self.lost.done():
                rst(self.t)

        def eof_received(self) -> bool:
            self.eof.set()
            if kind in ("client_first", "client_close_early"):
                for c in down:
                    self.t.write(c)
                self.write_eof()
                return True
            return super().eof_received()

    backend = Backend(lambda: Scripted(keep=True))
    bport = await backend.start()
    h = Harness(fixed(target(bport)))
    await h.start()
    client = await connect(h.port)
    if kind == "server_first":
        await client.eof.wait()
    for c in up:
        client.t.write(c)
    if kind == "client_reset":
        rst(client.t)
    elif kind == "client_close_early":
        client.t.close()
    else:
        client.write_eof()
    # The client learns everything that will happen to it.
    client_exc = await client.lost
    (report,) = await h.wait_reports(1)
    # Every backend connection the proxy opened ends closed too (settles within a few iterations).
    await until(lambda: all(ep.lost.done() for ep in backend.conns), what="backend connections to close")

    clean = kind in ("client_first", "server_first", "concurrent")
    if clean:
        assert client_exc is None
        assert bytes(client.data) == down_all
        (srv,) = backend.conns
        assert bytes(srv.data) == up_all
        expected = ConnOutcome.NO_RESPONSE if (up_all and not down_all and kind != "server_first") else ConnOutcome.OK
        if kind == "concurrent" and not down_all:
            # EOF may reach the proxy before or after the client's bytes: either label is right.
            assert report.outcome in (ConnOutcome.OK, ConnOutcome.NO_RESPONSE)
        else:
            assert report.outcome == expected
        assert (report.bytes_up, report.bytes_down) == (len(up_all), len(down_all))
    elif kind == "client_reset":
        assert report.outcome == ConnOutcome.CLIENT_RESET
    elif kind == "server_reset":
        assert isinstance(client_exc, ConnectionResetError), repr(client_exc)
        assert report.outcome == ConnOutcome.UPSTREAM_RESET
    elif kind == "client_close_early":
        # The answer (if any) hits a closed socket: the client's kernel resets the proxy's side.
        assert client_exc is None
        allowed = {ConnOutcome.OK, ConnOutcome.CLIENT_RESET, ConnOutcome.NO_RESPONSE}
        assert report.outcome in allowed
    else:  # server_close_early: the backend's FIN races the client's bytes, which may then draw an RST
        allowed = {ConnOutcome.OK, ConnOutcome.NO_RESPONSE, ConnOutcome.UPSTREAM_RESET}
        assert report.outcome in allowed
        assert client_exc is None or isinstance(client_exc, ConnectionResetError)
    await h.stop()
    await backend.close()


@pytest.mark.parametrize("loop_name", list(LOOPS))
@settings(max_examples=150, deadline=None)
@given(
    scenario_kind=st.sampled_from(SCENARIOS),
    up_sizes=chunks,
    down_sizes=chunks,
    seed=st.integers(min_value=0, max_value=2**31),
)
def test_random_chunks_and_close_orders(
    loop_name: str, scenario_kind: str, up_sizes: list[int], down_sizes: list[int], seed: int
) -> None:
    run_on(loop_name, lambda: scenario(scenario_kind, up_sizes, down_sizes, seed), timeout=10.0)
