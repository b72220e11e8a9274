"""A per-target TCP relay in front of each backend: the target's network as the control plane configured it.

States, in the spirit of Toxiproxy's toxics (docs/sources.md#toxiproxy), and what each does on the wire:

- `open`: accept, dial the upstream, relay bytes both ways. If the dial fails, RST the client (Toxiproxy
  closes it with FIN; an RST is what a dead next hop looks like to an L4 probe).
- `blackhole`: SYNs go unanswered; a client's connect times out (see `_sockets.Blackhole`).
- `refuse`: the port is bound but not listening; a connect gets RST, i.e. ECONNREFUSED.
- `reset`: accept, then RST at once.
- `latency`: relay, delaying each chunk by `latency_s` +/- uniform `jitter_s` (never below zero, order kept),
  in both directions.
- `flap` (alias `loss`): each new connection is, with probability `loss`, accepted and then held: data
  discarded, nothing answered, until the client gives up. As in Toxiproxy, loss is decided after the
  handshake, so a TCP-connect probe still passes; only an HTTP probe sees it. With `period_s` 0 (the default)
  loss is per connection, drawn in accept order. With `period_s` > 0 the path flaps in sim time instead: time
  is cut into slots of `period_s`, and in each slot the path holds every new connection with probability
  `loss`, decided by hashing the path's seed and the slot's number. The pattern is then a function of sim time
  alone, the same in every run of a seed and at every speed, where per-connection draws change with the order
  in which probes and requests happen to arrive.
- `bandwidth`: relay at most `rate_bytes_per_s` in each direction.

A connection keeps the state it was accepted under; a change applies to new connections at once, and
`cut_existing=True` also RSTs the live ones. A change never waits on wall time (see `NetPath.set_state`), so a
timeline event lands at its sim time at any speed. Times and rates are per sim-second, on the run's clock.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import math
import random
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Annotated, cast

from pydantic import AfterValidator, Field

from backends import _sockets
from backends._sockets import BACKLOG, HOST
from simconfig import ConfigModel, Fraction, PerSecond, Seconds, check_takes, validated
from worlds.base import Clock

# A pipe stops reading its source while this much is delayed or paced but not yet written.
_HIGH_WATER = 1 << 20
# Pacing granularity: a bandwidth-limited chunk leaves in slices of about this much wall time.
_SLICE_LOOP_S = 0.01


log = logging.getLogger(__name__)


class PathState(StrEnum):
    OPEN = "open"
    BLACKHOLE = "blackhole"
    REFUSE = "refuse"
    RESET = "reset"
    LATENCY = "latency"
    FLAP = "flap"
    BANDWIDTH = "bandwidth"


class Outcome(StrEnum):
    """What became of an accepted connection (blackholed and refused ones never reach us)."""

    RELAYED = "relayed"
    UPSTREAM_ERROR = "upstream_error"  # dial to the backend failed; the client got RST
    RESET = "reset"  # by the `reset` state, or accepted just as the listener closed
    HELD = "held"  # lost by `flap`


_ALIASES = {"loss": PathState.FLAP}
MIN_PERIOD_S = 0.001  # the shortest flap slot, sim s (0 = per connection)
# The parameters each state takes: (required, optional).
_TAKES: dict[PathState, tuple[frozenset[str], frozenset[str]]] = {
    PathState.LATENCY: (frozenset({"latency_s"}), frozenset({"jitter_s"})),
    PathState.FLAP: (frozenset({"loss"}), frozenset({"period_s"})),
    PathState.BANDWIDTH: (frozenset({"rate_bytes_per_s"}), frozenset()),
}


def parse_state(state: str) -> PathState:
    try:
        return _ALIASES.get(state) or PathState(state)
    except ValueError:
        allowed = ", ".join([*PathState, *_ALIASES])
        raise ValueError(f"unknown path state {state!r} (one of {allowed})") from None


def _period(v: float | None) -> float | None:
    if v is not None and 0 < v < MIN_PERIOD_S:
        # A vanishing slot would make the slot number overflow; nothing below a millisecond is meaningful.
        raise ValueError(f"must be 0 or at least {MIN_PERIOD_S:g} sim s")
    return v


class PathParams(ConfigModel):
    """The parameters of the path states, each given only for the states that take it (`fit`)."""

    latency_s: Annotated[Seconds, Field(ge=0)] | None = None  # latency
    jitter_s: Annotated[Seconds, Field(ge=0)] | None = None  # latency
    loss: Annotated[Fraction, Field(ge=0, le=1)] | None = None  # flap
    # flap: 0 (the default) per connection; > 0 per slot of this many sim seconds (at least MIN_PERIOD_S)
    period_s: Annotated[Seconds, Field(ge=0), AfterValidator(_period)] | None = None
    rate_bytes_per_s: Annotated[PerSecond, Field(gt=0)] | None = None  # bandwidth

    def given(self) -> dict[str, float]:
        """The parameters given, by name (null counts as not given)."""
        return {name: getattr(self, name) for name in type(self).model_fields
                if name in PathParams.model_fields and getattr(self, name) is not None}

    def fit(self, state: str) -> PathState:
        """The state, if it takes exactly these parameters; ValueError names what is missing or not taken."""
        st = parse_state(state)
        required, optional = _TAKES.get(st, (frozenset(), frozenset()))
        check_takes(f"path state {st.value}", self.given(), required, optional)
        return st


@dataclass(frozen=True, slots=True)
class PathConfig:
    """A path state and its parameters (zero where the state takes none)."""

    state: PathState = PathState.OPEN
    latency_s: float = 0.0
    jitter_s: float = 0.0
    loss: float = 0.0
    period_s: float = 0.0  # flap: 0 = loss drawn per connection, > 0 = per slot of this many sim seconds
    rate_bytes_per_s: float = 0.0

    @classmethod
    def parse(cls, state: str, params: Mapping[str, object]) -> PathConfig:
        """Validate a state and its parameters (PathParams' rules); ValueError names what is wrong."""
        p = validated(PathParams, params)
        return cls(p.fit(state), **p.given())

    def params(self) -> dict[str, float]:
        """The parameters this state takes, by name."""
        required, optional = _TAKES.get(self.state, (frozenset(), frozenset()))
        return {name: getattr(self, name) for name in PathParams.model_fields if name in required | optional}


# A flapping path "can serve" while it loses less than this share of new connections (a scenario's
# `ground_truth.flap_can_serve_below`): it decides what counts as a false ejection of a flapping target.
FLAP_CAN_SERVE_BELOW = 0.5


def could_serve(backend_mode: str, path_state: str, loss: float = 0.0,
                flap_can_serve_below: float = FLAP_CAN_SERVE_BELOW) -> bool:
    """Ground truth: could a request sent to this target now get a successful answer?

    True iff the backend answers successfully (`healthy`, or `slow`: late is not lost) and the path
    delivers (`open`, `latency`, `bandwidth`, or `flap` losing less than `flap_can_serve_below` of the
    connections, half by default). This
    describes the target, not any checker: a slow target that misses a probe timeout still could serve.
    A flap in slots is judged by its loss too, not by the current slot: a target that delivers most of the
    time is capacity a health checker should keep, and no checker can follow slots a few probes long.
    """
    if backend_mode not in ("healthy", "slow"):
        return False
    state = parse_state(path_state)
    if state is PathState.FLAP:
        return loss < flap_can_serve_below
    return state in (PathState.OPEN, PathState.LATENCY, PathState.BANDWIDTH)


def slot_lost(seed: str, slot: int, loss: float) -> bool:
    """Whether a time-slotted `flap` path holds the connections of slot number `slot` (a pure function)."""
    digest = hashlib.blake2b(f"{seed}:{slot}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < loss


class _Mark(Enum):
    """What a pipe carries besides bytes: the source's EOF (half-close) and its close."""

    EOF = "eof"
    CLOSE = "close"


class _Side(asyncio.Protocol):
    """One socket of a connection through the path: the client's (accepted) or the upstream's (dialled)."""

    def __init__(self, path: NetPath) -> None:
        self.path = path
        self.transport: asyncio.Transport | None = None
        self.relay: _Relay | None = None
        self.out: _Pipe | None = None  # where what this side reads goes; None: discard (held)
        self.into: _Pipe | None = None  # the pipe that writes to this side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass, so no isinstance
        self.path._sides[self] = None
        if self.relay is None:
            self.path._accepted(self)
        else:
            self.relay.upstream_made(self)

    def data_received(self, data: bytes) -> None:
        if self.out is not None:
            self.out.feed(data)

    def eof_received(self) -> bool:
        if self.out is not None:
            self.out.feed(_Mark.EOF)
        return True  # half-close: the other direction may still carry data

    def pause_writing(self) -> None:
        if self.into is not None:
            self.into.set_blocked(True)

    def resume_writing(self) -> None:
        if self.into is not None:
            self.into.set_blocked(False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.path._lost(self)
        if self.relay is not None:
            self.relay.lost(self, exc)


class _Pipe:
    """One direction of a relayed connection: reads from `src`, delays or paces, writes to `dst`.

    Chunks and marks queue with the wall time they are due. The source stops reading while the destination
    pushes back or too much is queued, so memory stays bounded whatever the shaping.
    """

    def __init__(self, src: _Side, config: PathConfig, clock: Clock, rng: random.Random) -> None:
        self._loop = asyncio.get_running_loop()
        self._src = src
        self.dst: _Side | None = None  # set once the upstream is connected
        self._config = config
        self._clock = clock
        self._rng = rng
        self._queue: collections.deque[tuple[float, bytes | _Mark]] = collections.deque()
        self._queued = 0
        self._last_due = 0.0
        self._link_free = 0.0  # bandwidth: when the previous chunk has finished "transmitting"
        self._timer: asyncio.TimerHandle | None = None
        self._blocked = False
        self._reading = True
        self._closed = False
        self.eof_sent = False
        src.out = self
        self._flush()  # no destination yet: the source waits

    def connect(self, dst: _Side) -> None:
        self.dst = dst
        dst.into = self
        self._flush()

    def feed(self, data: bytes | _Mark) -> None:
        if self._closed:
            return
        cfg = self._config
        if cfg.state is PathState.OPEN and not self._queue and self._writable():
            self._write(data)
            return
        now = self._loop.time()
        due = now
        if cfg.state is PathState.LATENCY:
            delay = cfg.latency_s + self._rng.uniform(-cfg.jitter_s, cfg.jitter_s)
            due += self._clock.to_loop(max(0.0, delay))
        due = max(due, self._last_due)  # jitter must not reorder
        if cfg.state is PathState.BANDWIDTH and isinstance(data, bytes):
            rate = cfg.rate_bytes_per_s / self._clock.to_loop(1.0)  # bytes per loop second
            step = max(1, int(rate * _SLICE_LOOP_S))
            for i in range(0, len(data), step):
                piece = data[i : i + step]
                due = max(due, self._link_free)
                self._link_free = due + len(piece) / rate
                self._enqueue(due, piece)
        else:
            self._enqueue(due, data)
        self._flush()

    def set_blocked(self, blocked: bool) -> None:
        self._blocked = blocked
        self._flush()

    def close(self) -> None:
        """Drop whatever is still queued and ignore what comes: the destination is gone."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._queue.clear()
        self._queued = 0

    def _enqueue(self, due: float, data: bytes | _Mark) -> None:
        self._last_due = due
        self._queue.append((due, data))
        self._queued += len(data) if isinstance(data, bytes) else 0

    def _writable(self) -> bool:
        return self.dst is not None and not self._blocked

    def _write(self, data: bytes | _Mark) -> None:
        assert self.dst is not None and self.dst.transport is not None and self.dst.relay is not None
        transport = self.dst.transport
        if transport.is_closing():
            return
        if data is _Mark.CLOSE:
            transport.close()
        elif data is _Mark.EOF:
            self.eof_sent = True
            transport.write_eof()
            self.dst.relay.eof_sent()
        else:
            transport.write(data)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        now = self._loop.time()
        while self._queue and self._writable() and self._queue[0][0] <= now:
            _, data = self._queue.popleft()
            self._queued -= len(data) if isinstance(data, bytes) else 0
            self._write(data)
        if self._queue and self._writable():
            self._timer = self._loop.call_at(self._queue[0][0], self._flush)
        # Backpressure: read the source only while the destination takes data and the queue is short.
        reading = self._writable() and self._queued < _HIGH_WATER
        src = self._src.transport
        if reading != self._reading and src is not None:
            self._reading = reading
            if reading:
                src.resume_reading()
            else:
                src.pause_reading()


class _Relay:
    """A client connection relayed to the upstream: two sides, two pipes, and the dial in between."""

    def __init__(self, path: NetPath, client: _Side, config: PathConfig) -> None:
        self._path = path
        self._config = config
        self.client = client
        self.upstream: _Side | None = None
        client.relay = self
        self.up = _Pipe(client, config, path.clock, path._rng)
        self.down: _Pipe | None = None
        self._closed = False
        self.dial = asyncio.get_running_loop().create_task(self._dial())
        path._dials[self.dial] = None
        self.dial.add_done_callback(lambda dial: path._dials.pop(dial, None))

    async def _dial(self) -> None:
        path = self._path
        upstream = _Side(path)
        upstream.relay = self
        try:
            await asyncio.get_running_loop().create_connection(
                lambda: upstream, path.upstream_host, path.upstream_port
            )
        except OSError:
            path._count(Outcome.UPSTREAM_ERROR)
            _sockets.reset(self.client.transport)
        except asyncio.CancelledError:
            # uvloop closes a cancelled create_connection's transport without connection_lost, even after
            # connection_made ran: forget that side here, or stop() waits its whole guard for it.
            if upstream.transport is not None and upstream in path._sides:
                _sockets.reset(upstream.transport)
                path._lost(upstream)
            raise

    def upstream_made(self, upstream: _Side) -> None:
        # Wired here rather than after create_connection returns: the upstream may speak first.
        self._path._count(Outcome.RELAYED)
        if self._closed:  # the client left while we dialled
            _sockets.reset(upstream.transport)
            return
        self.upstream = upstream
        self.down = _Pipe(upstream, self._config, self._path.clock, self._path._rng)
        self.down.connect(self.client)
        self.up.connect(upstream)

    def eof_sent(self) -> None:
        # Both directions half-closed and forwarded: nothing more can flow, so close both sockets.
        if self.up.eof_sent and self.down is not None and self.down.eof_sent:
            for side in (self.client, self.upstream):
                if side is not None and side.transport is not None:
                    side.transport.close()

    def lost(self, side: _Side, exc: Exception | None) -> None:
        """One socket is gone: take the other down the same way, RST for a reset, else FIN after what
        the lost side sent and is still queued (delayed or paced) has gone out."""
        self._closed = True
        if side is self.client:
            self.dial.cancel()
        if side.into is not None:
            side.into.close()
        if side.out is not None:
            if exc is None:
                side.out.feed(_Mark.CLOSE)
            else:
                side.out.close()
                other = side.out.dst
                _sockets.reset(other.transport if other is not None else None)


class NetPath:
    """A TCP relay listening on 127.0.0.1 in front of one upstream, in one `PathState` at a time."""

    def __init__(
        self,
        target_id: str,
        upstream_host: str,
        upstream_port: int,
        rng_seed: int | str = 0,
        *,
        clock: Clock,
        host: str = HOST,
    ) -> None:
        """`clock`: the run's; a time-slotted `flap` reads it, so every path's slots line up with the scenario's
        time."""
        self.target_id = target_id
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.clock = clock
        self.host = host
        self.port = 0
        self._rng = random.Random(rng_seed)
        self._seed = str(rng_seed)
        self._config = PathConfig()
        self._counts: collections.Counter[str] = collections.Counter()
        self._cut = 0
        # Exactly one of these holds the port, according to the state.
        self._server: asyncio.Server | None = None
        self._reserved: socket.socket | None = None
        self._blackhole: _sockets.Blackhole | None = None
        # Insertion-ordered dicts, not sets: sets of objects iterate in memory-address order, and the order
        # of the RSTs sent to them must be the same in every run.
        self._sides: dict[_Side, None] = {}
        self._dials: dict[asyncio.Task[None], None] = {}
        self._all_gone: asyncio.Event | None = None
        self._lock = asyncio.Lock()

    @property
    def config(self) -> PathConfig:
        return self._config

    @property
    def counts(self) -> dict[str, int]:
        """Accepted connections by `Outcome`, plus `cut`: live connections RST by `cut_existing`."""
        return {o.value: self._counts[o] for o in Outcome} | {"cut": self._cut}

    @property
    def active(self) -> int:
        """Open sockets, both client and upstream sides."""
        return len(self._sides)

    async def start(self, port: int = 0) -> int:
        """Listen on (host, port), 0 for an ephemeral port, in the current state; return the port."""
        if self.port:
            raise RuntimeError("already started")
        self._reserved = _sockets.bind(self.host, port)
        self.port = self._reserved.getsockname()[1]
        starting = await self._hold_port(self._config.state)
        if starting is not None:
            await starting.start_serving()
        return self.port

    async def set_state(
        self, state: PathState | str, /, *, cut_existing: bool = False, **params: object
    ) -> None:
        """Change state; ValueError (and no change) on an unknown state or a bad parameter.

        The change is complete, on the wire too, before this coroutine first yields (unless another change
        of this path still holds the lock): the port already refuses, blackholes or listens, and new
        connections meet the new parameters. Nothing in it waits on wall time, so the changes of many paths
        started together in one loop iteration all take effect in that iteration.
        """
        config = PathConfig.parse(state, params)
        async with self._lock:
            if not self.port:
                raise RuntimeError("start() the path first")
            starting = await self._hold_port(config.state)
            self._config = config
            if cut_existing:
                self._cut += sum(1 for s in self._sides if s.relay is None or s is s.relay.client)
                for side in list(self._sides):
                    _sockets.reset(side.transport)
            if starting is not None:
                # Its synchronous part listens; asyncio's then lets one loop iteration pass before returning.
                await starting.start_serving()

    async def stop(self) -> None:
        """Release the port and every connection, relayed, held or half-dialled."""
        async with self._lock:
            self._release_port()
            self.port = 0
            for side in list(self._sides):
                _sockets.reset(side.transport)
            for dial in list(self._dials):
                dial.cancel()
            await asyncio.gather(*self._dials, return_exceptions=True)
            if self._sides:
                # connection_lost follows an abort within a loop turn or two; the bound only guards a bug.
                self._all_gone = asyncio.Event()
                try:
                    async with asyncio.timeout(5.0):
                        await self._all_gone.wait()
                except TimeoutError:
                    # Every transport is aborted already (its fd closed); only the callbacks are late, e.g. on
                    # a loop overloaded by a fast run. Say so rather than fail the whole shutdown.
                    log.warning("netpath %s: %d connections not confirmed closed at stop", self.target_id,
                                len(self._sides))

    async def _hold_port(self, state: PathState) -> asyncio.Server | None:
        """Hold the port the way `state` needs: bound only (refuse), as a blackhole, or listening.

        Never yields to the loop, so that a state change takes effect at once. A new server is returned for
        the caller to start serving (its synchronous part listens), None if there is none."""
        if state is PathState.REFUSE:
            held = self._reserved is not None
        elif state is PathState.BLACKHOLE:
            held = self._blackhole is not None
        else:
            held = self._server is not None
        if held:
            return None
        if self._reserved is None:  # a listener holds it: close that and bind afresh
            self._release_port()
            self._reserved = _sockets.bind(self.host, self.port)
        if state is PathState.REFUSE:
            return None
        sock, self._reserved = self._reserved, None
        if state is PathState.BLACKHOLE:
            self._blackhole = _sockets.Blackhole.open(sock)
            return None
        try:
            # Given a socket and start_serving=False, create_server neither resolves nor waits, in asyncio and
            # uvloop alike: this await does not yield.
            server = await asyncio.get_running_loop().create_server(
                lambda: _Side(self), sock=sock, backlog=BACKLOG, start_serving=False
            )
        except BaseException:
            sock.close()
            raise
        self._server = server
        return server

    def _release_port(self) -> None:
        if self._server is not None:
            self._server.close()  # closes the listening socket now; live connections stay
            self._server = None
        if self._blackhole is not None:
            self._blackhole.close()
            self._blackhole = None
        if self._reserved is not None:
            self._reserved.close()
            self._reserved = None

    def _count(self, outcome: Outcome) -> None:
        self._counts[outcome] += 1

    def _accepted(self, client: _Side) -> None:
        config = self._config
        # A connection accepted just before the listener closed (a state change, stop) is reset, as the
        # kernel resets those still queued on a closed listener.
        if config.state is PathState.RESET or self._server is None:
            self._count(Outcome.RESET)
            _sockets.reset(client.transport)
        elif config.state is PathState.FLAP and self._holds(config):
            self._count(Outcome.HELD)  # out stays None: read and discard, never answer
        else:
            _Relay(self, client, config)

    def _holds(self, config: PathConfig) -> bool:
        if config.period_s > 0:
            return slot_lost(self._seed, math.floor(self.clock.now() / config.period_s), config.loss)
        return self._rng.random() < config.loss

    def _lost(self, side: _Side) -> None:
        self._sides.pop(side, None)
        if not self._sides and self._all_gone is not None:
            self._all_gone.set()
