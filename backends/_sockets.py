"""Socket tricks shared by backends and net paths: port reservation, RST on close, blackhole listeners."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import struct

from worlds.net import network

HOST = "127.0.0.1"
# Bursts of probes and client connections must not overflow an accept queue: an overflow drops SYNs, which
# looks like packet loss for a second.
BACKLOG = 1024
# SO_LINGER on with a zero timeout: close() sends RST instead of FIN.
_LINGER_RST = struct.pack("ii", 1, 0)


def bind(host: str, port: int) -> socket.socket:
    """A non-blocking TCP socket bound to (host, port) but not listening.

    While it stays bound nobody else gets the port, and a connect to it is answered with RST
    (ECONNREFUSED): this is how a crashed backend or a `refuse` path keeps its address. SO_REUSEADDR lets
    it bind next to the established and TIME_WAIT connections a previous listener on the port left.
    The socket comes from the running loop's world.
    """
    sock = network().socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setblocking(False)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def reset(transport: asyncio.Transport | None) -> None:
    """Close a connection now, with RST rather than FIN, even one already closing gracefully."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # uvloop raises ValueError instead of OSError once the fd underneath is gone.
        with contextlib.suppress(OSError, ValueError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    transport.abort()


def local_port(transport: asyncio.BaseTransport | None) -> int | None:
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    return int(sockname[1]) if sockname else None


class Blackhole:
    """A listening socket whose accept queue is full and never drained, so the kernel drops new SYNs.

    Linux drops a SYN when the listener's accept queue is full (tcp_conn_request, LISTENOVERFLOWS). With
    `listen(0)` one established connection fills the queue; we make that one ourselves. A client's connect
    then sees no SYN-ACK and times out, as behind a real blackhole, instead of being refused or accepted.
    """

    def __init__(self, listener: socket.socket, filler: socket.socket) -> None:
        self._listener = listener
        self._filler = filler

    @classmethod
    def open(cls, sock: socket.socket) -> Blackhole:
        """Turn a bound socket (see `bind`) into a blackhole at once; the blackhole owns it from then on.

        Synchronous, so that a state change never waits on wall time: on loopback the kernel runs the whole
        handshake (SYN, SYN-ACK, ACK) inside the non-blocking connect() call, so the queue is full when it
        returns, and no loop iteration passes between listen() and the filler's SYN in which a client of this
        process could take the slot. A SYN from elsewhere (another process, a retransmission) that wins the
        race fills the queue just as well; the filler's connect then stays pending, which changes nothing.
        """
        filler = network().socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            filler.setblocking(False)
            sock.listen(0)
            err = filler.connect_ex(sock.getsockname())
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, os.strerror(err))
        except BaseException:
            filler.close()
            sock.close()
            raise
        return cls(sock, filler)

    @property
    def filled_by_us(self) -> bool:
        """Whether our own connection holds the queue slot (else a client's does)."""
        try:
            self._filler.getpeername()
        except OSError:
            return False
        return True

    def close(self) -> None:
        self._filler.close()
        self._listener.close()
