"""Fixed ports and listen addresses, checked before a run starts (`lbsim run` and `lbsim serve`).

Rules:
1. Every fixed (non-zero) port a command will listen on is a `PortClaim` naming the option that sets it, so an
   error can tell the user what to change. Port 0 is an ephemeral port and claims nothing.
2. Two claims on one port conflict when their addresses overlap: the same address, or an unspecified one
   (0.0.0.0, ::) and any address of its family. `claim_ports` refuses them; `check_free` binds each claim for a
   moment and refuses the first that something else holds. Both raise `PortError` before anything starts.
3. A listener can still lose its port between the check and its bind (another program took it meanwhile): the
   run raises `ListenError` naming the listener, and `unavailable` words it as `check_free` would have.
4. A listen address given by the user is an IP literal (`parse_bind`), never a name to resolve: what is bound is
   exactly what was asked for. Anything outside 127.0.0.0/8 and ::1 is reachable from the network
   (`bind_warning`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from worlds.real import RealNetwork

LOOPBACK = "127.0.0.1"
KERNEL = RealNetwork()  # fixed ports are the host's, whichever world a run is in


class PortError(Exception):
    """A fixed port that cannot be had; the message names the port and the option that sets it."""


class BindError(ValueError):
    """A listen address that is not an IP literal; the message says what is accepted."""


class ListenError(OSError):
    """A listener of a run that could not bind when it started; `listener` is its key in the run's ports
    ("metrics", "admin") and `error` what the bind raised."""

    def __init__(self, listener: str, error: OSError) -> None:
        super().__init__(error.errno, error.strerror or str(error))
        self.listener = listener
        self.error = error


@dataclass(frozen=True, slots=True)
class PortClaim:
    option: str  # the command-line option that sets the port
    what: str
    host: str
    port: int
    proto: Literal["tcp", "udp"] = "tcp"


def _overlap(a: str, b: str) -> bool:
    if a == b:
        return True
    ia, ib = ipaddress.ip_address(a), ipaddress.ip_address(b)
    return ia.version == ib.version and (ia.is_unspecified or ib.is_unspecified)


def claim_ports(claims: Iterable[PortClaim]) -> list[PortClaim]:
    """The fixed (non-zero) claims; `PortError` if two of them want the same port on overlapping addresses."""
    fixed = [c for c in claims if c.port]
    for i, c in enumerate(fixed):
        for first in fixed[:i]:
            if (first.port, first.proto) == (c.port, c.proto) and _overlap(first.host, c.host):
                raise PortError(f"port {c.port} is wanted twice: {first.what} ({first.option}) and {c.what} "
                                f"({c.option}); give one of them another port")
    return fixed


def unavailable(c: PortClaim, e: OSError) -> PortError:
    """The error for claim `c` whose bind failed with `e`."""
    # os.strerror, not e.strerror: asyncio's bind errors carry the whole address in strerror, already named here.
    reason = os.strerror(e.errno) if e.errno else str(e)
    return PortError(f"port {c.port} ({c.proto}, {c.what} on {c.host}) is not available: {reason}; stop what holds "
                     f"it or choose another with {c.option} PORT (0 picks a free one)")


def check_free(claims: Iterable[PortClaim]) -> None:
    """Bind each claimed port for a moment; `PortError` for the first one something else holds."""
    for c in claims:
        family = socket.AF_INET6 if ipaddress.ip_address(c.host).version == 6 else socket.AF_INET
        kind = socket.SOCK_STREAM if c.proto == "tcp" else socket.SOCK_DGRAM
        with KERNEL.socket(family, kind) as s:
            if family == socket.AF_INET6:
                # As asyncio's create_server does: an IPv6 listener does not also take the IPv4 port.
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if c.proto == "tcp":
                # As the real listener will: a port left in TIME_WAIT by an earlier run is free to listen on.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((c.host, c.port))
                if c.proto == "tcp":
                    s.listen(1)
            except OSError as e:
                raise unavailable(c, e) from None


# -- listen addresses ----------------------------------------------------------------------------------------


def parse_bind(value: str, option: str = "--bind") -> str:
    """`value` as an IP literal in its normal form; `BindError` for anything else (a host name included)."""
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        raise BindError(f"{option} {value!r} is not an IP address; give one literally, e.g. 127.0.0.1 (the default), "
                        "::1, or 0.0.0.0 for every interface (host names are not resolved)") from None


def is_loopback(host: str) -> bool:
    """Whether `host` (an IP literal) is reachable only from this machine: 127.0.0.0/8 or ::1."""
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def bind_warning(host: str, *, token: bool) -> str | None:
    """What to tell the user who binds the serve listeners to `host`; None on loopback."""
    if is_loopback(host):
        return None
    advice = ("it requires the --admin-token on every request, but /metrics has no token" if token else
              "set --admin-token (or LBSIM_ADMIN_TOKEN) so that only holders of the token can use it")
    return (f"--bind {host} is not a loopback address: the simulator's admin API and its metrics are then reachable "
            f"from the network. The admin API changes the running system: {advice}.")


def connect_host(host: str) -> str:
    """The address to connect to for a listener bound to `host`: an unspecified address is this machine."""
    ip = ipaddress.ip_address(host)
    if ip.is_unspecified:
        return "::1" if ip.version == 6 else LOOPBACK
    return host


def url_host(host: str) -> str:
    """`host` as it goes in a URL or a host:port: an IPv6 literal in brackets."""
    return f"[{host}]" if ":" in host else host
