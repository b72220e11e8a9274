"""`SimLoop`: asyncio's selector event loop in virtual time over a `SimNetwork`, deterministic and thread-free.

* Time is virtual: `time()` starts at 0.0 and only moves when nothing is ready to run; then it jumps to the
  next timer. With nothing ready and no timer pending the run could never finish: `SimDeadlock`.
* Order is deterministic: timers due at the same time run in the order they were set ((when, seq) heap), and
  I/O callbacks in the order their sockets became ready. The selector never scans idle sockets: a socket
  reports that its readiness may have changed, and only those are looked at.
* No threads: no self-pipe, no executor (`run_in_executor` raises), `getaddrinfo` answers IP literals and
  "localhost" at once and refuses other names. Nothing here reads a wall clock or the global RNG.
* `create_server`, `create_connection` and `create_datagram_endpoint` without `sock=` make the socket on the
  network, bind/connect it, and hand it to asyncio's own code with `sock=`; everything after that (transports,
  flow control, `sock_*` calls) is asyncio's selector code unchanged.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import errno
import functools
import heapq
import selectors
import signal
import socket
from asyncio import base_events, events, format_helpers
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, cast

from worlds.sim.net import SimNetwork, SimSocket, _oserror

# Timers closer than this to "now" count as due (asyncio's _run_once needs a positive resolution).
_CLOCK_RESOLUTION = 1e-9
# asyncio's thresholds for sweeping cancelled timers out of the heap (base_events, same names without the _S).
_MAX_SELECT_TIMEOUT: float = base_events.MAXIMUM_SELECT_TIMEOUT  # type: ignore[attr-defined]
_MIN_SCHEDULED = base_events._MIN_SCHEDULED_TIMER_HANDLES  # type: ignore[attr-defined]
_MIN_CANCELLED_FRACTION = base_events._MIN_CANCELLED_TIMER_HANDLES_FRACTION  # type: ignore[attr-defined]
# Network packets run in one shared, empty context rather than a copy of the sender's each.
_NET_CONTEXT = contextvars.Context()
_Connection = tuple[asyncio.Transport, asyncio.BaseProtocol]
_Datagram = tuple[asyncio.DatagramTransport, asyncio.BaseProtocol]
# connect_ex results asyncio's _sock_connect waits out (it catches them as BlockingIOError, InterruptedError)
_CONNECT_PENDING = frozenset((errno.EINPROGRESS, errno.EALREADY, errno.EAGAIN, errno.EINTR))
_SelectorKey = selectors.SelectorKey
_new_object = object.__new__
_new_key = tuple.__new__  # SelectorKey(...) without the namedtuple's Python-level __new__
_EVENT_READ = selectors.EVENT_READ
_EVENT_WRITE = selectors.EVENT_WRITE
_Timer = tuple[float, int, "SimTimerHandle"]


class SimDeadlock(RuntimeError):
    """Every task waits on something that no timer and no packet will ever bring: the run would sleep forever."""


class SimHandle(events.Handle):
    """A `call_soon` callback: asyncio's Handle, made without its per-handle debug check (SimLoop checks once)."""

    __slots__ = ()
    if TYPE_CHECKING:  # asyncio's own slots, which typeshed leaves out
        _callback: Any
        _args: Any
        _context: contextvars.Context
        _cancelled: bool
        _source_traceback: Any

    def __init__(
        self, callback: Callable[..., object], args: Sequence[Any], loop: SimLoop, context: contextvars.Context,
    ) -> None:
        if loop._debug:
            super().__init__(callback, args, loop, context)
            return
        self._context = context
        self._loop = loop
        self._callback = callback
        self._args = args
        self._cancelled = False
        self._repr = None
        self._source_traceback = None

    def cancel(self) -> None:
        if not self._cancelled:
            if self._loop._debug:
                super().cancel()
                return
            self._cancelled = True
            self._callback = None
            self._args = None


class SimTimerHandle(asyncio.TimerHandle):
    """A timer ordered by (when, seq): timers due at the same virtual time run first-in, first-out.

    SimLoop's heap holds (when, seq, handle) tuples, so ordering them is a C tuple comparison.
    """

    __slots__ = ("_seq",)
    if TYPE_CHECKING:  # asyncio's own slots, which typeshed leaves out
        _when: float
        _scheduled: bool
        _callback: Any
        _args: Any
        _context: contextvars.Context
        _cancelled: bool
        _source_traceback: Any

    def __init__(
        self, when: float, seq: int, callback: Callable[..., object], args: Sequence[Any],
        loop: SimLoop, context: contextvars.Context | None = None,
    ) -> None:
        self._seq = seq
        if loop._debug:
            super().__init__(when, callback, args, loop, context)
            return
        self._context = context if context is not None else contextvars.copy_context()
        self._loop = loop
        self._callback = callback
        self._args = args
        self._cancelled = False
        self._repr = None
        self._source_traceback = None
        self._when = when
        self._scheduled = False

    def cancel(self) -> None:
        if not self._cancelled:
            loop: Any = self._loop
            if loop._debug:
                super().cancel()
                return
            if self._scheduled:
                loop._timer_cancelled_count += 1  # BaseEventLoop._timer_handle_cancelled
            self._cancelled = True
            self._callback = None
            self._args = None

    def __lt__(self, other: SimTimerHandle) -> bool:  # type: ignore[override]
        if self._when != other._when:
            return self._when < other._when
        return self._seq < other._seq

    def __gt__(self, other: SimTimerHandle) -> bool:  # type: ignore[override]
        return other.__lt__(self)

    def __le__(self, other: SimTimerHandle) -> bool:  # type: ignore[override]
        return not other.__lt__(self)

    def __ge__(self, other: SimTimerHandle) -> bool:  # type: ignore[override]
        return not self.__lt__(other)


class SimSelector(selectors._BaseSelectorImpl):
    """A selector over a `SimNetwork`'s sockets, fed by their readiness changes; advances virtual time."""

    def __init__(self, network: SimNetwork) -> None:
        super().__init__()
        self._net = network
        self._loop: SimLoop | None = None

    def get_key(self, fileobj: Any) -> selectors.SelectorKey:
        # asyncio asks this (and expects KeyError) before every add/remove of a reader or writer: keep it cheap.
        if self._map is None:  # type: ignore[attr-defined]
            raise RuntimeError("Selector is closed")
        fd = fileobj if type(fileobj) is int else self._fileobj_lookup(fileobj)  # type: ignore[attr-defined]
        key: selectors.SelectorKey = self._fd_to_key[fd]  # type: ignore[attr-defined]  # KeyError if not registered
        return key

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        key = super().register(fileobj, events, data)
        self._net._dirty[key.fd] = None  # new interest: is it ready for it already?
        return key

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        key = super().modify(fileobj, events, data)
        self._net._dirty[key.fd] = None
        return key

    def _collect(self, loop: SimLoop) -> bool:
        """`select(0)` and asyncio's `_process_events` in one pass: queue the reader/writer callbacks of every
        ready socket on the loop, in the order the sockets became ready; say whether there were any."""
        dirty = self._net._dirty
        keys = self._fd_to_key  # type: ignore[attr-defined]
        socks = self._net._sockets
        ready = loop._ready
        idle: list[int] = []
        found = False
        for fd in dirty:
            key = keys.get(fd)
            sock = socks.get(fd)
            mask = key.events & sock._events() if key is not None and sock is not None else 0
            if not mask:
                idle.append(fd)
                continue
            found = True
            reader, writer = key.data
            if mask & _EVENT_READ and reader is not None:
                if reader._cancelled:
                    loop._remove_reader(key.fileobj)
                else:
                    ready.append(reader)
            if mask & _EVENT_WRITE and writer is not None:
                if writer._cancelled:
                    loop._remove_writer(key.fileobj)
                else:
                    ready.append(writer)
        for fd in idle:
            del dirty[fd]  # still-ready sockets stay (level-triggered), in the order they became ready
        return found

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        dirty = self._net._dirty
        if dirty:
            ready: list[tuple[selectors.SelectorKey, int]] = []
            keys = self._fd_to_key  # type: ignore[attr-defined]
            socks = self._net._sockets
            idle: list[int] = []
            for fd in dirty:
                key = keys.get(fd)
                sock = socks.get(fd)
                mask = key.events & sock._events() if key is not None and sock is not None else 0
                if mask:
                    ready.append((key, mask))
                else:
                    idle.append(fd)
            for fd in idle:
                del dirty[fd]  # still-ready sockets stay (level-triggered), in the order they became ready
            if ready:
                return ready
        loop = self._loop
        assert loop is not None
        if timeout is None:
            raise SimDeadlock(loop._deadlock_report())
        if timeout > 0:
            loop._advance(timeout)
        return []


class SimLoop(asyncio.SelectorEventLoop):
    """An asyncio selector event loop whose clock is virtual and whose sockets live on a `SimNetwork`."""

    if TYPE_CHECKING:  # BaseEventLoop's own attributes, which typeshed leaves out
        _scheduled: list[_Timer]
        _timer_cancelled_count: int
        _ready: collections.deque[events.Handle]
        _stopping: bool
        _debug: bool
        _closed: bool
        _current_handle: events.Handle | None

    def __init__(self, network: SimNetwork | None = None) -> None:
        self._network = network if network is not None else SimNetwork()
        self._now = 0.0
        self._timer_seq = 0
        self._sim_signals: dict[int, tuple[events.Handle, Any]] = {}
        selector = SimSelector(self._network)
        super().__init__(selector)
        self._clock_resolution = _CLOCK_RESOLUTION
        selector._loop = self
        self._sim_selector = selector
        self._network._attach(self)

    @property
    def network(self) -> SimNetwork:
        return self._network

    # -- virtual time --------------------------------------------------------------------------------------

    def time(self) -> float:
        return self._now

    def _advance(self, timeout: float) -> None:
        """Nothing is ready: jump to the next timer (exactly to its deadline), or by `timeout` if that is less."""
        now = self._now
        sched: list[_Timer] = self._scheduled
        if sched:
            when = sched[0][0]
            if when - now <= timeout:
                self._now = max(now, when)
                return
        self._now = now + timeout

    def _run_once(self) -> None:
        """asyncio's `BaseEventLoop._run_once`, step for step, over the (when, seq, handle) heap and the
        selector's readiness queue, with the callbacks run inline (Handle._run's error handling kept)."""
        sched: list[_Timer] = self._scheduled
        count = len(sched)
        if count > _MIN_SCHEDULED and self._timer_cancelled_count / count > _MIN_CANCELLED_FRACTION:
            kept = []
            for entry in sched:
                if entry[2]._cancelled:
                    entry[2]._scheduled = False
                else:
                    kept.append(entry)
            heapq.heapify(kept)
            self._scheduled = sched = kept
            self._timer_cancelled_count = 0
        else:
            while sched and sched[0][2]._cancelled:
                self._timer_cancelled_count -= 1
                heapq.heappop(sched)[2]._scheduled = False
        ready = self._ready
        found = self._selector._collect(self) if self._network._dirty else False  # type: ignore[attr-defined]
        if not found and not ready and not self._stopping:
            if not sched:
                raise SimDeadlock(self._deadlock_report())
            now = self._now
            timeout = min(max(0, sched[0][0] - now), _MAX_SELECT_TIMEOUT)
            if timeout > 0:
                self._advance(timeout)
        end_time = self._now + self._clock_resolution
        heappop = heapq.heappop
        while sched and sched[0][0] < end_time:
            timer = heappop(sched)[2]
            timer._scheduled = False
            ready.append(timer)
        popleft = ready.popleft
        debug = self._debug
        handle: events.Handle | None
        for _ in range(len(ready)):
            handle = popleft()
            if handle._cancelled:
                continue
            if debug:
                self._current_handle = handle
            try:
                handle._context.run(handle._callback, *handle._args)  # type: ignore[attr-defined]
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._callback_failed(handle, exc)
            if debug:
                self._current_handle = None
        handle = None  # break cycles when an exception occurs

    def _callback_failed(self, handle: events.Handle, exc: BaseException) -> None:
        """What asyncio's `Handle._run` does when its callback raises."""
        h: Any = handle
        cb = format_helpers._format_callback_source(h._callback, h._args)
        context: dict[str, Any] = {"message": f"Exception in callback {cb}", "exception": exc, "handle": handle}
        if h._source_traceback:
            context["source_traceback"] = h._source_traceback
        self.call_exception_handler(context)

    def call_soon(  # type: ignore[override]
        self, callback: Callable[..., object], *args: Any, context: contextvars.Context | None = None
    ) -> events.Handle:
        if self._debug:
            return super().call_soon(callback, *args, context=context)
        if self._closed:
            raise RuntimeError("Event loop is closed")
        # SimHandle.__init__ inlined: this runs for every future callback and task step
        handle: Any = _new_object(SimHandle)
        handle._context = context if context is not None else contextvars.copy_context()
        handle._loop = self
        handle._callback = callback
        handle._args = args
        handle._cancelled = False
        handle._repr = None
        handle._source_traceback = None
        self._ready.append(handle)
        made: events.Handle = handle
        return made

    def call_later(  # type: ignore[override]
        self, delay: float, callback: Callable[..., object], *args: Any, context: contextvars.Context | None = None
    ) -> asyncio.TimerHandle:
        if delay is None:
            raise TypeError("delay must not be None")
        return self.call_at(self._now + delay, callback, *args, context=context)

    def call_at(  # type: ignore[override]
        self, when: float, callback: Callable[..., object], *args: Any, context: contextvars.Context | None = None
    ) -> asyncio.TimerHandle:
        if when is None:
            raise TypeError("when cannot be None")
        if self._closed:
            raise RuntimeError("Event loop is closed")
        if self._debug:
            self._check_thread()  # type: ignore[attr-defined]
            self._check_callback(callback, "call_at")  # type: ignore[attr-defined]
        seq = self._timer_seq = self._timer_seq + 1
        timer = SimTimerHandle(when, seq, callback, args, self, context)
        if timer._source_traceback:
            del timer._source_traceback[-1]
        heapq.heappush(self._scheduled, (when, seq, timer))
        timer._scheduled = True
        return timer

    def _sim_call_at(self, when: float, callback: Callable[..., object], args: tuple[Any, ...]) -> SimTimerHandle:
        """`call_at` for the network's packets: no checks, no context copy."""
        seq = self._timer_seq = self._timer_seq + 1
        timer = SimTimerHandle(when, seq, callback, args, self, _NET_CONTEXT)
        heapq.heappush(self._scheduled, (when, seq, timer))
        timer._scheduled = True
        return timer

    def _sim_push(self, when: float, timer: SimTimerHandle) -> None:
        """Schedule an existing, never-cancelled timer again (the network's one packet-delivery timer)."""
        seq = self._timer_seq = self._timer_seq + 1
        timer._when = when
        heapq.heappush(self._scheduled, (when, seq, timer))
        timer._scheduled = True

    # -- readers and writers: asyncio's _add_reader & co. on the selector's key table directly -------------

    def _add_reader(self, fd: Any, callback: Callable[..., object], *args: Any) -> events.Handle:
        if type(fd) is not int or self._debug:
            return cast(events.Handle, super()._add_reader(fd, callback, *args))  # type: ignore[misc]
        return self._sim_add(fd, _EVENT_READ, callback, args)

    def _add_writer(self, fd: Any, callback: Callable[..., object], *args: Any) -> events.Handle:
        if type(fd) is not int or self._debug:
            return cast(events.Handle, super()._add_writer(fd, callback, *args))  # type: ignore[misc]
        return self._sim_add(fd, _EVENT_WRITE, callback, args)

    def _remove_reader(self, fd: Any) -> bool:
        if type(fd) is not int or self._debug:
            return cast(bool, super()._remove_reader(fd))  # type: ignore[misc]
        return self._sim_remove(fd, _EVENT_READ)

    def _remove_writer(self, fd: Any) -> bool:
        if type(fd) is not int or self._debug:
            return cast(bool, super()._remove_writer(fd))  # type: ignore[misc]
        return self._sim_remove(fd, _EVENT_WRITE)

    def _sim_add(self, fd: int, event: int, callback: Callable[..., object], args: tuple[Any, ...]) -> events.Handle:
        """asyncio's `_add_reader`/`_add_writer`: the same key updates, readiness checks and cancels, in order."""
        if self._closed:
            raise RuntimeError("Event loop is closed")
        handle = SimHandle(callback, args, self, contextvars.copy_context())
        selector = self._sim_selector
        keys = selector._fd_to_key  # type: ignore[attr-defined]
        if selector._map is None:  # type: ignore[attr-defined]
            raise RuntimeError("Selector is closed")
        key = keys.get(fd)
        old = None
        if key is None:
            data = (handle, None) if event == _EVENT_READ else (None, handle)
            keys[fd] = _new_key(_SelectorKey, (fd, fd, event, data))
        else:
            reader, writer = key.data
            mask = key.events | event
            fileobj = key.fileobj if mask == key.events else fd
            if event == _EVENT_READ:
                keys[fd] = _new_key(_SelectorKey, (fileobj, fd, mask, (handle, writer)))
                old = reader
            else:
                keys[fd] = _new_key(_SelectorKey, (fileobj, fd, mask, (reader, handle)))
                old = writer
        self._network._dirty[fd] = None  # new interest: is it ready for it already?
        if old is not None:
            old.cancel()
        return handle

    def _sim_remove(self, fd: int, event: int) -> bool:
        """asyncio's `_remove_reader`/`_remove_writer` (see `_sim_add`)."""
        if self._closed:
            return False
        selector = self._sim_selector
        if selector._map is None:  # type: ignore[attr-defined]
            raise RuntimeError("Selector is closed")
        keys = selector._fd_to_key  # type: ignore[attr-defined]
        key = keys.get(fd)
        if key is None:
            return False
        reader, writer = key.data
        mask = key.events & ~event
        if not mask:
            del keys[fd]
        else:
            fileobj = key.fileobj if mask == key.events else fd
            data = (None, writer) if event == _EVENT_READ else (reader, None)
            keys[fd] = _new_key(_SelectorKey, (fileobj, fd, mask, data))
            self._network._dirty[fd] = None
        old = reader if event == _EVENT_READ else writer
        if old is not None:
            old.cancel()
            return True
        return False

    def _deadlock_report(self) -> str:
        tasks = [t for t in asyncio.all_tasks(self) if not t.done()]
        names = []
        for t in tasks[:8]:
            coro = t.get_coro()
            names.append(f"{t.get_name()} ({getattr(coro, '__qualname__', coro)})")
        more = f" and {len(tasks) - 8} more" if len(tasks) > 8 else ""
        waiting = f"; waiting: {', '.join(names)}{more}" if names else ""
        registered = len(self._selector.get_map() or ())  # type: ignore[attr-defined]
        return (
            f"simulated deadlock at t={self._now:.6f}: every task is waiting and no timer is pending, so the run "
            f"would sleep forever ({len(tasks)} unfinished task(s), {registered} fd(s) registered, no packet in "
            f"flight){waiting}"
        )

    # -- no threads ----------------------------------------------------------------------------------------

    def _make_self_pipe(self) -> None:
        self._ssock = None
        self._csock = None

    def _close_self_pipe(self) -> None:
        pass

    def _write_to_self(self) -> None:
        pass  # nothing ever blocks in select(), so a wake-up is never needed

    def run_in_executor(  # type: ignore[override]
        self, executor: Any, func: Callable[..., Any], *args: Any
    ) -> asyncio.Future[Any]:
        raise RuntimeError(
            f"SimLoop runs no threads: run_in_executor({getattr(func, '__qualname__', func)!r}) is not available in "
            "the simulated world (a thread would run outside virtual time); do the work inline or resolve host "
            "names before the run"
        )

    async def getaddrinfo(  # type: ignore[override]
        self, host: str | bytes | None, port: str | int | None, *, family: int = 0, type: int = 0, proto: int = 0,
        flags: int = 0,
    ) -> list[tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[Any, ...]]]:
        return self._network.getaddrinfo(host, port, family, type, proto, flags)

    async def getnameinfo(self, sockaddr: tuple[Any, ...], flags: int = 0) -> tuple[str, str]:
        return str(sockaddr[0]), str(sockaddr[1])

    # -- signals: delivered by Python's signal module, run as loop callbacks -----------------------------

    def add_signal_handler(  # type: ignore[override]
        self, sig: int, callback: Callable[..., object], *args: Any
    ) -> None:
        self._check_closed()  # type: ignore[attr-defined]
        handle = events.Handle(callback, args, self, None)

        def on_signal(signum: int, frame: Any) -> None:
            self._add_callback_signalsafe(handle)  # type: ignore[attr-defined]

        try:
            previous = signal.signal(sig, on_signal)
        except ValueError as e:  # not the main thread, or not a signal
            raise RuntimeError(f"SimLoop.add_signal_handler({sig}): {e}") from e
        old = self._sim_signals.pop(sig, None)
        if old is not None:
            old[0].cancel()
            previous = old[1]
        self._sim_signals[sig] = (handle, previous)

    def remove_signal_handler(self, sig: int) -> bool:
        entry = self._sim_signals.pop(sig, None)
        if entry is None:
            return False
        handle, previous = entry
        handle.cancel()
        signal.signal(sig, previous)
        return True

    def close(self) -> None:
        for sig in list(self._sim_signals):
            self.remove_signal_handler(sig)
        super().close()

    # -- sockets from the network --------------------------------------------------------------------------

    async def create_connection(  # type: ignore[override]
        self, protocol_factory: Callable[[], asyncio.BaseProtocol], host: str | None = None, port: int | None = None,
        **kwargs: Any,
    ) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
        base: Any = super()
        if kwargs.get("sock") is not None or (host is None and port is None):
            return cast(_Connection, await base.create_connection(protocol_factory, host, port, **kwargs))
        family = kwargs.pop("family", 0)
        proto = kwargs.pop("proto", 0)
        flags = kwargs.pop("flags", 0)
        local_addr = kwargs.pop("local_addr", None)
        for unused in ("happy_eyeballs_delay", "interleave", "all_errors"):
            kwargs.pop(unused, None)  # one address per name here: nothing to race
        kwargs.pop("sock", None)
        net = self._network
        infos = net.getaddrinfo(host, port, family, socket.SOCK_STREAM, proto, flags)
        local = net.getaddrinfo(local_addr[0], local_addr[1], family, socket.SOCK_STREAM, proto, flags) \
            if local_addr is not None else None
        errors: list[OSError] = []
        sock = None
        for fam, kind, pr, _, address in infos:
            candidate = net.sim_socket(fam, kind, pr)
            try:
                candidate.setblocking(False)
                if local is not None:
                    matching = [la for lf, _, _, _, la in local if lf == fam]
                    if not matching:
                        raise OSError(f"no matching local address with family={fam} found")
                    try:
                        candidate.bind(matching[0])
                    except OSError as e:
                        raise OSError(e.errno, f"error while attempting to bind on address {matching[0]!r}: "
                                               f"{(e.strerror or '').lower()}") from None
                await self._sim_connect(candidate, address)
            except OSError as e:
                candidate.close()
                errors.append(e)
                continue
            except BaseException:
                candidate.close()
                raise
            sock = candidate
            break
        if sock is None:
            if len(errors) == 1 or all(str(e) == str(errors[0]) for e in errors):
                raise errors[0]
            raise OSError(f"Multiple exceptions: {', '.join(str(e) for e in errors)}")
        if kwargs.get("ssl") and kwargs.get("server_hostname") is None:
            kwargs["server_hostname"] = host
        try:
            return cast(_Connection, await base.create_connection(protocol_factory, sock=sock, **kwargs))
        except BaseException:
            sock.close()
            raise

    async def _sim_connect(self, sock: SimSocket, address: tuple[Any, ...]) -> None:
        """`sock_connect` for a new SimSocket and an address from the network's getaddrinfo: asyncio's steps, with
        the same callbacks in the same order, without resolving the address again or raising EINPROGRESS."""
        fut = self.create_future()
        try:
            err = sock.connect_ex(address)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            fut.set_exception(exc)
        else:
            if err in _CONNECT_PENDING:
                fd = sock._fd
                handle = self._add_writer(fd, self._sock_connect_cb, fut, sock, address)  # type: ignore[attr-defined]
                fut.add_done_callback(functools.partial(self._sock_write_done, fd, handle=handle))  # type: ignore[attr-defined]
            elif err:
                fut.set_exception(_oserror(err, str(address)))
            else:
                fut.set_result(None)
        try:
            await fut
        finally:
            del fut  # break cycles when an exception occurs

    async def create_server(
        self, protocol_factory: Callable[[], asyncio.BaseProtocol], host: str | Sequence[str] | None = None,
        port: int | None = None, **kwargs: Any,
    ) -> asyncio.Server:
        base: Any = super()
        if kwargs.get("sock") is not None or (host is None and port is None):
            return cast(asyncio.Server, await base.create_server(protocol_factory, host, port, **kwargs))
        kwargs.pop("sock", None)
        family = kwargs.pop("family", socket.AF_UNSPEC)
        flags = kwargs.pop("flags", socket.AI_PASSIVE)
        reuse_address = kwargs.pop("reuse_address", None)
        reuse_port = kwargs.pop("reuse_port", None)
        keep_alive = kwargs.pop("keep_alive", None)
        if reuse_address is None:
            reuse_address = True  # asyncio's default on Linux
        hosts: Iterable[str | None] = [host] if host is None or isinstance(host, str) else host
        net = self._network
        infos = []
        for h in hosts:
            for info in net.getaddrinfo(h or None, port, family, socket.SOCK_STREAM, 0, flags):
                if info not in infos:
                    infos.append(info)
        socks = []
        try:
            for fam, kind, pr, _, address in infos:
                s = net.sim_socket(fam, kind, pr)
                socks.append(s)
                if reuse_address:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if keep_alive:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                if fam == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    s.bind(address)
                except OSError as e:
                    raise OSError(e.errno, f"error while attempting to bind on address {address!r}: "
                                           f"{(e.strerror or '').lower()}") from None
        except BaseException:
            for s in socks:
                s.close()
            raise
        if len(socks) == 1:
            return cast(asyncio.Server, await base.create_server(protocol_factory, sock=socks[0], **kwargs))
        for s in socks:
            s.setblocking(False)
        server = base_events.Server(
            self, cast(list[socket.socket], socks), protocol_factory, kwargs.get("ssl"), kwargs.get("backlog", 100),
            kwargs.get("ssl_handshake_timeout"), kwargs.get("ssl_shutdown_timeout"),
        )
        if kwargs.get("start_serving", True):
            server._start_serving()  # type: ignore[attr-defined]
            await asyncio.sleep(0)
        return server

    async def create_datagram_endpoint(  # type: ignore[override]
        self, protocol_factory: Callable[[], asyncio.BaseProtocol], local_addr: tuple[str, int] | None = None,
        remote_addr: tuple[str, int] | None = None, **kwargs: Any,
    ) -> tuple[asyncio.DatagramTransport, asyncio.BaseProtocol]:
        base: Any = super()
        if kwargs.get("sock") is not None:
            return cast(_Datagram, await base.create_datagram_endpoint(
                protocol_factory, local_addr, remote_addr, **kwargs))
        kwargs.pop("sock", None)
        family = kwargs.pop("family", 0)
        proto = kwargs.pop("proto", 0)
        flags = kwargs.pop("flags", 0)
        reuse_port = kwargs.pop("reuse_port", None)
        allow_broadcast = kwargs.pop("allow_broadcast", None)
        if isinstance(local_addr, str) or isinstance(remote_addr, str):
            raise ValueError("the simulated network has no AF_UNIX sockets")
        net = self._network
        local = net.getaddrinfo(local_addr[0], local_addr[1], family, socket.SOCK_DGRAM, proto, flags) \
            if local_addr else None
        remote = net.getaddrinfo(remote_addr[0], remote_addr[1], family, socket.SOCK_DGRAM, proto, flags) \
            if remote_addr else None
        if local and remote and local[0][0] != remote[0][0]:
            raise ValueError("local_addr and remote_addr have different address families")
        fam = local[0][0] if local else remote[0][0] if remote else family
        if not fam:
            raise ValueError("unexpected address family")
        sock = net.sim_socket(fam, socket.SOCK_DGRAM, proto)
        try:
            sock.setblocking(False)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if allow_broadcast:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            if local:
                sock.bind(local[0][4])
            if remote:
                sock.connect(remote[0][4])
            return cast(_Datagram, await base.create_datagram_endpoint(protocol_factory, sock=sock, **kwargs))
        except BaseException:
            sock.close()
            raise
