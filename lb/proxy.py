"""The L4 data path of one zone node: accept, pick a target, copy bytes both ways.

Built on asyncio Protocols and transports, not streams: a stream proxy costs ~2x the CPU per request and
cannot keep up with connection churn (docs/sources.md#performance). Each accepted connection is one
`_Flow`, which is the client side's protocol and owns the whole connection state; the upstream side's
protocol (`_Upstream`) only forwards its events to the flow.

Life of a flow:
1. Accept -> `choose(flow key)`. None -> RST the client (`no_target`).
2. Connect to the target. Bytes the client sends meanwhile are kept, up to `early_data_limit`, after which the
   client is paused. Refused / failed -> RST the client (`connect_failed`); no answer within the connect
   timeout -> RST the client (`connect_timeout`).
3. Copy both ways. Backpressure: when one side's write buffer passes its high-water mark that side's transport
   calls `pause_writing`, and we stop reading the other side until `resume_writing`. Memory per flow is thus
   bounded by two write buffers plus one read chunk each way.
4. Half-close: EOF from one side -> `write_eof()` to the other; the flow stays open until both directions have
   seen EOF, then both transports are closed (after flushing).
5. Errors: an upstream RST is passed on as an RST to the client (`upstream_reset`), a client RST as an RST to
   the upstream (`client_reset`). `close_target` and `stop` RST both sides (`terminated`; NLB's connection
   termination for unhealthy targets, docs/sources.md#nlb-health).
6. Idle timeout (optional; NLB's is 350 s, settable 60-6000 s): a connected flow on which no byte moved either
   way for that long is reset on both sides (`idle_timeout`), so a silent target cannot hold a flow forever.

The first abnormal event decides a flow's outcome; later ones (for example the RST we provoke on the other
side) do not overwrite it. One `ConnectionReport` per accepted connection is handed to `on_outcome`, exactly
once, after both sides are closed.

TCP_NODELAY: both asyncio (`_SelectorSocketTransport`) and uvloop (`TCPTransport`) already set it on every TCP
transport they create, accepted or connected, so we do not spend two more setsockopt calls per connection;
tests/test_proxy.py checks it on both loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import cast

from lb.select import FlowKey as FlowKey  # (client ip, client port, listener port): what choose() gets
from lb.targets import Target

# SO_LINGER {on, 0 s}: close() then drops the connection with an RST instead of a FIN, so the peer gets
# ECONNRESET rather than a clean EOF. Packed once, used on every reset.
_RST_LINGER = struct.pack("ii", 1, 0)

DEFAULT_CONNECT_TIMEOUT_S_LOOP = 10.0
# How often, in idle timeouts, the idle sweep runs: a flow is reset between 1 and 1.25 idle timeouts after its
# last byte, and the per-chunk path keeps no timestamps (the sweep compares byte counts between sweeps).
_IDLE_SWEEPS_PER_TIMEOUT = 4
# The loop's clock and timers tick in milliseconds (uvloop), so a sweep may see a hair less than the time it was
# scheduled for; a flow quiet for the timeout less this much has been quiet for the timeout.
_CLOCK_SLACK_S = 0.002
# 64 KiB is the default high-water mark of both loops; we set it (and low = high / 4) explicitly because
# uvloop's default low-water mark is 16 *bytes*, which would wake the paused side for every tiny drain.
DEFAULT_WRITE_BUFFER_HIGH = 64 * 1024
DEFAULT_EARLY_DATA_LIMIT = 64 * 1024
# The kernel caps this at net.core.somaxconn; asyncio's default of 100 drops SYNs under connection churn.
DEFAULT_BACKLOG = 1024


class ConnOutcome(StrEnum):
    """How one accepted connection ended; the first abnormal event wins."""

    OK = "ok"  # both directions ended with EOF (or the flow is still clean when both sides close)
    NO_TARGET = "no_target"  # choose() returned None: the client was reset at once
    CONNECT_FAILED = "connect_failed"  # connecting failed (refused, unreachable...): client reset
    CONNECT_TIMEOUT = "connect_timeout"  # the target did not accept within the connect timeout: client reset
    UPSTREAM_RESET = "upstream_reset"  # the target's side failed (RST, broken pipe): client reset
    NO_RESPONSE = "no_response"  # the target sent EOF without a single byte although the client had sent some
    CLIENT_RESET = "client_reset"  # the client's side failed (RST, broken pipe): target reset
    IDLE_TIMEOUT = "idle_timeout"  # no byte either way for the idle timeout (NLB: 350 s): both sides reset
    TERMINATED = "terminated"  # close_target() or stop(): both sides reset


@dataclass(frozen=True, slots=True)
class ConnectionReport:
    """The record of one accepted connection, emitted once it is fully closed. Durations are loop seconds."""

    zone: str
    target_id: str | None  # None when no target was chosen (no_target, or the node was stopping)
    outcome: ConnOutcome
    bytes_up: int  # bytes read from the client (forwarded, or dropped when the upstream was gone)
    bytes_down: int  # bytes read from the target
    connect_s: float  # accept -> end of the connect attempt (success, failure, timeout, abandon); 0 if none
    duration_s: float  # accept -> both sides closed


# Upstream states of a flow.
_NONE = 0  # no connect attempted (no target, or stopping)
_CONNECTING = 1  # connect task running, no transport yet
_CONNECTED = 2  # upstream transport usable
_CLOSING = 3  # we closed or reset the upstream transport; waiting for its connection_lost
_CLOSED = 4  # upstream gone (connection_lost seen, or the connect attempt failed)

# Why the client side is not being read (bit set): early-data buffer full, upstream write buffer full.
_PAUSE_EARLY = 1
_PAUSE_UPSTREAM_FULL = 2


# How long stop() waits for the last flows' transports to report their close before finishing them itself (wall s).
_STOP_GRACE_S = 2.0


def _rst(transport: asyncio.Transport) -> None:
    """Drop a connection with an RST: SO_LINGER 0, then abort (which discards unsent data and closes)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # OSError: the fd is already gone underneath us; abort() below still releases the transport.
        # uvloop raises ValueError rather than OSError when the fd is already gone.
        with contextlib.suppress(OSError, ValueError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST_LINGER)
    transport.abort()


class NodeProxy:
    """One zone node's listener: every accepted connection is proxied to the target `choose` returns.

    `choose` gets the flow key (client ip, client port, listener port) and returns a Target or None. It is
    called synchronously on the accept path, so it must be cheap and must not block. `on_outcome` receives one
    `ConnectionReport` per accepted connection; it runs inside protocol callbacks, so it must not block.
    """

    def __init__(
        self,
        zone: str,
        choose: Callable[[FlowKey], Target | None],
        on_outcome: Callable[[ConnectionReport], None],
        connect_timeout_s_loop: float = DEFAULT_CONNECT_TIMEOUT_S_LOOP,
        *,
        idle_timeout_s_loop: float | None = None,
        backlog: int = DEFAULT_BACKLOG,
        write_buffer_high: int = DEFAULT_WRITE_BUFFER_HIGH,
        early_data_limit: int = DEFAULT_EARLY_DATA_LIMIT,
    ) -> None:
        if connect_timeout_s_loop <= 0:
            raise ValueError(f"connect_timeout_s_loop must be > 0, got {connect_timeout_s_loop}")
        if idle_timeout_s_loop is not None and not idle_timeout_s_loop > 0:
            raise ValueError(f"idle_timeout_s_loop must be > 0 or None, got {idle_timeout_s_loop}")
        if write_buffer_high < 1 or early_data_limit < 1:
            raise ValueError("write_buffer_high and early_data_limit must be >= 1")
        self.zone = zone
        self._choose = choose
        self._on_outcome = on_outcome
        self._connect_timeout = connect_timeout_s_loop
        self._idle_timeout = idle_timeout_s_loop
        self._sweeper: asyncio.TimerHandle | None = None
        self._backlog = backlog
        self._high = write_buffer_high
        self._low = write_buffer_high // 4
        self._early_limit = early_data_limit
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._port = 0
        self._stopping = False
        # Insertion-ordered dicts, not sets: sets of objects iterate in memory-address order, and the order
        # of the RSTs sent to them must be the same in every run.
        self._flows: dict[_Flow, None] = {}
        self._by_target: dict[str, dict[_Flow, None]] = {}
        self._idle: asyncio.Future[None] | None = None
        self.forced_finishes = 0  # flows stop() had to finish itself (see _Flow.force_finish)
        self.accepted = 0  # connections accepted since construction
        # Times one side stopped being read because the other side's write buffer was full.
        self.backpressure_pauses = 0

    @property
    def port(self) -> int:
        """The listening port (0 before start)."""
        return self._port

    @property
    def active(self) -> int:
        """Accepted connections not yet reported (connecting, proxying or closing)."""
        return len(self._flows)

    def active_for(self, target_id: str) -> int:
        """Live connections routed to one target."""
        flows = self._by_target.get(target_id)
        return len(flows) if flows else 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on host:port (0 = an ephemeral port) and return the port actually bound."""
        if self._server is not None:
            raise RuntimeError("NodeProxy already started")
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stopping = False
        self._server = await loop.create_server(self._new_flow, host, port, backlog=self._backlog)
        self._port = int(self._server.sockets[0].getsockname()[1])
        if self._idle_timeout is not None:
            self._sweeper = loop.call_later(self._idle_timeout / _IDLE_SWEEPS_PER_TIMEOUT, self._sweep_idle)
        return self._port

    async def stop(self) -> None:
        """Close the listener, reset every connection and return once all of them are reported and closed."""
        server = self._server
        if server is None:
            return
        self._stopping = True
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
        server.close()
        # A connection the kernel handed to asyncio just before close() reaches connection_made one or two
        # loop iterations later (asyncio accepts in a task), and uvloop frees closed handles on the next
        # iteration. So keep resetting until a few iterations in a row see no flow at all.
        quiet = 0
        while quiet < 3:
            if self._flows:
                quiet = 0
                for flow in tuple(self._flows):
                    flow.terminate()
                if self._flows:
                    idle = self._idle
                    if idle is None or idle.done():  # shared with a concurrent stop() call, if any
                        idle = self._idle = asyncio.get_running_loop().create_future()
                    await asyncio.wait({idle}, timeout=_STOP_GRACE_S)
                    if not idle.done():
                        # A transport whose connection_lost never came must not keep stop() waiting forever.
                        for flow in tuple(self._flows):
                            self.forced_finishes += 1
                            flow.force_finish()
            else:
                quiet += 1
                await asyncio.sleep(0)
        await server.wait_closed()
        self._server = None

    def close_target(self, target_id: str) -> int:
        """RST both sides of every live connection to `target_id` (NLB unhealthy-target termination).

        Returns how many connections were reset. Their reports (outcome `terminated`) follow asynchronously.
        """
        flows = self._by_target.get(target_id)
        if not flows:
            return 0
        return sum(1 for flow in tuple(flows) if flow.terminate())

    # -- internals -------------------------------------------------------------------------------------------

    def _new_flow(self) -> _Flow:
        return _Flow(self)

    def _sweep_idle(self) -> None:
        """Reset every connected flow on which no byte moved for the idle timeout (NLB's TCP idle timeout)."""
        timeout = cast(float, self._idle_timeout)
        period = timeout / _IDLE_SWEEPS_PER_TIMEOUT
        loop = cast(asyncio.AbstractEventLoop, self._loop)
        now = loop.time()
        for flow in tuple(self._flows):
            if flow.up_state != _CONNECTED:
                continue  # connecting flows have the connect timeout; closing ones end by themselves
            moved = flow.bytes_up + flow.bytes_down
            if moved != flow.seen_bytes:
                flow.seen_bytes = moved
                flow.quiet_since = now
            # Only the clock tick as slack: with a fraction of a period, a few late sweeps reset a flow too early.
            elif now - flow.quiet_since >= timeout - _CLOCK_SLACK_S:
                if flow.outcome is None:
                    flow.outcome = ConnOutcome.IDLE_TIMEOUT
                flow.terminate()
        if not self._stopping:
            self._sweeper = loop.call_later(period, self._sweep_idle)

    def _finished(self, flow: _Flow) -> None:
        self._flows.pop(flow, None)
        target = flow.target
        if target is not None:
            flows = self._by_target.get(target.id)
            if flows is not None:
                flows.pop(flow, None)
                if not flows:
                    del self._by_target[target.id]
        idle = self._idle
        if idle is not None and not self._flows and not idle.done():
            idle.set_result(None)


class _Flow(asyncio.Protocol):
    """One accepted connection: the client side's protocol and the state of the whole flow."""

    __slots__ = (
        "bytes_down",
        "bytes_up",
        "client",
        "client_eof",
        "client_lost",
        "client_open",
        "connect_s",
        "done",
        "loop",
        "node",
        "outcome",
        "pending",
        "pending_size",
        "quiet_since",
        "read_pause",
        "seen_bytes",
        "t0",
        "target",
        "task",
        "timed_out",
        "timer",
        "up",
        "up_eof",
        "up_paused",
        "up_state",
    )

    def __init__(self, node: NodeProxy) -> None:
        self.node = node
        self.client: asyncio.Transport | None = None
        self.client_open = False  # we may still write to / close the client transport
        self.client_lost = False  # the client transport's connection_lost has run
        self.client_eof = False
        self.up: asyncio.Transport | None = None
        self.up_state = _NONE
        self.up_eof = False
        self.up_paused = False
        self.read_pause = 0
        self.target: Target | None = None
        self.pending: list[bytes] | None = None
        self.pending_size = 0
        self.task: asyncio.Task[tuple[asyncio.Transport, asyncio.Protocol]] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timed_out = False
        self.outcome: ConnOutcome | None = None
        self.bytes_up = 0
        self.bytes_down = 0
        self.loop = asyncio.get_running_loop()
        self.t0 = 0.0
        self.connect_s = 0.0
        self.done = False
        self.seen_bytes = -1  # byte count at the last idle sweep; -1: not swept yet
        self.quiet_since = 0.0

    # -- client side ---------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        client = cast(asyncio.Transport, transport)
        node = self.node
        self.t0 = self.loop.time()
        self.client = client
        self.client_open = True
        node._flows[self] = None
        node.accepted += 1
        if node._stopping:
            self._fail(ConnOutcome.TERMINATED)
            return
        peer = client.get_extra_info("peername")
        # peername is None if the client was already gone when the loop asked the kernel; still route the flow
        # so that it is reported like any other (its reset will arrive as connection_lost).
        key: FlowKey = (peer[0], peer[1], node._port) if peer else ("", 0, node._port)
        try:
            target = node._choose(key)
        except Exception as exc:
            # A broken chooser must not leave a half-made flow behind: report it and treat it as "no target".
            loop = cast(asyncio.AbstractEventLoop, node._loop)
            loop.call_exception_handler(
                {"message": f"NodeProxy({node.zone}): choose() raised", "exception": exc, "protocol": self}
            )
            target = None
        if target is None:
            self._fail(ConnOutcome.NO_TARGET)
            return
        self.target = target
        by_target = node._by_target.get(target.id)
        if by_target is None:
            node._by_target[target.id] = {self: None}
        else:
            by_target[self] = None
        client.set_write_buffer_limits(node._high, node._low)
        self.up_state = _CONNECTING
        loop = cast(asyncio.AbstractEventLoop, node._loop)
        # The client is not paused here: its first bytes (typically the whole request) are buffered and go out
        # right after connect, saving a pause/resume pair of syscalls and a loop iteration per connection.
        # (Pausing here would not even work on uvloop 0.23, which starts reading after connection_made returns
        # whatever it was told; the early-data limit is what bounds this buffer.)
        task = loop.create_task(loop.create_connection(self._make_upstream, target.host, target.port))
        task.add_done_callback(self._connect_done)
        self.task = task
        # A timer handle, not asyncio.timeout()/wait_for(): no extra task or context manager per connection.
        self.timer = loop.call_later(node._connect_timeout, self._connect_timed_out)

    def data_received(self, data: bytes) -> None:
        self.bytes_up += len(data)
        state = self.up_state
        if state == _CONNECTED:
            cast(asyncio.Transport, self.up).write(data)
        elif state == _CONNECTING:
            pending = self.pending
            if pending is None:
                self.pending = [data]
            else:
                pending.append(data)
            self.pending_size += len(data)
            if self.pending_size >= self.node._early_limit:
                self._pause_client(_PAUSE_EARLY)
        # Otherwise the upstream is gone or going: nothing to forward to, the flow is being torn down.

    def eof_received(self) -> bool:
        self.client_eof = True
        if self.up_state == _CONNECTED and self._up_write_eof() and self.up_eof:
            self._close_both()
        # While connecting, _up_made forwards the EOF after the buffered bytes.
        return True  # keep the transport open: the other direction may still carry data

    def connection_lost(self, exc: Exception | None) -> None:
        self.client_lost = True
        self.client_open = False
        if exc is not None and self.outcome is None:
            self.outcome = ConnOutcome.CLIENT_RESET
        state = self.up_state
        if state == _CONNECTING:
            cast(asyncio.Task[object], self.task).cancel()
        elif state == _CONNECTED:
            self.up_state = _CLOSING
            up = cast(asyncio.Transport, self.up)
            if exc is not None:
                _rst(up)  # pass the client's reset on to the target, as a stateless L4 hop would
            else:
                up.close()
        self._maybe_finish()

    def pause_writing(self) -> None:
        # The client is not draining what the target sends: stop reading the target.
        self.node.backpressure_pauses += 1
        if self.up_state == _CONNECTED and not self.up_eof and not self.up_paused:
            self.up_paused = True
            cast(asyncio.Transport, self.up).pause_reading()

    def resume_writing(self) -> None:
        if self.up_paused:
            self.up_paused = False
            if self.up_state == _CONNECTED:
                cast(asyncio.Transport, self.up).resume_reading()

    # -- upstream side (called by _Upstream) ---------------------------------------------------------------

    def _make_upstream(self) -> _Upstream:
        return _Upstream(self)

    def _up_made(self, up: asyncio.Transport) -> None:
        self.up = up
        self.up_state = _CONNECTED
        self.connect_s = self.loop.time() - self.t0
        timer = self.timer
        if timer is not None:
            timer.cancel()
            self.timer = None
        if not self.client_open:
            # The flow was reset while the connect was in flight and the cancel lost the race.
            self.up_state = _CLOSING
            _rst(up)
            return
        node = self.node
        up.set_write_buffer_limits(node._high, node._low)
        pending = self.pending
        if pending is not None:
            self.pending = None
            self.pending_size = 0
            up.write(pending[0] if len(pending) == 1 else b"".join(pending))
            self._resume_client(_PAUSE_EARLY)
        if self.client_eof:
            self._up_write_eof()

    def _up_data(self, data: bytes) -> None:
        self.bytes_down += len(data)
        if self.client_open:
            cast(asyncio.Transport, self.client).write(data)

    def _up_eof(self) -> bool:
        self.up_eof = True
        if self.bytes_down == 0 and self.bytes_up > 0 and self.outcome is None:
            self.outcome = ConnOutcome.NO_RESPONSE
        if self.client_open and self._client_write_eof() and self.client_eof:
            self._close_both()
        return True

    def _up_lost(self, exc: Exception | None) -> None:
        self.up_state = _CLOSED
        if exc is not None and self.outcome is None:
            self.outcome = ConnOutcome.UPSTREAM_RESET
        if self.client_open:
            self.client_open = False
            client = cast(asyncio.Transport, self.client)
            if exc is not None:
                _rst(client)
            else:
                client.close()
        self._maybe_finish()

    # write_eof() is the one transport call that raises instead of reporting through connection_lost: asyncio
    # calls shutdown() directly, which fails (ENOTCONN) when the peer's RST has arrived but has not been read
    # yet. Left alone, the error would surface in the *other* side's callback and be blamed on the wrong peer.

    def _up_write_eof(self) -> bool:
        try:
            cast(asyncio.Transport, self.up).write_eof()
        except OSError:
            self._side_failed(ConnOutcome.UPSTREAM_RESET)
            return False
        return True

    def _client_write_eof(self) -> bool:
        try:
            cast(asyncio.Transport, self.client).write_eof()
        except OSError:
            self._side_failed(ConnOutcome.CLIENT_RESET)
            return False
        return True

    def _side_failed(self, outcome: ConnOutcome) -> None:
        """One side is dead without its transport knowing yet: reset both."""
        if self.outcome is None:
            self.outcome = outcome
        if self.client_open:
            self.client_open = False
            _rst(cast(asyncio.Transport, self.client))
        if self.up_state == _CONNECTED:
            self.up_state = _CLOSING
            _rst(cast(asyncio.Transport, self.up))

    def _up_pause_writing(self) -> None:
        # The target is not draining what the client sends: stop reading the client.
        self.node.backpressure_pauses += 1
        self._pause_client(_PAUSE_UPSTREAM_FULL)

    def _up_resume_writing(self) -> None:
        self._resume_client(_PAUSE_UPSTREAM_FULL)

    # -- connect attempt -----------------------------------------------------------------------------------

    def _connect_timed_out(self) -> None:
        self.timer = None
        if self.up_state == _CONNECTING and self.task is not None:
            self.timed_out = True
            self.task.cancel()

    def _connect_done(self, task: asyncio.Task[tuple[asyncio.Transport, asyncio.Protocol]]) -> None:
        self.task = None
        timer = self.timer
        if timer is not None:
            timer.cancel()
            self.timer = None
        failed = task.cancelled() or task.exception() is not None  # exception() also marks it retrieved
        if self.up_state == _CONNECTING:
            # connection_made never ran: the attempt failed, timed out or was abandoned.
            self.up_state = _CLOSED
            self.connect_s = self.loop.time() - self.t0
            if self.outcome is None:
                if not failed:
                    self.outcome = ConnOutcome.CONNECT_FAILED  # defensive: success without connection_made
                elif task.cancelled():
                    self.outcome = ConnOutcome.CONNECT_TIMEOUT if self.timed_out else ConnOutcome.TERMINATED
                else:
                    self.outcome = ConnOutcome.CONNECT_FAILED
            if self.client_open:
                self.client_open = False
                _rst(cast(asyncio.Transport, self.client))
            self.pending = None
        # Else connection_made ran; if the task still failed (cancelled in the same iteration), asyncio
        # closed the transport itself and _up_lost follows.
        self._maybe_finish()

    # -- teardown ------------------------------------------------------------------------------------------

    def terminate(self) -> bool:
        """RST whatever is still open on either side (close_target / stop).

        Returns whether the flow was live (client still open or upstream connected); a flow that was already
        closing is reset too, so that stop() never waits on a peer that does not read, but is not counted.
        """
        if self.done:
            return False
        state = self.up_state
        live = self.client_open or state == _CONNECTED
        if self.outcome is None:
            self.outcome = ConnOutcome.TERMINATED
        if not self.client_lost:
            self.client_open = False
            _rst(cast(asyncio.Transport, self.client))
        if state == _CONNECTING:
            cast(asyncio.Task[object], self.task).cancel()
        elif state in (_CONNECTED, _CLOSING):
            self.up_state = _CLOSING
            _rst(cast(asyncio.Transport, self.up))
        return live

    def force_finish(self) -> None:
        """Last resort of stop(): abort both sides and report the flow now, even if a transport never
        delivers connection_lost (seen with uvloop when a connect completes in the loop iteration its task
        is cancelled: the transport is closed underneath and no callback follows)."""
        if self.done:
            return
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
        timer, self.timer = self.timer, None
        if timer is not None:
            timer.cancel()
        for transport in (self.client, self.up):
            if transport is not None:
                _rst(transport)
        if self.outcome is None:
            self.outcome = ConnOutcome.TERMINATED
        self.client_open = False
        self.client_lost = True
        self.up_state = _CLOSED
        self._maybe_finish()

    def _fail(self, outcome: ConnOutcome) -> None:
        """Reset the client before any upstream exists (no target, or the node is stopping)."""
        self.outcome = outcome
        self.client_open = False
        _rst(cast(asyncio.Transport, self.client))

    def _close_both(self) -> None:
        # Both directions saw EOF: close (flushing what is still buffered) instead of waiting for the peers.
        if self.client_open:
            self.client_open = False
            cast(asyncio.Transport, self.client).close()
        if self.up_state == _CONNECTED:
            self.up_state = _CLOSING
            cast(asyncio.Transport, self.up).close()

    def _pause_client(self, why: int) -> None:
        if self.read_pause == 0 and not self.client_eof and self.client_open:
            cast(asyncio.Transport, self.client).pause_reading()
        self.read_pause |= why

    def _resume_client(self, why: int) -> None:
        if self.read_pause & why:
            self.read_pause &= ~why
            if self.read_pause == 0 and not self.client_eof and self.client_open:
                cast(asyncio.Transport, self.client).resume_reading()

    def _maybe_finish(self) -> None:
        if self.done or not self.client_lost or self.task is not None:
            return
        if self.up_state != _NONE and self.up_state != _CLOSED:
            return
        self.done = True
        node = self.node
        node._finished(self)
        target = self.target
        report = ConnectionReport(
            node.zone,
            target.id if target is not None else None,
            self.outcome or ConnOutcome.OK,
            self.bytes_up,
            self.bytes_down,
            self.connect_s,
            self.loop.time() - self.t0,
        )
        # Last, after all bookkeeping: if the callback raises, the loop's exception handler reports it and the
        # proxy's state is still consistent.
        node._on_outcome(report)


class _Upstream(asyncio.Protocol):
    """The target side's protocol: forwards every event to its flow."""

    __slots__ = ("flow",)

    def __init__(self, flow: _Flow) -> None:
        self.flow = flow

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.flow._up_made(cast(asyncio.Transport, transport))

    def data_received(self, data: bytes) -> None:
        self.flow._up_data(data)

    def eof_received(self) -> bool:
        return self.flow._up_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.flow._up_lost(exc)

    def pause_writing(self) -> None:
        self.flow._up_pause_writing()

    def resume_writing(self) -> None:
        self.flow._up_resume_writing()
