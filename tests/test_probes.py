"""Probes: the strict status-line parser, and real probes against tiny misbehaving servers on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import probe_verdict, reason_phrases, status_lines

from lb.probes import (
    MAX_STATUS_LINE,
    Prober,
    build_request,
    is_status_line_prefix,
    parse_status_line,
    probe_http,
    probe_tcp,
)
from lb.targets import ProbeOutcome

CODES = frozenset(range(200, 400))
HOST = "127.0.0.1"
# How much later than its timeout a probe may end: the timer fires on the next loop iteration (asyncio
# rounds epoll timeouts up to 1 ms) and the test machine is a busy 2-core VM shared with the server.
TIMEOUT_TOLERANCE_S = 0.15

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


# -- parser ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"HTTP/1.1 200 OK\r\n", 200),
        (b"HTTP/1.0 503 Service Unavailable\r\n", 503),
        (b"HTTP/1.1 204 \r\n", 204),  # empty reason, SP still required
        (b"HTTP/1.1 302 Found \t it\r\n", 302),
        (b"HTTP/1.1 404 \xc3\xa9t\xe9\r\n", 404),  # obs-text is allowed in the reason
        (b"HTTP/1.1 100 Continue\r\n", 100),
        (b"HTTP/1.1 599 x\r\n", 599),
    ],
)
def test_parse_valid(line: bytes, code: int) -> None:
    assert parse_status_line(line) == code


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"HTTP/1.1 200 OK",  # no CRLF
        b"HTTP/1.1 200 OK\n",  # bare LF
        b"HTTP/1.1 200 OK\r\n\r\n",  # more than one line
        b"HTTP/1.1 200\r\n",  # no SP before the (empty) reason
        b"HTTP/2 200 OK\r\n",
        b"HTTP/1.2 200 OK\r\n",
        b"http/1.1 200 OK\r\n",
        b"HTTP/1.1  200 OK\r\n",
        b" HTTP/1.1 200 OK\r\n",
        b"HTTP/1.1 20 OK\r\n",
        b"HTTP/1.1 2000 OK\r\n",
        b"HTTP/1.1 099 OK\r\n",  # outside 100-599 (RFC 9110 section 15)
        b"HTTP/1.1 600 OK\r\n",
        b"HTTP/1.1 2x0 OK\r\n",
        b"HTTP/1.1 200 O\x00K\r\n",  # controls in the reason
        b"HTTP/1.1 200 O\x7fK\r\n",
        b"HTTP/1.1 200 OK\rX\r\n",
        b"\r\nHTTP/1.1 200 OK\r\n",
        b"SSH-2.0-OpenSSH_9.2\r\n",
    ],
)
def test_parse_invalid(line: bytes) -> None:
    assert parse_status_line(line) is None


reasons = reason_phrases(60)


@given(version=st.sampled_from([b"1.0", b"1.1"]), code=st.integers(100, 599), reason=reasons)
def test_valid_lines_parse(version: bytes, code: int, reason: bytes) -> None:
    line = b"HTTP/" + version + b" " + str(code).encode() + b" " + reason + b"\r\n"
    assert parse_status_line(line) == code
    # every proper prefix without the final LF may still become a status line
    for i in range(len(line)):
        assert is_status_line_prefix(line[:i])


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    code = parse_status_line(data)
    assert code is None or 100 <= code <= 599
    assert isinstance(is_status_line_prefix(data), bool)
    if code is not None:
        assert data.startswith(b"HTTP/1.") and data.endswith(b"\r\n")


def test_prefix_rejects_garbage_early() -> None:
    assert not is_status_line_prefix(b"SSH-")
    assert not is_status_line_prefix(b"HTTP/1.1 20x")
    assert not is_status_line_prefix(b"HTTP/1.1 200 OK\r\r")
    assert is_status_line_prefix(b"HTTP/1.1 200 OK\r")


def test_build_request() -> None:
    assert build_request("/health", "lbsim") == (
        b"GET /health HTTP/1.1\r\nHost: lbsim\r\nConnection: close\r\nUser-Agent: lbsim-health\r\n\r\n"
    )
    bad = [("health", "h"), ("/a b", "h"), ("/\r\n", "h"), ("/é", "h"), ("/", "a\r\nb"), ("/", "")]
    for path, host in bad:
        with pytest.raises(ValueError):
            build_request(path, host)
    with pytest.raises(ValueError):
        Prober(protocol="udp")  # type: ignore[arg-type]


# -- real servers ------------------------------------------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextlib.asynccontextmanager
async def serve(handler: Handler) -> AsyncIterator[int]:
    """A loopback server running `handler` per connection; yields its port. Handlers are cancelled at exit."""
    tasks: set[asyncio.Task[None]] = set()

    async def wrapped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the probe resets connections once it has its verdict
        except asyncio.CancelledError:
            pass  # shutting the test server down; asyncio's stream callback would log a cancelled handler
        finally:
            tasks.discard(task)
            writer.transport.abort()

    server = await asyncio.start_server(wrapped, HOST, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


def replying(data: bytes, then_close: bool = True) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(data)
        await writer.drain()
        if then_close:
            writer.close()
            await writer.wait_closed()
        else:
            await asyncio.Event().wait()  # hang

    return handler


async def http(port: int, limit_s: float = 2.0, codes: frozenset[int] = CODES) -> ProbeOutcome:
    return await probe_http(HOST, port, "/health", "lbsim", codes, limit_s)


async def timed(coro: Awaitable[ProbeOutcome]) -> tuple[ProbeOutcome, float]:
    t0 = time.monotonic()
    out = await coro
    return out, time.monotonic() - t0


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


async def test_200_is_success_and_request_is_exact() -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_request(reader))
        writer.write(OK)
        await writer.drain()

    async with serve(handler) as port:
        assert await http(port) == ProbeOutcome.SUCCESS
        assert await probe_http("localhost", port, "/x?y=1", "h", CODES, 2.0) == ProbeOutcome.SUCCESS
    assert seen[0] == build_request("/health", "lbsim")
    assert seen[1].startswith(b"GET /x?y=1 HTTP/1.1\r\nHost: h\r\n")


async def test_status_codes() -> None:
    async with serve(replying(b"HTTP/1.1 503 Service Unavailable\r\n\r\n")) as port:
        assert await http(port) == ProbeOutcome.FAILURE
        assert await http(port, codes=frozenset({503})) == ProbeOutcome.SUCCESS
    async with serve(replying(b"HTTP/1.0 302 Found\r\n\r\n")) as port:
        assert await http(port) == ProbeOutcome.SUCCESS
    async with serve(replying(b"HTTP/1.1 404 Not Found\r\n")) as port:
        assert await http(port) == ProbeOutcome.FAILURE


async def test_garbage_is_malformed_at_once_even_if_the_server_hangs() -> None:
    async with serve(replying(b"SSH-2.0-OpenSSH_9.2\r\n", then_close=False)) as port:
        out, took = await timed(http(port, limit_s=5.0))
    assert out == ProbeOutcome.MALFORMED
    assert took < 1.0
    async with serve(replying(b"HTTP/1.1 200 OK\n\n", then_close=True)) as port:  # bare LF
        assert await http(port) == ProbeOutcome.MALFORMED


async def test_hang_times_out_on_time() -> None:
    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.Event().wait()

    async with serve(hang) as port:
        out, took = await timed(http(port, limit_s=0.3))
    assert out == ProbeOutcome.TIMEOUT
    assert 0.3 - 0.01 <= took <= 0.3 + TIMEOUT_TOLERANCE_S


async def test_close_before_status_is_reset() -> None:
    async with serve(replying(b"")) as port:
        assert await http(port) == ProbeOutcome.RESET
    async with serve(replying(b"HTTP/1.1 20")) as port:
        assert await http(port) == ProbeOutcome.RESET
    async with serve(replying(b"HTTP/1.1 200 OK\r")) as port:
        assert await http(port) == ProbeOutcome.RESET


async def test_rst_is_reset() -> None:
    async def rst(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async with serve(rst) as port:
        assert await http(port) == ProbeOutcome.RESET


async def test_refused() -> None:
    with socket.socket() as s:
        s.bind((HOST, 0))  # bound, never listening: the port is ours and the kernel refuses connections
        port = s.getsockname()[1]
        assert await http(port) == ProbeOutcome.REFUSED
        assert await probe_tcp(HOST, port, 2.0) == ProbeOutcome.REFUSED


async def test_slowloris_ends_by_its_timeout() -> None:
    async def drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for b in b"HTTP/1.1 200 OK\r\n" * 100:
            writer.write(bytes([b]))
            await writer.drain()
            await asyncio.sleep(0.02)

    async with serve(drip) as port:
        out, took = await timed(http(port, limit_s=0.3))
    assert out == ProbeOutcome.TIMEOUT
    assert took <= 0.3 + TIMEOUT_TOLERANCE_S


async def test_status_line_split_across_reads() -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for chunk in (b"HTT", b"P/1.1 2", b"04 No Content\r", b"\n"):
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(0.01)
        await asyncio.Event().wait()

    async with serve(slow) as port:
        assert await http(port) == ProbeOutcome.SUCCESS


async def test_huge_line_without_crlf_is_malformed() -> None:
    async with serve(replying(b"HTTP/1.1 200 " + b"a" * 10_000, then_close=False)) as port:
        out, took = await timed(http(port, limit_s=5.0))
    assert out == ProbeOutcome.MALFORMED and took < 1.0
    # a line that is exactly at the cap still counts
    line = b"HTTP/1.1 200 " + b"a" * (MAX_STATUS_LINE - 15) + b"\r\n"
    assert len(line) == MAX_STATUS_LINE
    async with serve(replying(line)) as port:
        assert await http(port) == ProbeOutcome.SUCCESS


async def test_tcp_probe() -> None:
    async def idle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async with serve(idle) as port:
        assert await probe_tcp(HOST, port, 2.0) == ProbeOutcome.SUCCESS
        assert await Prober(protocol="tcp").probe(HOST, port, 2.0) == ProbeOutcome.SUCCESS
        assert await probe_tcp(HOST, port, 2.0, reset_close=False) == ProbeOutcome.SUCCESS


async def test_tcp_probe_times_out_when_the_accept_queue_is_full() -> None:
    # A listener that never accepts, with its queue filled: the kernel drops further SYNs, so connect hangs.
    with socket.socket() as listener:
        listener.bind((HOST, 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        try:
            for _ in range(4):
                c = socket.socket()
                c.setblocking(False)
                c.connect_ex((HOST, port))
                fillers.append(c)
            await asyncio.sleep(0.05)  # let the handshakes land in the queue (no probe involved yet)
            out, took = await timed(probe_tcp(HOST, port, 0.3))
        finally:
            for c in fillers:
                c.close()
    assert out == ProbeOutcome.TIMEOUT
    assert took <= 0.3 + TIMEOUT_TOLERANCE_S


async def test_zero_timeout_and_bad_names() -> None:
    assert await probe_tcp(HOST, 1, 0.0) == ProbeOutcome.TIMEOUT
    out = await probe_http("name.that.does.not.exist.invalid", 80, "/", "h", CODES, 0.5)
    assert out in (ProbeOutcome.REFUSED, ProbeOutcome.TIMEOUT)  # depends on the resolver, never raises
    assert await probe_tcp(HOST, 70_000, 1.0) == ProbeOutcome.REFUSED


async def test_cancellation_propagates_and_closes_the_socket() -> None:
    closed = asyncio.Event()

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        with contextlib.suppress(ConnectionError):
            await reader.read()  # returns (or raises a reset) once the probe's socket is gone
        closed.set()

    async with serve(hang) as port:
        before = open_fds()
        task = asyncio.create_task(http(port, limit_s=30.0))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(closed.wait(), 2.0)
        assert open_fds() <= before


async def test_no_fd_leaks_across_outcomes() -> None:
    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.Event().wait()

    async with (
        serve(replying(OK)) as ok,
        serve(replying(b"junk")) as junk,
        serve(replying(b"")) as empty,
        serve(hang) as hung,
    ):
        with socket.socket() as s:
            s.bind((HOST, 0))
            refused = s.getsockname()[1]
            before = open_fds()
            for _ in range(20):
                outs = await asyncio.gather(
                    http(ok),
                    http(junk),
                    http(empty),
                    http(hung, limit_s=0.01),
                    http(refused),
                    probe_tcp(HOST, ok, 1.0),
                )
                assert list(outs) == [
                    ProbeOutcome.SUCCESS,
                    ProbeOutcome.MALFORMED,
                    ProbeOutcome.RESET,
                    ProbeOutcome.TIMEOUT,
                    ProbeOutcome.REFUSED,
                    ProbeOutcome.SUCCESS,
                ]
            assert open_fds() <= before


# -- fuzzing the server's response -------------------------------------------------------------------------


def expected(data: bytes, closes: bool) -> ProbeOutcome:
    """What a strict probe must say about a server that answers `data` and then closes (or hangs)."""
    forced = probe_verdict(data, CODES)
    if forced is not None:
        return forced
    return ProbeOutcome.RESET if closes else ProbeOutcome.TIMEOUT


_status_lines = status_lines(60)
responses = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda line, rest: line + rest, _status_lines, st.binary(max_size=100)),
    st.builds(lambda line, cut: line[:cut], _status_lines, st.integers(0, 80)),
    st.builds(lambda line, junk: line[:-2] + junk, _status_lines, st.binary(min_size=1, max_size=5)),
    st.builds(lambda n: b"HTTP/1.1 200 " + b"x" * n, st.integers(MAX_STATUS_LINE - 20, MAX_STATUS_LINE + 20)),
)


async def probe_against(data: bytes, closes: bool, limit_s: float) -> ProbeOutcome:
    async with serve(replying(data, then_close=closes)) as port:
        return await http(port, limit_s)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=responses)
def test_fuzz_response_then_close(data: bytes) -> None:
    out = asyncio.run(probe_against(data, closes=True, limit_s=5.0))
    assert isinstance(out, ProbeOutcome)
    assert out == expected(data, closes=True)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=responses)
def test_fuzz_response_then_hang(data: bytes) -> None:
    out = asyncio.run(probe_against(data, closes=False, limit_s=0.3))
    assert out == expected(data, closes=False)
