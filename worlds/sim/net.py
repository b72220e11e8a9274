"""An in-memory TCP/UDP network on one simulated host, with Linux loopback semantics, in virtual time.

`SimNetwork.socket()` makes `SimSocket`s: objects with the `socket.socket` API that asyncio's selector transports,
aiohttp, dnspython and lbsim's raw probes use, identified by fake integer file descriptors. Every packet (SYN,
SYN-ACK, ACK, data, FIN, RST, datagram, ICMP port-unreachable) is a timer on the network's `SimLoop`, due one
one-way latency after it was sent; timers due at the same time run in the order they were set, so each
direction of a connection is FIFO. A socket tells the loop's selector when its readiness may have changed
(`_notify`), so a loop iteration never scans idle sockets.

What is modelled (each as Linux does it on loopback; docs/sources.md#linux-tcp has the kernel's documentation):

* Addresses: all of 127.0.0.0/8 and ::1 are this host; bind to one of them or to the wildcard (0.0.0.0, ::);
  port 0 takes the next free ephemeral port from a counter (32768-60999, as `ip_local_port_range`).
  EADDRINUSE follows `inet_csk_bind_conflict`: two sockets on one port conflict when their addresses overlap,
  unless both set SO_REUSEADDR and the other is not listening (checked again by `listen`). Established and
  accepted connections keep their port until closed; nothing lingers in TIME_WAIT.
* TCP handshake: a non-blocking connect returns EINPROGRESS; the SYN reaches the listener after one latency,
  the SYN-ACK makes the client writable with SO_ERROR 0 after a round trip, and the ACK puts the connection on
  the accept queue after one more latency. Nothing listening at the address (a bound, not listening port
  included) answers RST: SO_ERROR ECONNREFUSED after a round trip.
* Accept queue: `listen(backlog)` admits backlog + 1 connections (handshakes in flight count); a SYN beyond
  that is dropped (`tcp_abort_on_overflow` = 0) and the client retransmits it on Linux >= 6.5's schedule with
  `tcp_syn_linear_timeouts` = 4 and `tcp_syn_retries` = 6: RTOs of 1, 1, 1, 1, 1, 2, 4, 8, 16, 32 s, i.e.
  retransmits 1, 2, 3, 4, 5, 7, 11, 19, 35 and 67 s after the first SYN (syn_retries + linear_timeouts of
  them), then ETIMEDOUT at 131 s. A retransmit that finds room connects. Closing a listener resets the
  connections it has not accepted.
* Data: one in-order byte stream per direction; a send buffer of `tcp_buffer` bytes per direction counts bytes
  in flight plus bytes the peer has not read, so `send` writes part or raises EAGAIN, and the sender becomes
  writable again when the peer reads.
* FIN / RST: `shutdown(SHUT_WR)` and a graceful close send FIN after the data; the peer reads b"" from then on
  while its own direction still flows. A close with unread data or with SO_LINGER {1, 0} sends RST; data that
  reaches a closed socket is answered with RST. After an RST `recv` returns the data already queued, then raises
  ECONNRESET once, then returns b"" (b"" at once if a FIN came first); `send` raises ECONNRESET (EPIPE if a FIN
  came first), then EPIPE; `shutdown` raises ENOTCONN.
* UDP: datagrams keep their boundaries and reach the socket bound to the destination (an exact address before
  the wildcard) after one latency; to a port nobody has bound they vanish, except that a connected sender gets
  ECONNREFUSED (ICMP port unreachable) from its next receive. A receive queue holds `udp_queue` bytes; datagrams
  beyond that are dropped.

Not modelled: loss, reordering, congestion, Nagle, TIME_WAIT, keepalive probes, urgent data, MSG_PEEK,
blocking calls that would wait (they raise `RuntimeError`: asyncio and lbsim only use non-blocking sockets).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final, cast

import aiohttp

if TYPE_CHECKING:
    from worlds.sim.loop import SimLoop

# One-way latency of a packet. On the project's 2-core machine a blocking loopback connect() takes ~14 us and a
# one-byte request/reply ~10 us (median of 2,000, one Python thread), so the kernel's own share is well under
# this; 25 us also stands for the event-loop pass that wakes the receiver. Any SimNetwork may choose its own.
DEFAULT_LATENCY_S: Final = 25e-6
TCP_BUFFER_BYTES: Final = 256 * 1024  # per direction: bytes in flight + bytes unread by the receiver
UDP_QUEUE_BYTES: Final = 256 * 1024  # per socket: queued, unread datagram bytes
FIRST_FD: Final = 1_000_000  # far above any real descriptor, so a sim fd never names a real file
EPHEMERAL_FIRST: Final = 32768  # net.ipv4.ip_local_port_range's default
EPHEMERAL_LAST: Final = 60999
SOMAXCONN: Final = 4096  # net.core.somaxconn's default: the largest backlog listen() takes
UDP_MAX_PAYLOAD: Final = 65507
# SYN retransmits, seconds after the first SYN, and the connect timeout (module docstring).
SYN_RETRANSMIT_AT_S: Final = (1.0, 2.0, 3.0, 4.0, 5.0, 7.0, 11.0, 19.0, 35.0, 67.0)
SYN_TIMEOUT_AT_S: Final = 131.0

_READ: Final = 1  # selectors.EVENT_READ
_WRITE: Final = 2  # selectors.EVENT_WRITE
_BOTH: Final = _READ | _WRITE

# Socket states (TCP; a UDP socket is NEW, BOUND or ESTABLISHED when connected).
_NEW: Final = 0
_BOUND: Final = 1
_LISTEN: Final = 2
_SYN_SENT: Final = 3
_ESTABLISHED: Final = 4
_CLOSED: Final = 5  # TCP_CLOSE after a reset, a refusal or a timeout

_WILDCARD: Final[dict[int, str]] = {socket.AF_INET: "0.0.0.0", socket.AF_INET6: "::"}
_LOOPBACK: Final[dict[int, str]] = {socket.AF_INET: "127.0.0.1", socket.AF_INET6: "::1"}
# Module-level names for annotations inside SimNetwork, whose `socket` method hides the module there.
_Socket = socket.socket
AddrInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[Any, ...]]
_LINGER: Final = struct.Struct("ii")
_SOCK_NONBLOCK: Final[int] = getattr(socket, "SOCK_NONBLOCK", 0)
_SOCK_CLOEXEC: Final[int] = getattr(socket, "SOCK_CLOEXEC", 0)


_STRERROR: dict[int, str] = {}  # errno -> os.strerror(errno), looked up once each
_FAMILY: Final[dict[int, socket.AddressFamily]] = {int(f): f for f in socket.AddressFamily}
_KIND: Final[dict[int, socket.SocketKind]] = {int(k): k for k in socket.SocketKind}


def _oserror(code: int, detail: str = "") -> OSError:
    """An OSError of the subclass the kernel's errno maps to (OSError(errno, ...) picks it)."""
    msg = _STRERROR.get(code)
    if msg is None:
        msg = _STRERROR[code] = os.strerror(code)
    return OSError(code, f"{msg}: {detail}" if detail else msg)


class SimSocket:
    """A socket of a `SimNetwork`: the subset of `socket.socket` asyncio, aiohttp, dnspython and lbsim use."""

    __slots__ = (
        "__weakref__",
        "_acceptq",
        "_backlog",
        "_closed",
        "_connect_reported",
        "_err",
        "_fd",
        "_fin_rcvd",
        "_lhost",
        "_linger_rst",
        "_listener",
        "_lport",
        "_net",
        "_opts",
        "_peer",
        "_pending",
        "_rbuf",
        "_rd_shut",
        "_reuse",
        "_rhost",
        "_rport",
        "_rst_sent",
        "_state",
        "_syn_gen",
        "_syn_t0",
        "_syn_timer",
        "_syn_tries",
        "_timeout",
        "_udpq",
        "_udpq_bytes",
        "_unacked",
        "_v6only",
        "_wr_shut",
        "family",
        "proto",
        "type",
    )

    def __init__(self, net: SimNetwork, family: int, type: int, proto: int, fd: int) -> None:
        self._net = net
        self._fd = fd
        self.family = _FAMILY.get(family) or socket.AddressFamily(family)
        self.type = _KIND.get(type) or socket.SocketKind(type)
        self.proto = proto
        self._timeout: float | None = None  # blocking, as socket.socket() starts
        self._opts: dict[tuple[int, int], int | bytes] = {}
        self._reuse = False
        self._v6only = False
        self._linger_rst = False
        self._state = _NEW
        self._closed = False
        self._lhost = ""  # "" while unbound
        self._lport = 0
        self._rhost = ""
        self._rport = 0
        self._err = 0
        self._peer: SimSocket | None = None
        self._rbuf = bytearray()
        self._unacked = 0
        self._fin_rcvd = False
        self._rd_shut = False
        self._wr_shut = False
        self._rst_sent = False
        self._connect_reported = True
        self._listener: SimSocket | None = None
        self._acceptq: deque[SimSocket] = deque()
        self._backlog = 0
        self._pending = 0
        self._syn_gen = 0
        self._syn_t0 = 0.0
        self._syn_tries = 0
        self._syn_timer: Any = None
        self._udpq: deque[tuple[bytes, tuple[Any, ...]]] = deque()
        self._udpq_bytes = 0

    def __repr__(self) -> str:
        state = ("new", "bound", "listening", "syn-sent", "established", "closed")[self._state]
        where = f" laddr={self._sockaddr(self._lhost, self._lport)}" if self._lhost else ""
        if self._rhost and self._state in (_SYN_SENT, _ESTABLISHED):
            where += f" raddr={self._sockaddr(self._rhost, self._rport)}"
        kind = "tcp" if self.type == socket.SOCK_STREAM else "udp"
        return f"<SimSocket fd={self._fd} {kind} {'closed' if self._closed else state}{where}>"

    # -- readiness -----------------------------------------------------------------------------------------

    def _notify(self) -> None:
        """Tell the selector this socket's readiness may have changed."""
        if self._fd >= 0:
            self._net._dirty[self._fd] = None

    def _events(self) -> int:
        """The selector events this socket is ready for now (epoll's view of it)."""
        st = self._state
        if self.type == socket.SOCK_DGRAM:
            return _BOTH if (self._udpq or self._err) else _WRITE
        if st == _ESTABLISHED:
            ev = _READ if (self._rbuf or self._fin_rcvd or self._rd_shut or self._err) else 0
            if self._wr_shut or self._err or self._unacked < self._net.tcp_buffer:
                ev |= _WRITE
            return ev
        if st == _LISTEN:
            return _READ if self._acceptq else 0
        if st == _SYN_SENT:
            return 0
        return _BOTH  # TCP_CLOSE (never connected, refused, reset): EPOLLHUP, which reads as both

    # -- plumbing ------------------------------------------------------------------------------------------

    def fileno(self) -> int:
        return self._fd

    def _check_open(self) -> None:
        if self._closed:
            raise _oserror(errno.EBADF)

    def _sockaddr(self, host: str, port: int) -> tuple[Any, ...]:
        return (host, port, 0, 0) if self.family == socket.AF_INET6 else (host, port)

    def _would_block(self, what: str) -> None:
        if self._timeout != 0.0:
            raise RuntimeError(
                f"{what} on a blocking SimSocket would wait: the simulated network has no blocking calls "
                "(call setblocking(False) and wait through the event loop)"
            )

    def setblocking(self, flag: bool) -> None:
        self._timeout = None if flag else 0.0

    def settimeout(self, value: float | None) -> None:
        if value is not None and value < 0:
            raise ValueError("Timeout value out of range")
        self._timeout = None if value is None else float(value)

    def gettimeout(self) -> float | None:
        return self._timeout

    def getblocking(self) -> bool:
        return self._timeout != 0.0

    def __enter__(self) -> SimSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- options -------------------------------------------------------------------------------------------

    def setsockopt(self, level: int, optname: int, value: int | bytes | None, optlen: int | None = None) -> None:
        self._check_open()
        if type(value) is int and level == socket.IPPROTO_TCP:  # TCP_NODELAY & co. on every new transport
            self._opts[(level, optname)] = value
            return
        if value is None:
            value = b"\0" * (optlen or 0)
        if level == socket.SOL_SOCKET and optname == socket.SO_LINGER:
            raw = bytes(value) if not isinstance(value, int) else _LINGER.pack(value, 0)
            onoff, secs = _LINGER.unpack(raw[: _LINGER.size].ljust(_LINGER.size, b"\0"))
            self._linger_rst = bool(onoff) and secs == 0
            value = raw
        elif isinstance(value, bytes | bytearray | memoryview):
            raw = bytes(value)
            value = int.from_bytes(raw[:4], "little", signed=True) if len(raw) <= 4 else raw
        if level == socket.SOL_SOCKET and optname == socket.SO_REUSEADDR:
            self._reuse = bool(value)
        elif level == socket.IPPROTO_IPV6 and optname == socket.IPV6_V6ONLY:
            self._v6only = bool(value)
        self._opts[(level, optname)] = value

    def getsockopt(self, level: int, optname: int, buflen: int | None = None) -> int | bytes:
        self._check_open()
        value: int | bytes
        if level == socket.SOL_SOCKET and optname == socket.SO_ERROR:
            value, self._err = self._err, 0
        elif level == socket.SOL_SOCKET and optname == socket.SO_TYPE:
            value = int(self.type)
        elif level == socket.SOL_SOCKET and optname == socket.SO_ACCEPTCONN:
            value = int(self._state == _LISTEN)
        elif level == socket.SOL_SOCKET and optname in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            value = self._net.tcp_buffer if self.type == socket.SOCK_STREAM else self._net.udp_queue
        else:
            linger = level == socket.SOL_SOCKET and optname == socket.SO_LINGER
            value = self._opts.get((level, optname), b"\0" * _LINGER.size if linger else 0)
        if buflen is None:
            return value if isinstance(value, int) else int.from_bytes(value[:4], "little", signed=True)
        raw = value if isinstance(value, bytes) else value.to_bytes(4, "little", signed=True)
        return raw[:buflen]

    # -- addresses -----------------------------------------------------------------------------------------

    def getsockname(self) -> tuple[Any, ...]:
        self._check_open()
        if not self._lhost:
            return self._sockaddr(_WILDCARD[self.family], 0)
        return self._sockaddr(self._lhost, self._lport)

    def getpeername(self) -> tuple[Any, ...]:
        self._check_open()
        if self._state != _ESTABLISHED:
            raise _oserror(errno.ENOTCONN)
        return self._sockaddr(self._rhost, self._rport)

    def bind(self, address: tuple[Any, ...]) -> None:
        self._check_open()
        if self._lhost:
            raise _oserror(errno.EINVAL)
        host, port = self._net._parse(self.family, address, passive=True)
        self._net._bind(self, host, port)

    # -- TCP: listen / accept ------------------------------------------------------------------------------

    def listen(self, backlog: int = 128) -> None:
        self._check_open()
        if self.type != socket.SOCK_STREAM:
            raise _oserror(errno.EOPNOTSUPP)
        if self._state not in (_NEW, _BOUND, _LISTEN):
            raise _oserror(errno.EINVAL)
        self._backlog = max(0, min(int(backlog), SOMAXCONN))
        if self._state == _LISTEN:
            return
        net = self._net
        if not self._lhost:
            net._bind(self, _WILDCARD[self.family], 0)
        else:
            net._check_conflict(self, self._lhost, self._lport)  # someone may have listened since our bind
        self._state = _LISTEN
        net._listeners.setdefault(self._lport, []).append(self)

    def accept(self) -> tuple[SimSocket, tuple[Any, ...]]:
        self._check_open()
        if self._state != _LISTEN:
            raise _oserror(errno.EINVAL)
        if not self._acceptq:
            self._would_block("accept()")
            raise _oserror(errno.EAGAIN)
        child = self._acceptq.popleft()
        child._listener = None
        self._net._add_fd(child)
        child._notify()
        return child, child._sockaddr(child._rhost, child._rport)

    def _stop_listening(self) -> None:
        lst = self._net._listeners.get(self._lport)
        if lst is not None and self in lst:
            lst.remove(self)
            if not lst:
                del self._net._listeners[self._lport]
        for child in self._acceptq:
            child._abort()
        self._acceptq.clear()

    # -- TCP: connect --------------------------------------------------------------------------------------

    def connect(self, address: tuple[Any, ...]) -> None:
        err = self.connect_ex(address)
        if err:
            raise _oserror(err, "" if err == errno.EINPROGRESS else str(address))

    def connect_ex(self, address: tuple[Any, ...]) -> int:
        self._check_open()
        net = self._net
        host, port = net._parse(self.family, address, passive=False)
        if self.type == socket.SOCK_DGRAM:
            if not self._lhost:
                net._bind(self, _LOOPBACK[self.family], 0)
            elif self._lhost == _WILDCARD[self.family]:
                self._lhost = _LOOPBACK[self.family]  # connect() fixes the source address
            self._rhost, self._rport = host, port
            self._state = _ESTABLISHED
            return 0
        st = self._state
        if st == _SYN_SENT:
            return errno.EALREADY
        if st == _ESTABLISHED:
            if not self._connect_reported:  # Linux: the first connect() after a non-blocking one completed is 0
                self._connect_reported = True
                return 0
            return errno.EISCONN
        if st == _LISTEN:
            return errno.EINVAL
        if st == _CLOSED and self._err:  # an earlier attempt failed and nobody has read why yet
            err, self._err = self._err, 0
            return err
        if not net._is_local(host):
            return errno.ENETUNREACH
        if self._timeout != 0.0:
            self._would_block("connect()")
        if not self._lhost:
            net._bind(self, _LOOPBACK[self.family], 0)
        elif self._lhost == _WILDCARD[self.family]:
            self._lhost = _LOOPBACK[self.family]  # the route's source address
        self._state = _SYN_SENT
        self._rhost, self._rport = host, port
        self._err = 0
        self._peer = None
        self._rbuf.clear()
        self._fin_rcvd = self._rd_shut = self._wr_shut = False
        self._connect_reported = False
        self._syn_gen += 1
        self._syn_tries = 0
        self._syn_t0 = net._loop_now()
        net._packet(self._syn_arrive, self._syn_gen)
        self._syn_timer = net._at(self._syn_t0 + net.syn_retransmit_at[0], self._syn_timeout, self._syn_gen)
        return errno.EINPROGRESS

    def _syn_timeout(self, gen: int) -> None:
        if self._state != _SYN_SENT or gen != self._syn_gen:
            return
        net = self._net
        tries = self._syn_tries
        schedule = net.syn_retransmit_at
        if tries >= len(schedule):
            self._fail(errno.ETIMEDOUT)
            return
        self._syn_tries = tries + 1
        net._packet(self._syn_arrive, gen)
        nxt = schedule[tries + 1] if tries + 1 < len(schedule) else net.syn_timeout_at
        self._syn_timer = net._at(self._syn_t0 + nxt, self._syn_timeout, gen)

    def _syn_arrive(self, gen: int) -> None:
        """Our SYN reaches the destination (runs on the listener's side of the wire)."""
        if self._state != _SYN_SENT or gen != self._syn_gen or self._peer is not None:
            return
        net = self._net
        lst = net._find_listener(self.family, self._rhost, self._rport)
        if lst is None:
            net._packet(self._refused, gen)
            return
        if len(lst._acceptq) + lst._pending > lst._backlog:
            return  # accept queue full: the SYN is dropped and our retransmit timer tries again
        child = SimSocket(net, lst.family, socket.SOCK_STREAM, lst.proto, -1)
        child._state = _ESTABLISHED
        child._lhost, child._lport = self._rhost, lst._lport
        child._rhost, child._rport = self._lhost, self._lport
        child._reuse = lst._reuse
        child._v6only = lst._v6only
        child._linger_rst = lst._linger_rst
        if lst._opts:
            child._opts = dict(lst._opts)
        child._timeout = None
        child._listener = lst
        child._peer = self
        net._bound.setdefault((socket.SOCK_STREAM, child._lport), {})[child] = None
        lst._pending += 1
        self._peer = child
        net._packet(self._synack_arrive, child)

    def _refused(self, gen: int) -> None:
        if self._state == _SYN_SENT and gen == self._syn_gen:
            self._fail(errno.ECONNREFUSED)

    def _synack_arrive(self, child: SimSocket) -> None:
        net = self._net
        if self._closed or self._state != _SYN_SENT or self._peer is not child:
            net._packet(child._ack_lost)  # nobody to ACK: the half-open connection is reset
            return
        self._state = _ESTABLISHED
        self._cancel_syn_timer()
        self._notify()
        net._packet(child._ack_arrive)

    def _ack_arrive(self) -> None:
        """The handshake's last ACK reaches a new connection: it joins its listener's accept queue."""
        lst = self._listener
        assert lst is not None
        lst._pending -= 1
        if lst._closed or lst._state != _LISTEN:
            self._listener = None
            self._abort()  # the listener is gone: the ACK finds no socket and is answered with RST
            return
        lst._acceptq.append(self)
        lst._notify()

    def _ack_lost(self) -> None:
        lst = self._listener
        if lst is not None:
            lst._pending -= 1
            self._listener = None
        self._state = _CLOSED
        self._peer = None
        self._net._unbind(self)

    def _cancel_syn_timer(self) -> None:
        if self._syn_timer is not None:
            self._syn_timer.cancel()
            self._syn_timer = None

    def _fail(self, err: int) -> None:
        """The connection attempt or the connection is over with `err` (refused, reset, timed out)."""
        self._cancel_syn_timer()
        self._state = _CLOSED
        self._err = err
        self._rd_shut = self._wr_shut = True
        self._peer = None
        self._notify()

    # -- TCP: data, FIN, RST -------------------------------------------------------------------------------

    def send(self, data: Any, flags: int = 0) -> int:
        self._check_open()
        if self.type == socket.SOCK_DGRAM:
            if self._state != _ESTABLISHED:
                raise _oserror(errno.EDESTADDRREQ)
            return self._sendto(data, self._rhost, self._rport)
        if self._err:
            err, self._err = self._err, 0
            raise _oserror(err)
        st = self._state
        if st == _SYN_SENT:
            self._would_block("send()")
            raise _oserror(errno.EAGAIN)
        if st != _ESTABLISHED or self._wr_shut:
            raise _oserror(errno.EPIPE)
        if type(data) is not bytes:
            data = memoryview(data).cast("B")
        size = len(data)
        if not size:
            return 0
        net = self._net
        n = min(size, net.tcp_buffer - self._unacked)
        if n <= 0:
            self._would_block("send()")
            raise _oserror(errno.EAGAIN)
        chunk = data if n == size and type(data) is bytes else bytes(data[:n])
        self._unacked += n
        peer = self._peer
        if peer is not None:
            net._packet(peer._data_arrive, chunk, self)
        return n

    def sendall(self, data: Any, flags: int = 0) -> None:
        view = memoryview(data).cast("B")
        sent = self.send(view, flags)
        if sent < len(view):
            self._would_block("sendall()")
            raise _oserror(errno.EAGAIN)

    def sendmsg(
        self, buffers: Iterable[Any], ancdata: Iterable[Any] = (), flags: int = 0, address: Any = None
    ) -> int:
        data = b"".join(bytes(memoryview(b).cast("B")) for b in buffers)
        if address is not None:
            return self.sendto(data, address)
        return self.send(data, flags)

    def _data_arrive(self, chunk: bytes, src: SimSocket) -> None:
        if self._peer is not src:
            return
        if self._closed or self._state != _ESTABLISHED:
            if self._closed and self._state == _ESTABLISHED and not self._rst_sent:
                self._abort()  # data for a socket that was closed: RST
            return
        self._rbuf += chunk
        self._notify()

    def _fin_arrive(self, src: SimSocket) -> None:
        if self._peer is src and self._state == _ESTABLISHED:
            self._fin_rcvd = True
            self._notify()

    def _rst_arrive(self, src: SimSocket) -> None:
        if self._peer is not src:
            return
        if self._state == _SYN_SENT:
            self._fail(errno.ECONNREFUSED)
        elif self._state == _ESTABLISHED:
            # tcp_reset: EPIPE in CLOSE_WAIT (FIN already received), ECONNRESET otherwise.
            self._fail(errno.EPIPE if self._fin_rcvd else errno.ECONNRESET)
            if self._closed:
                self._net._unbind(self)

    def _abort(self) -> None:
        """Send RST to the peer and drop the connection."""
        peer = self._peer
        if peer is not None and not self._rst_sent:
            self._rst_sent = True
            net = self._net
            net._packet(peer._rst_arrive, self)
        self._state = _CLOSED
        self._peer = None
        self._wr_shut = self._rd_shut = True
        if self._fd < 0 or self._closed:
            self._net._unbind(self)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self._check_open()
        if self.type == socket.SOCK_DGRAM:
            return self._recvfrom(bufsize)[0]
        rbuf = self._rbuf
        if rbuf:
            n = len(rbuf)
            if bufsize >= n:
                data = bytes(rbuf)
                rbuf.clear()
            else:
                n = bufsize
                data = bytes(rbuf[:n])
                del rbuf[:n]
            peer = self._peer
            if peer is not None:
                before = peer._unacked
                peer._unacked = before - n
                if before >= self._net.tcp_buffer:
                    peer._notify()  # room in the peer's send buffer again
            return data
        if self._fin_rcvd:
            return b""
        if self._err:
            err, self._err = self._err, 0
            raise _oserror(err)
        if self._rd_shut:
            return b""
        if self._state == _ESTABLISHED or self._state == _SYN_SENT:
            self._would_block("recv()")
            raise _oserror(errno.EAGAIN)
        raise _oserror(errno.ENOTCONN)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        view = memoryview(buffer).cast("B")
        data = self.recv(nbytes or len(view), flags)
        view[: len(data)] = data
        return len(data)

    def shutdown(self, how: int) -> None:
        self._check_open()
        if how not in (socket.SHUT_RD, socket.SHUT_WR, socket.SHUT_RDWR):
            raise _oserror(errno.EINVAL)
        st = self._state
        if self.type == socket.SOCK_DGRAM or st in (_NEW, _BOUND, _CLOSED):
            if self.type == socket.SOCK_DGRAM and st == _ESTABLISHED:
                return
            raise _oserror(errno.ENOTCONN)
        if st == _LISTEN:
            if how != socket.SHUT_WR:
                self._stop_listening()
                self._state = _CLOSED
            return
        if st == _SYN_SENT:
            self._syn_gen += 1
            self._fail(0)
            return
        if how != socket.SHUT_RD and not self._wr_shut:
            self._wr_shut = True
            self._send_fin()
        if how != socket.SHUT_WR and not self._rd_shut:
            self._rd_shut = True
            self._notify()

    def _send_fin(self) -> None:
        peer = self._peer
        if peer is not None:
            net = self._net
            net._packet(peer._fin_arrive, self)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        net = self._net
        net._remove_fd(self)
        self._cancel_syn_timer()
        st = self._state
        if st == _LISTEN:
            self._stop_listening()
        elif st == _ESTABLISHED and self.type == socket.SOCK_STREAM:
            if self._linger_rst or self._rbuf:
                self._abort()
                self._rbuf.clear()
            else:
                if not self._wr_shut:
                    self._wr_shut = True
                    self._send_fin()
                # The connection lives on (FIN_WAIT) until the peer is done, so data it sends gets an RST.
                net._unbind(self)
                return
        self._syn_gen += 1
        net._unbind(self)

    def detach(self) -> int:
        raise OSError(errno.EOPNOTSUPP, "a SimSocket has no real file descriptor to detach")

    # -- UDP -----------------------------------------------------------------------------------------------

    def sendto(self, data: Any, flags_or_address: Any, address: Any = None) -> int:
        self._check_open()
        addr = flags_or_address if address is None else address
        if self.type != socket.SOCK_DGRAM:
            return self.send(data)
        host, port = self._net._parse(self.family, addr, passive=False)
        return self._sendto(data, host, port)

    def _sendto(self, data: Any, host: str, port: int) -> int:
        payload = bytes(memoryview(data).cast("B"))
        if len(payload) > UDP_MAX_PAYLOAD:
            raise _oserror(errno.EMSGSIZE)
        net = self._net
        if not self._lhost:
            net._bind(self, _WILDCARD[self.family], 0)
        if net._is_local(host):
            src = self._lhost if self._lhost != _WILDCARD[self.family] else _LOOPBACK[self.family]
            net._packet(net._udp_arrive, self, payload, src, self._lport, host, port)
        return len(payload)

    def _recvfrom(self, bufsize: int) -> tuple[bytes, tuple[Any, ...]]:
        if self._udpq:
            data, addr = self._udpq.popleft()
            self._udpq_bytes -= len(data)
            return data[:bufsize], addr
        if self._err:
            err, self._err = self._err, 0
            raise _oserror(err)
        self._would_block("recvfrom()")
        raise _oserror(errno.EAGAIN)

    def recvfrom(self, bufsize: int, flags: int = 0) -> tuple[bytes, tuple[Any, ...]]:
        self._check_open()
        if self.type != socket.SOCK_DGRAM:
            return self.recv(bufsize, flags), self.getpeername()
        return self._recvfrom(bufsize)

    def recvfrom_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> tuple[int, tuple[Any, ...]]:
        view = memoryview(buffer).cast("B")
        data, addr = self.recvfrom(nbytes or len(view), flags)
        view[: len(data)] = data
        return len(data), addr

    def _udp_deliver(self, payload: bytes, src: tuple[Any, ...]) -> None:
        if self._udpq_bytes + len(payload) > self._net.udp_queue:
            return  # receive queue full: dropped, as the kernel does
        self._udpq.append((payload, src))
        self._udpq_bytes += len(payload)
        self._notify()

    def _icmp_unreachable(self, host: str, port: int) -> None:
        if not self._closed and self._state == _ESTABLISHED and (self._rhost, self._rport) == (host, port):
            self._err = errno.ECONNREFUSED
            self._notify()



def _literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """`host` as an IP literal (a zone suffix dropped); `gaierror` for a name: there is no DNS down here."""
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        raise socket.gaierror(
            socket.EAI_NONAME, f"Name or service not known: {host!r} (the simulated network resolves only "
            "IP literals and localhost)"
        ) from None

class SimNetwork:
    """One simulated host's network: sockets, ports, listeners and the packets between them."""

    def __init__(
        self,
        latency_s: float = DEFAULT_LATENCY_S,
        *,
        tcp_buffer: int = TCP_BUFFER_BYTES,
        udp_queue: int = UDP_QUEUE_BYTES,
        syn_retransmit_at: tuple[float, ...] = SYN_RETRANSMIT_AT_S,
        syn_timeout_at: float = SYN_TIMEOUT_AT_S,
        first_fd: int = FIRST_FD,
    ) -> None:
        if latency_s < 0:
            raise ValueError(f"latency_s must be >= 0, got {latency_s}")
        if not syn_retransmit_at or list(syn_retransmit_at) != sorted(syn_retransmit_at):
            raise ValueError("syn_retransmit_at must be increasing offsets from the first SYN")
        if syn_timeout_at <= syn_retransmit_at[-1]:
            raise ValueError("syn_timeout_at must come after the last retransmit")
        self.latency_s = latency_s
        self.tcp_buffer = tcp_buffer
        self.udp_queue = udp_queue
        self.syn_retransmit_at = tuple(syn_retransmit_at)
        self.syn_timeout_at = syn_timeout_at
        self._loop: SimLoop | None = None
        self._next_fd = first_fd
        self._sockets: dict[int, SimSocket] = {}
        # fds whose readiness may have changed since the selector last looked, in the order they changed
        self._dirty: dict[int, None] = {}
        self._packets: deque[tuple[float, Callable[..., None], tuple[Any, ...]]] = deque()  # in flight, by arrival
        # (type, port) -> the sockets bound to it, in bind order (a dict: O(1) removal with many connections)
        self._bound: dict[tuple[int, int], dict[SimSocket, None]] = {}
        self._listeners: dict[int, list[SimSocket]] = {}  # port -> listening sockets
        self._next_port: dict[int, int] = {socket.SOCK_STREAM: EPHEMERAL_FIRST, socket.SOCK_DGRAM: EPHEMERAL_FIRST}
        self._hosts: dict[tuple[int, str], str] = {}
        self._delivery: Any = None  # the timer that runs _deliver (SimTimerHandle)
        # getaddrinfo answers by arguments (they depend on nothing else): no address parsing per connection
        self._addrinfo: dict[tuple[Any, ...], tuple[AddrInfo, ...]] = {}

    def __repr__(self) -> str:
        return f"<SimNetwork latency_s={self.latency_s} sockets={len(self._sockets)}>"

    # -- the public face -----------------------------------------------------------------------------------

    def sim_socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0) -> SimSocket:
        if family not in (socket.AF_INET, socket.AF_INET6):
            raise _oserror(errno.EAFNOSUPPORT)
        nonblocking = bool(type & _SOCK_NONBLOCK)
        kind = type & ~(_SOCK_NONBLOCK | _SOCK_CLOEXEC)
        if kind not in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            raise _oserror(errno.ESOCKTNOSUPPORT)
        sock = SimSocket(self, family, kind, proto, -1)
        if nonblocking:
            sock._timeout = 0.0
        self._add_fd(sock)
        return sock

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0) -> _Socket:
        """A new socket on this network (blocking, like `socket.socket()`); typed as `socket.socket` for callers."""
        return cast(_Socket, self.sim_socket(family, type, proto))

    def socket_factory(self, addr_info: tuple[Any, ...]) -> _Socket:
        """aiohttp's `TCPConnector(socket_factory=...)`: a socket for one `getaddrinfo` result."""
        family, type_, proto = addr_info[0], addr_info[1], addr_info[2]
        return self.socket(family, type_, proto)

    def http_connector(self, **kwargs: Any) -> aiohttp.TCPConnector:
        """A connector whose sockets come from this network, and whose resolver is the loop's `getaddrinfo`
        (which answers without a thread); call it inside the loop, as aiohttp needs a running one."""
        kwargs.setdefault("resolver", aiohttp.ThreadedResolver())
        return aiohttp.TCPConnector(socket_factory=self.socket_factory, **kwargs)

    def getaddrinfo(
        self, host: str | bytes | None, port: str | bytes | int | None, family: int = 0, type: int = 0,
        proto: int = 0, flags: int = 0,
    ) -> list[AddrInfo]:
        """`socket.getaddrinfo` for this network: IP literals and "localhost" only (there is no DNS here)."""
        key = (host, port, family, type, proto, flags)
        try:
            cached = self._addrinfo.get(key)
        except TypeError:  # an unhashable argument: let the checks below say what is wrong with it
            cached = None
        if cached is not None:
            return list(cached)
        out = self._getaddrinfo(host, port, family, type, proto, flags)
        self._addrinfo[key] = tuple(out)
        return out

    def _getaddrinfo(
        self, host: str | bytes | None, port: str | bytes | int | None, family: int, type: int, proto: int,
        flags: int,
    ) -> list[AddrInfo]:
        if isinstance(host, bytes):
            host = host.decode("idna")
        if port is None:
            portnum = 0
        elif isinstance(port, int):
            portnum = port
        else:
            text = port.decode() if isinstance(port, bytes) else str(port)
            if not text.isdigit():
                raise socket.gaierror(socket.EAI_SERVICE, "Servname not supported for ai_socktype")
            portnum = int(text)
        fams: list[int]
        if not host:
            fam = family or socket.AF_INET
            fams = [fam]
            hosts = [_WILDCARD[fam] if flags & socket.AI_PASSIVE else _LOOPBACK[fam]]
        elif host == "localhost":
            fam = family or socket.AF_INET
            fams, hosts = [fam], [_LOOPBACK[fam]]
        else:
            ip = _literal(host)
            fam = socket.AF_INET if ip.version == 4 else socket.AF_INET6
            if family and family != fam:
                raise socket.gaierror(socket.EAI_ADDRFAMILY, "Address family for hostname not supported")
            fams, hosts = [fam], [str(ip)]
        if fams[0] not in _WILDCARD:
            raise socket.gaierror(socket.EAI_FAMILY, "ai_family not supported")
        kinds = [type] if type else [socket.SOCK_STREAM, socket.SOCK_DGRAM]
        out: list[AddrInfo] = []
        for fam, h in zip(fams, hosts, strict=True):
            for kind in kinds:
                p = proto or (socket.IPPROTO_TCP if kind == socket.SOCK_STREAM else socket.IPPROTO_UDP)
                addr: tuple[Any, ...] = (h, portnum, 0, 0) if fam == socket.AF_INET6 else (h, portnum)
                out.append((socket.AddressFamily(fam), socket.SocketKind(kind), p, "", addr))
        return out

    @property
    def open_sockets(self) -> int:
        """How many sockets have an fd (are open and not accepted-but-pending)."""
        return len(self._sockets)

    # -- the loop ------------------------------------------------------------------------------------------

    def _attach(self, loop: SimLoop) -> None:
        if self._loop is not None and self._loop is not loop:
            raise RuntimeError("a SimNetwork belongs to one SimLoop")
        self._loop = loop

    def _loop_now(self) -> float:
        loop = self._loop
        if loop is None:
            raise RuntimeError("this SimNetwork has no SimLoop yet: make one with SimLoop(network)")
        return loop._now

    def _at(self, when: float, fn: Callable[..., None], *args: Any) -> Any:
        """A cancellable timer on the loop (SYN retransmits)."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("this SimNetwork has no SimLoop yet: make one with SimLoop(network)")
        if loop.is_closed():
            return None  # the world is over
        return loop._sim_call_at(when, fn, args)

    def _packet(self, fn: Callable[..., None], *args: Any) -> None:
        """Run `fn(*args)` when a packet sent now arrives, one latency from now.

        Packets arrive in the order they were sent (so each link is FIFO), which with one latency is also the
        order of their arrival times: they wait in one queue, and only its head has a timer on the loop.
        """
        loop = self._loop
        if loop is None:
            raise RuntimeError("this SimNetwork has no SimLoop yet: make one with SimLoop(network)")
        if loop._closed:
            return  # the world is over: packets go nowhere
        when = loop._now + self.latency_s
        queue = self._packets
        if queue:
            last = queue[-1][0]
            queue.append((when if when >= last else last, fn, args))  # a latency lowered mid-run keeps FIFO
        else:
            queue.append((when, fn, args))
            self._deliver_timer(loop, when)

    def _deliver_timer(self, loop: SimLoop, when: float) -> None:
        """Wake `_deliver` at `when`: one timer object, scheduled again each time (at most one is pending)."""
        timer = self._delivery
        if timer is None:
            timer = self._delivery = loop._sim_call_at(when, self._deliver, ())
        else:
            loop._sim_push(when, timer)

    def _deliver(self) -> None:
        """Run every packet that has arrived by now, in order; then wait for the next one."""
        loop = self._loop
        assert loop is not None
        queue = self._packets
        due = loop._now + loop._clock_resolution
        try:
            while queue and queue[0][0] < due:
                _, fn, args = queue.popleft()
                fn(*args)
        finally:
            if queue and not loop._closed:
                self._deliver_timer(loop, queue[0][0])

    # -- fds, ports, addresses -----------------------------------------------------------------------------

    def _add_fd(self, sock: SimSocket) -> None:
        fd = self._next_fd
        self._next_fd = fd + 1
        sock._fd = fd
        self._sockets[fd] = sock

    def _remove_fd(self, sock: SimSocket) -> None:
        fd = sock._fd
        if fd >= 0:
            self._sockets.pop(fd, None)
            self._dirty.pop(fd, None)
            sock._fd = -1

    def _parse(self, family: int, address: Any, *, passive: bool) -> tuple[str, int]:
        if not isinstance(address, tuple) or len(address) < 2:
            want = "(host, port)" if family == socket.AF_INET else "(host, port[, flowinfo, scope_id])"
            raise TypeError(f"{socket.AddressFamily(family).name} address must be a tuple {want}")
        host, port = address[0], address[1]
        if not isinstance(port, int):
            raise TypeError(f"'{type(port).__name__}' object cannot be interpreted as an integer")
        if not 0 <= port <= 65535:
            raise OverflowError("port must be 0-65535.")
        if isinstance(host, bytes):
            host = host.decode()
        key = (family, host)
        norm = self._hosts.get(key)
        if norm is None:
            norm = self._normalize(family, host)
            self._hosts[key] = norm
        if passive:
            if norm != _WILDCARD[family] and not self._is_local(norm):
                raise _oserror(errno.EADDRNOTAVAIL)
        elif norm == _WILDCARD[family]:
            norm = _LOOPBACK[family]  # Linux sends a connect to 0.0.0.0 to the local host
        return norm, port

    def _normalize(self, family: int, host: str) -> str:
        if host == "":
            return _WILDCARD[family]
        if host == "localhost":
            return _LOOPBACK[family]
        if host == "<broadcast>":
            raise _oserror(errno.ENETUNREACH)
        ip = _literal(host)
        if (ip.version == 4) != (family == socket.AF_INET):
            raise socket.gaierror(socket.EAI_ADDRFAMILY, "Address family for hostname not supported")
        return str(ip)

    @staticmethod
    def _is_local(host: str) -> bool:
        return host.startswith("127.") or host == "::1"

    def _overlaps(self, sock: SimSocket, host: str, other: SimSocket) -> bool:
        ohost = other._lhost
        if sock.family == other.family:
            return host == ohost or host == _WILDCARD[sock.family] or ohost == _WILDCARD[other.family]
        v6host, v6only = (host, sock._v6only) if sock.family == socket.AF_INET6 else (ohost, other._v6only)
        return v6host == "::" and not v6only  # a dual-stack wildcard also holds the IPv4 port

    def _check_conflict(self, sock: SimSocket, host: str, port: int) -> None:
        """EADDRINUSE unless `sock` may take (host, port) next to what is there (inet_csk_bind_conflict)."""
        for other in self._bound.get((sock.type, port), ()):
            if other is sock or not self._overlaps(sock, host, other):
                continue
            if sock._reuse and other._reuse and (sock.type == socket.SOCK_DGRAM or other._state != _LISTEN):
                continue
            if (sock._opts.get((socket.SOL_SOCKET, getattr(socket, "SO_REUSEPORT", -1)))
                    and other._opts.get((socket.SOL_SOCKET, getattr(socket, "SO_REUSEPORT", -1)))):
                continue
            raise _oserror(errno.EADDRINUSE)

    def _bind(self, sock: SimSocket, host: str, port: int) -> None:
        kind = sock.type
        if port == 0:
            port = self._ephemeral(kind)
        else:
            self._check_conflict(sock, host, port)
        sock._lhost, sock._lport = host, port
        self._bound.setdefault((kind, port), {})[sock] = None
        if sock._state == _NEW:
            sock._state = _BOUND

    def _unbind(self, sock: SimSocket) -> None:
        if not sock._lhost:
            return
        key = (sock.type, sock._lport)
        holders = self._bound.get(key)
        if holders is not None:
            holders.pop(sock, None)
            if not holders:
                del self._bound[key]

    def _ephemeral(self, kind: int) -> int:
        span = EPHEMERAL_LAST - EPHEMERAL_FIRST + 1
        nxt = self._next_port[kind]
        for _ in range(span):
            port = nxt
            nxt = nxt + 1 if nxt < EPHEMERAL_LAST else EPHEMERAL_FIRST
            if (kind, port) not in self._bound:
                self._next_port[kind] = nxt
                return port
        raise _oserror(errno.EADDRNOTAVAIL, "no free ephemeral port")

    def _find_listener(self, family: int, host: str, port: int) -> SimSocket | None:
        wildcard: SimSocket | None = None
        for lst in self._listeners.get(port, ()):
            if lst.family == family:
                if lst._lhost == host:
                    return lst
                if wildcard is None and lst._lhost == _WILDCARD[family]:
                    wildcard = lst
            elif family == socket.AF_INET and lst._lhost == "::" and not lst._v6only and wildcard is None:
                wildcard = lst
        return wildcard

    def _udp_arrive(self, sender: SimSocket, payload: bytes, shost: str, sport: int, host: str, port: int) -> None:
        family = sender.family
        exact: SimSocket | None = None
        wildcard: SimSocket | None = None
        for sock in self._bound.get((socket.SOCK_DGRAM, port), ()):
            if sock.family != family:
                continue
            if sock._state == _ESTABLISHED and (sock._rhost, sock._rport) != (shost, sport):
                continue  # a connected socket takes datagrams from its peer only
            if sock._lhost == host:
                exact = sock
                break
            if wildcard is None and sock._lhost == _WILDCARD[family]:
                wildcard = sock
        target = exact or wildcard
        if target is None:
            if sender._state == _ESTABLISHED and not sender._closed:
                self._packet(sender._icmp_unreachable, host, port)
            return
        target._udp_deliver(payload, target._sockaddr(shost, sport))
