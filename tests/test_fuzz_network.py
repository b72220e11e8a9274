"""Fuzzing the network edges with hypothesis: the probe's status-line parser, the HTTP probe and the L4 proxy
against scripted loopback backends that answer garbage, drip bytes (slowloris), reset mid-response or hang.

Invariants checked, on both asyncio and uvloop (issue 5, section 1, "Network"):
1. The parser agrees with an independent, regex-free reference on near-valid lines (pure, no sockets).
2. A probe always returns a `ProbeOutcome`, never raises, ends by its timeout (plus a tolerance), says SUCCESS
   only for a well-formed status line whose code is in the success set, and leaves its connection closed
   (the backend sees EOF or a reset).
3. A proxied connection, whatever the client and the backend do, ends closed on both sides, is reported
   exactly once, forwards only prefixes of what each side sent, and leaks no socket; no exception reaches the
   loop's exception handler (tests/support.run_on).

Backend behaviour (drips, hangs) is modelled with sleeps; the tests themselves synchronise on futures or poll
with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import struct
import time
from dataclasses import dataclass
from typing import Literal, cast

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from support import LOOPS, REASON_BYTES, open_sockets, probe_verdict, reason_phrases, run_on, status_lines, wait_for

from lb.probes import MAX_STATUS_LINE, build_request, is_status_line_prefix, parse_status_line, probe_http
from lb.proxy import ConnectionReport, NodeProxy
from lb.targets import ProbeOutcome, Target

HOST = "127.0.0.1"
CODES = frozenset(range(200, 400))
REQUEST = build_request("/health", "lbsim")
# A probe's timer fires on the first loop iteration after its deadline; asyncio rounds epoll timeouts up to
# 1 ms, so the ideal lateness is a tick or two. The slack on top is for this busy, shared 2-core VM, where one
# iteration can stall for tens of milliseconds (the same bound tests/test_probes.py uses).
LOOP_TICK_S = 0.001
# uvloop schedules timers in whole milliseconds from a loop time cached at the start of the iteration, so a
# probe started late in an iteration may time out that much early; a busy iteration here lasts < 20 ticks.
EARLY_TOLERANCE_S = 20 * LOOP_TICK_S
TIMEOUT_TOLERANCE_S = 100 * LOOP_TICK_S + 0.05
# How long a connection may take to be seen closed by its peer once the other side has let go.
CLOSE_WITHIN_S = 3.0

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
if os.environ.get("LBSIM_FUZZ_NO_SHRINK"):  # while developing: shrinking a socket-level failure takes minutes
    FUZZ = settings(FUZZ, phases=[Phase.explicit, Phase.reuse, Phase.generate])

End = Literal["close", "reset", "hang"]
OnEof = Literal["close", "after", "ignore"]


def rst(transport: asyncio.Transport) -> None:
    """Abort with SO_LINGER 0, so the peer gets an RST rather than a FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


# -- pure parser ---------------------------------------------------------------------------------------------



def ref_parse(line: bytes) -> int | None:
    """RFC 9112 status line, checked byte by byte: the reference the regex-based parser must agree with."""
    if not line.endswith(b"\r\n"):
        return None
    body = line[:-2]
    if len(body) < 13 or body[:7] != b"HTTP/1." or body[7] not in b"01" or body[8] != 32 or body[12] != 32:
        return None
    code = body[9:12]
    if code[0] not in b"12345" or not all(48 <= c <= 57 for c in code):
        return None
    if not all(c in REASON_BYTES for c in body[13:]):
        return None
    return int(code)


def ref_prefix(data: bytes) -> bool:
    """Whether `data` (no LF) can still be extended into a valid status line."""
    fixed = [b"H", b"T", b"T", b"P", b"/", b"1", b".", b"01", b" ", b"12345", b"0123456789", b"0123456789", b" "]
    for i, c in enumerate(data):
        if i < len(fixed):
            if c not in fixed[i]:
                return False
        elif c == 13:
            if i != len(data) - 1:
                return False
        elif c not in REASON_BYTES:
            return False
    return True


reasons = reason_phrases(40)
versions = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2", b"http/1.1", b"HTTP/1.1 ", b""])
valid_lines = status_lines(40)
# Status lines that are right or nearly right: random versions, codes of any width, odd separators.
any_status_lines = st.builds(
    lambda v, c, sep, r, eol: v + b" " + c + sep + r + eol,
    versions,
    st.one_of(st.integers(0, 999).map(lambda n: str(n).zfill(3).encode()), st.binary(max_size=4)),
    st.sampled_from([b" ", b"", b"  ", b"\t"]),
    reasons,
    st.sampled_from([b"\r\n", b"\n", b"\r", b"", b"\r\r\n", b"\n\r\n"]),
)


@st.composite
def mutated_lines(draw: st.DrawFn) -> bytes:
    """A valid status line with a few bytes replaced, inserted or deleted, or cut short."""
    line = bytearray(draw(valid_lines))
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["replace", "insert", "delete", "cut"]))
        i = draw(st.integers(0, max(len(line) - 1, 0)))
        if op == "replace" and line:
            line[i] = draw(st.integers(0, 255))
        elif op == "insert":
            line.insert(i, draw(st.integers(0, 255)))
        elif op == "delete" and line:
            del line[i]
        elif op == "cut":
            del line[i:]
    return bytes(line)


parser_inputs = st.one_of(mutated_lines(), any_status_lines, valid_lines, st.binary(max_size=80))


@settings(max_examples=1500, deadline=None)
@given(parser_inputs)
def test_parser_agrees_with_the_reference(data: bytes) -> None:
    assert parse_status_line(data) == ref_parse(data)
    head = data.split(b"\n", 1)[0]  # is_status_line_prefix is only ever asked about bytes without an LF
    assert is_status_line_prefix(head) == ref_prefix(head)
    code = parse_status_line(data)
    if code is not None:
        assert 100 <= code <= 599
        assert all(is_status_line_prefix(data[:i]) for i in range(len(data)))


# -- scripted backends ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Script:
    """What a backend does on each connection.

    It waits for `need` request bytes (or EOF) unless `speak_first`, writes `chunks` with `gap_s` between
    them, then closes, resets or hangs. On the peer's EOF it closes at once ("close"), once its script is done
    ("after") or never ("ignore": a half-open connection only a reset or the proxy's stop() can end).
    """

    chunks: tuple[bytes, ...]
    end: End
    speak_first: bool = False
    gap_s: float = 0.0
    on_eof: OnEof = "after"
    need: int = 0

    @property
    def response(self) -> bytes:
        return b"".join(self.chunks)


class Peer(asyncio.Protocol):
    """One side of a test connection: records what it got and sent and how it ended; may run a Script."""

    def __init__(self, script: Script | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.script = script
        self.transport: asyncio.Transport | None = None
        self.data = bytearray()
        self.sent = bytearray()
        self.eof = False
        self.lost: asyncio.Future[Exception | None] = loop.create_future()
        self.progress = asyncio.Event()  # set on every received byte, EOF or loss
        self.script_done = False
        self.task: asyncio.Task[None] | None = None

    @property
    def t(self) -> asyncio.Transport:
        assert self.transport is not None
        return self.transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self.script is not None:
            self.task = asyncio.get_running_loop().create_task(self._run(self.script))

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.progress.set()

    def eof_received(self) -> bool:
        self.eof = True
        self.progress.set()
        if self.script is None:
            return True
        on_eof = self.script.on_eof
        # False: asyncio closes the transport (flushing what is buffered).
        return not (on_eof == "close" or (on_eof == "after" and self.script_done))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)
        self.progress.set()

    def write(self, data: bytes) -> None:
        if not self.t.is_closing():
            self.sent += data
            self.t.write(data)

    async def _run(self, s: Script) -> None:
        if not s.speak_first:
            while len(self.data) < s.need and not self.eof and not self.lost.done():
                self.progress.clear()
                await self.progress.wait()
        for i, chunk in enumerate(s.chunks):
            if self.t.is_closing():
                return
            if i and s.gap_s:
                await asyncio.sleep(s.gap_s)  # the backend's modelled slowness, not synchronisation
            self.write(chunk)
        self.script_done = True
        if self.t.is_closing():
            return
        if s.end == "close":
            self.t.close()
        elif s.end == "reset":
            rst(self.t)
        elif self.eof and s.on_eof == "after":
            self.t.close()


class Backend:
    """A loopback listener on an ephemeral port; every connection runs `script`."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.conns: list[Peer] = []
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    def _make(self) -> Peer:
        peer = Peer(self.script)
        self.conns.append(peer)
        return peer

    async def start(self) -> int:
        self.server = await asyncio.get_running_loop().create_server(self._make, HOST, 0)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self.port

    def all_closed(self) -> bool:
        return all(p.lost.done() for p in self.conns)

    async def close(self) -> None:
        """Stop listening; cancel the scripts and abort whatever is still open, then wait for all of it."""
        assert self.server is not None
        self.server.close()
        tasks = [p.task for p in self.conns if p.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for p in self.conns:
            if p.transport is not None and not p.lost.done():
                p.t.abort()
        await asyncio.gather(*(p.lost for p in self.conns if p.transport is not None))
        await self.server.wait_closed()


# -- responses -----------------------------------------------------------------------------------------------


def header_block(n_bytes: int) -> bytes:
    line = b"X-Padding: " + b"a" * 50 + b"\r\n"
    return line * (n_bytes // len(line) + 1)


responses = st.one_of(
    st.binary(max_size=300),  # binary junk
    any_status_lines,  # garbage or nearly valid status lines, no body
    st.builds(lambda line, rest: line + rest, valid_lines, st.binary(max_size=200)),  # random codes, a body
    st.builds(lambda line, cut: line[:cut], valid_lines, st.integers(0, 60)),  # partial status line
    st.builds(lambda line, n: line + header_block(n) + b"\r\nok", valid_lines, st.integers(50_000, 150_000)),
    st.builds(header_block, st.integers(50_000, 150_000)),  # huge headers and no status line
    st.sampled_from([b"<html><body>hi</body></html>", b'{"status": "ok"}\n', b"\r\n\r\nok", b"OK\n"]),
    st.builds(lambda n: b"HTTP/1.1 200 " + b"x" * n, st.integers(MAX_STATUS_LINE - 20, 3 * MAX_STATUS_LINE)),
)


@st.composite
def chunked(draw: st.DrawFn, data: bytes, max_cuts: int = 3) -> tuple[bytes, ...]:
    cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=max_cuts))))
    bounds = [0, *cuts, len(data)]
    return tuple(data[a:b] for a, b in itertools.pairwise(bounds) if b > a)




# -- the HTTP probe against scripted backends --------------------------------------------------------------


@dataclass(frozen=True)
class ProbeCase:
    script: Script
    codes: frozenset[int]
    reset_close: bool
    timeout_s: float


@st.composite
def probe_cases(draw: st.DrawFn) -> ProbeCase:
    data = draw(responses)
    end: End = draw(st.sampled_from(["close", "reset", "hang"]))
    speak_first = draw(st.booleans())
    gap = draw(st.sampled_from([0.0, 0.0, 0.005]))
    script = Script(
        chunks=draw(chunked(data)), end=end, speak_first=speak_first, gap_s=gap, need=len(REQUEST), on_eof="after"
    )
    codes = draw(st.one_of(st.just(CODES), st.frozensets(st.integers(100, 599), max_size=20)))
    # An undecided hang waits for the whole timeout: keep it short there, long elsewhere so it cannot be hit.
    undecided_hang = end == "hang" and probe_verdict(data, codes) is None
    return ProbeCase(script, codes, draw(st.booleans()), 0.2 if undecided_hang else 3.0)


def allowed_outcomes(case: ProbeCase) -> set[ProbeOutcome]:
    s = case.script
    forced = probe_verdict(s.response, case.codes)
    if forced is None:
        return {ProbeOutcome.TIMEOUT} if s.end == "hang" else {ProbeOutcome.RESET}
    allowed = {forced}
    # An RST may overtake unread bytes, and a backend that closes before reading the request makes the kernel
    # answer the request with an RST: either way the probe may see the reset first.
    if s.end == "reset" or (s.speak_first and s.end == "close"):
        allowed.add(ProbeOutcome.RESET)
    return allowed


async def run_probe_case(case: ProbeCase) -> None:
    before = open_sockets()
    backend = Backend(case.script)
    port = await backend.start()
    t0 = time.monotonic()
    out = await probe_http(HOST, port, "/health", "lbsim", case.codes, case.timeout_s, reset_close=case.reset_close)
    took = time.monotonic() - t0
    assert isinstance(out, ProbeOutcome)
    assert took <= case.timeout_s + TIMEOUT_TOLERANCE_S, (out, took)
    assert out in allowed_outcomes(case), (out, case)
    if out == ProbeOutcome.TIMEOUT:
        assert took >= case.timeout_s - EARLY_TOLERANCE_S
    if out in (ProbeOutcome.SUCCESS, ProbeOutcome.FAILURE):
        line = case.script.response.split(b"\n", 1)[0] + b"\n"
        code = parse_status_line(line)
        assert code is not None and (code in case.codes) == (out == ProbeOutcome.SUCCESS)
    # The probe let go of its connection: the backend sees it end (EOF or a reset).
    await wait_for(backend.all_closed, CLOSE_WITHIN_S)
    (conn,) = backend.conns
    if not case.script.speak_first:
        # The request went out whole before any verdict could be reached (the backend waits for it).
        assert bytes(conn.data[: len(REQUEST)]) == REQUEST or conn.lost.result() is not None
    await backend.close()
    await wait_for(lambda: open_sockets() == before, CLOSE_WITHIN_S)


@pytest.mark.parametrize("kind", list(LOOPS))
@settings(FUZZ, max_examples=50)
@given(case=probe_cases())
def test_probe_against_fuzzed_backends(kind: str, case: ProbeCase) -> None:
    run_on(kind, lambda: run_probe_case(case), timeout=10.0)


# Bytes a slowloris drips: valid starts of a response, so only the clock can end the probe.
drip_payloads = st.one_of(
    st.builds(lambda line, n: line + header_block(n), valid_lines, st.integers(0, 200)),
    st.builds(lambda line: line[:-2], valid_lines),
)


async def run_slowloris(payload: bytes, gap_s: float, timeout_s: float, reset_close: bool) -> None:
    before = open_sockets()
    # One byte per gap: the status line alone (>= 15 bytes) takes longer than the timeout to arrive.
    script = Script(tuple(bytes([b]) for b in payload), "hang", gap_s=gap_s, need=len(REQUEST), on_eof="close")
    assert 14 * gap_s > timeout_s
    backend = Backend(script)
    port = await backend.start()
    t0 = time.monotonic()
    out = await probe_http(HOST, port, "/health", "lbsim", CODES, timeout_s, reset_close=reset_close)
    took = time.monotonic() - t0
    assert out == ProbeOutcome.TIMEOUT
    assert timeout_s - EARLY_TOLERANCE_S <= took <= timeout_s + TIMEOUT_TOLERANCE_S, took
    (conn,) = backend.conns
    # The dripper is told at once, not after finishing its drip: within a drip gap or two.
    await wait_for(lambda: conn.lost.done(), 2 * gap_s + TIMEOUT_TOLERANCE_S)
    exc = conn.lost.result()
    if reset_close:
        assert isinstance(exc, ConnectionResetError), repr(exc)
    else:
        # A FIN, unless the probe closed with our last bytes unread, when the kernel sends an RST instead.
        assert conn.eof or isinstance(exc, ConnectionResetError), repr(exc)
    assert not conn.script_done
    await backend.close()
    await wait_for(lambda: open_sockets() == before, CLOSE_WITHIN_S)


@pytest.mark.parametrize("kind", list(LOOPS))
@settings(FUZZ, max_examples=12)
@given(payload=drip_payloads, gap_s=st.sampled_from([0.02, 0.03]), reset_close=st.booleans())
def test_slowloris_probe_times_out_and_lets_go(kind: str, payload: bytes, gap_s: float, reset_close: bool) -> None:
    run_on(kind, lambda: run_slowloris(payload, gap_s, 0.15, reset_close), timeout=10.0)


async def run_reset_mid_response(response: bytes, cut: int, reset_close: bool) -> None:
    before = open_sockets()
    script = Script((response[:cut],), "reset", need=len(REQUEST))
    backend = Backend(script)
    port = await backend.start()
    out = await probe_http(HOST, port, "/health", "lbsim", CODES, 3.0, reset_close=reset_close)
    forced = probe_verdict(response[:cut], CODES)
    assert out in ({ProbeOutcome.RESET} if forced is None else {forced, ProbeOutcome.RESET}), (out, forced)
    await wait_for(backend.all_closed, CLOSE_WITHIN_S)
    await backend.close()
    await wait_for(lambda: open_sockets() == before, CLOSE_WITHIN_S)


@pytest.mark.parametrize("kind", list(LOOPS))
@settings(FUZZ, max_examples=25)
@given(
    response=st.builds(lambda line, n: line + header_block(n) + b"\r\n", valid_lines, st.integers(0, 100_000)),
    cut_frac=st.floats(0, 1),
    reset_close=st.booleans(),
)
def test_probe_backend_resets_mid_response(kind: str, response: bytes, cut_frac: float, reset_close: bool) -> None:
    cut = int(len(response) * cut_frac)
    run_on(kind, lambda: run_reset_mid_response(response, cut, reset_close), timeout=10.0)


# -- the proxy in front of scripted backends ---------------------------------------------------------------

ClientAct = Literal["eof", "close", "reset", "keep"]


@dataclass(frozen=True)
class ProxyCase:
    script: Script
    request: bytes
    act: ClientAct  # what the client does right after sending its request
    final: Literal["close", "reset"]  # how the client ends things if the connection is still up


requests = st.one_of(
    st.just(b""),
    st.binary(max_size=500),
    st.just(REQUEST),
    st.builds(lambda n: b"POST / HTTP/1.1\r\n\r\n" + b"x" * n, st.integers(60_000, 200_000)),  # > early limit
)


@st.composite
def proxy_cases(draw: st.DrawFn) -> ProxyCase:
    request = draw(requests)
    drip = draw(st.integers(0, 4)) == 0
    if drip:
        data = draw(st.builds(lambda line: line[:-2], valid_lines))[:20]
        chunks: tuple[bytes, ...] = tuple(bytes([b]) for b in data)
    else:
        chunks = draw(chunked(draw(responses)))
    script = Script(
        chunks=chunks,
        end=draw(st.sampled_from(["close", "reset", "hang"])),
        speak_first=draw(st.booleans()),
        gap_s=0.004 if drip else draw(st.sampled_from([0.0, 0.0, 0.002])),
        on_eof=draw(st.sampled_from(["close", "after", "ignore"])),
        need=len(request),
    )
    return ProxyCase(
        script,
        request,
        draw(st.sampled_from(["eof", "close", "reset", "keep"])),
        draw(st.sampled_from(["close", "reset"])),
    )


TCP_CLOSE = 7  # tcpi_state after an RST (include/net/tcp_states.h)
CLOSED_STATES = frozenset({TCP_CLOSE})


def tcp_state(peer: Peer) -> int:
    """The kernel's TCP state of a peer's socket (first byte of struct tcp_info)."""
    sock = peer.t.get_extra_info("socket")
    return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0])


def is_prefix(part: bytes | bytearray, whole: bytes | bytearray) -> bool:
    return bytes(whole[: len(part)]) == bytes(part)


async def run_proxy_case(case: ProxyCase) -> None:
    before = open_sockets()
    loop = asyncio.get_running_loop()
    backend = Backend(case.script)
    bport = await backend.start()
    reports: list[ConnectionReport] = []
    target = Target("t1", "az-a", HOST, bport)
    proxy = NodeProxy("az-a", lambda _key: target, reports.append, connect_timeout_s_loop=2.0)
    pport = await proxy.start(HOST, 0)

    _, client = await loop.create_connection(Peer, HOST, pport)
    if case.request:
        client.write(case.request)
    if case.act == "eof":
        client.t.write_eof()
    elif case.act == "close":
        client.t.close()
    elif case.act == "reset":
        rst(client.t)

    def settled() -> bool:
        # Nothing more is coming: the client is gone, or every backend script ran and its bytes got through.
        if client.lost.done():
            return True
        conns = backend.conns
        if not conns or not all(p.script_done or p.lost.done() for p in conns):
            return False
        if len(client.data) < sum(len(p.sent) for p in conns):
            return False
        # A backend that has closed: wait for its FIN or RST to be passed on too.
        return client.eof or not all(p.lost.done() for p in conns)

    await wait_for(settled, CLOSE_WITHIN_S)
    if not client.lost.done():
        if case.final == "close":
            client.t.close()
        else:
            rst(client.t)

    def all_closed() -> bool:
        # A backend that took the proxy's FIN and keeps its side open has still seen the connection end.
        return client.lost.done() and all(p.lost.done() or p.eof for p in backend.conns) and proxy.active == 0

    half_open_possible = case.script.end == "hang" and case.script.on_eof == "ignore"
    if half_open_possible:
        # The backend never closes and the client may only have sent a FIN: with no idle timeout in the proxy,
        # only stop() can end such a flow. It must then reset both sides.
        with contextlib.suppress(AssertionError):
            await wait_for(all_closed, 0.2)
        await proxy.stop()
        # stop() resets what is left. asyncio stops reading a socket once it has delivered EOF, so a backend
        # that ignores EOF and never writes learns of the reset only from its kernel.
        await wait_for(lambda: all(p.lost.done() or tcp_state(p) in CLOSED_STATES for p in backend.conns), 1.0)
    await wait_for(all_closed, CLOSE_WITHIN_S)

    assert len(reports) == proxy.accepted == 1
    (report,) = reports
    # Only prefixes of what each side sent reach the other, and the byte counts add up.
    for conn in backend.conns:
        assert is_prefix(conn.data, case.request)
        assert is_prefix(client.data, conn.sent)
    assert len(backend.conns) <= 1
    up_got = len(backend.conns[0].data) if backend.conns else 0
    down_sent = len(backend.conns[0].sent) if backend.conns else 0
    assert up_got <= report.bytes_up <= len(case.request)
    assert len(client.data) <= report.bytes_down <= down_sent
    if (
        case.act in ("eof", "keep")
        and case.script.end == "close"
        and case.script.on_eof != "close"
        and not (case.script.speak_first)
    ):
        # A backend that reads the request, answers and closes: everything gets through, both ways.
        assert bytes(backend.conns[0].data) == case.request
        assert bytes(client.data) == case.script.response
        assert client.eof

    await proxy.stop()
    assert proxy.active == 0
    await backend.close()
    await wait_for(lambda: open_sockets() == before, CLOSE_WITHIN_S)


@pytest.mark.parametrize("kind", list(LOOPS))
@settings(FUZZ, max_examples=60)
@given(case=proxy_cases())
def test_proxy_against_fuzzed_backends_and_clients(kind: str, case: ProxyCase) -> None:
    run_on(kind, lambda: run_proxy_case(case), timeout=15.0)


def test_helpers_reference_model_examples() -> None:
    """Pin the reference model (and thus the fuzz oracle) on hand-checked lines."""
    assert ref_parse(b"HTTP/1.1 200 OK\r\n") == 200
    assert ref_parse(b"HTTP/1.1 200\r\n") is None
    assert ref_parse(b"HTTP/1.1 600 x\r\n") is None
    assert ref_prefix(b"HTTP/1.1 2") and ref_prefix(b"HTTP/1.1 200 OK\r") and not ref_prefix(b"HTTP/1.1 200 O\rK")
    assert probe_verdict(b"HTTP/1.1 503 x\r\njunk", CODES) == ProbeOutcome.FAILURE
    assert probe_verdict(b"HTTP/1.1 20", CODES) is None
    assert probe_verdict(header_block(MAX_STATUS_LINE), CODES) == ProbeOutcome.MALFORMED
