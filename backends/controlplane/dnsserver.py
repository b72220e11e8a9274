"""An authoritative DNS server over UDP on loopback that answers A queries from a records callback.

Rules, per query (dnspython does the wire format):
1. `records(name)` gets the lower-case query name without the trailing dot. None -> NXDOMAIN; a list ->
   NOERROR with one A record per address (an empty list -> NOERROR with an empty answer: the empty record
   of the AWS race, docs/sources.md#aws-summary); a name that exists but a type other than A -> NOERROR,
   empty answer.
2. Every A record carries the TTL `ttl` gives for the name, so resolvers cache answers and recovery after a
   fix is staggered by cached answers, as in the real 02:25-02:40 window.
3. Answers are authoritative (AA). A response too large for the client's UDP size (512 bytes without EDNS)
   is sent truncated (TC, no answers) so the client knows; there is no TCP fallback.
4. Non-QUERY opcodes get NOTIMP; undecodable datagrams with a readable header get FORMERR, the rest are dropped.
No SOA is served, so negative answers carry no negative-caching TTL: resolvers do not cache them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

HOST = "127.0.0.1"
# What a client without EDNS can receive over UDP (RFC 1035 4.2.1).
_CLASSIC_UDP_SIZE = 512

RecordsFn = Callable[[str], list[str] | None]
TtlFn = Callable[[str], int]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Counters:
    """Queries answered, by outcome; for metrics."""

    queries: int = 0
    answered: int = 0
    empty: int = 0
    nxdomain: int = 0
    errors: int = 0


def answer(wire: bytes, records: RecordsFn, ttl: TtlFn, counters: Counters | None = None) -> bytes | None:
    """The response to one query datagram, or None to drop it. Pure apart from calling the callbacks."""
    c = counters if counters is not None else Counters()
    c.queries += 1
    try:
        query = dns.message.from_wire(wire)
    except dns.exception.DNSException:
        c.errors += 1
        return _formerr(wire)
    response = dns.message.make_response(query)
    response.flags |= dns.flags.AA
    response.flags &= ~dns.flags.RA  # authoritative only: we do not recurse
    if query.opcode() != dns.opcode.QUERY:
        response.set_rcode(dns.rcode.NOTIMP)
        c.errors += 1
        return response.to_wire()
    for question in query.question:
        name = question.name.to_text(omit_final_dot=True).lower()
        addresses = records(name)
        if addresses is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            c.nxdomain += 1
            continue
        if question.rdtype != dns.rdatatype.A or question.rdclass != dns.rdataclass.IN or not addresses:
            c.empty += 1
            continue
        response.answer.append(
            dns.rrset.from_text_list(question.name, ttl(name), dns.rdataclass.IN, dns.rdatatype.A, addresses)
        )
        c.answered += 1
    max_size = query.payload if query.edns >= 0 else _CLASSIC_UDP_SIZE
    try:
        return response.to_wire(max_size=max_size)
    except dns.exception.TooBig:
        response.answer = []
        response.flags |= dns.flags.TC
        return response.to_wire(max_size=max_size)


def _formerr(wire: bytes) -> bytes | None:
    """FORMERR echoing the query id if the 12-byte header is there; otherwise nothing to answer to."""
    if len(wire) < 12:
        return None
    response = dns.message.Message(id=int.from_bytes(wire[:2], "big"))
    response.flags = dns.flags.QR
    response.set_rcode(dns.rcode.FORMERR)
    return response.to_wire()


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self._server = server
        self.transport: asyncio.DatagramTransport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: the selector loop's datagram transport does not subclass DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        try:
            reply = answer(data, self._server.records, self._server.ttl, self._server.counters)
        except Exception:
            # A failing callback must not kill the server: the client times out, as with a broken DNS.
            log.exception("DNS records callback failed")
            self._server.counters.errors += 1
            return
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


class DnsServer:
    """The asyncio shell: a UDP socket on 127.0.0.1 (port 0 = ephemeral) answering through `answer`."""

    def __init__(self, records: RecordsFn, ttl: int | TtlFn = 60, host: str = HOST, port: int = 0) -> None:
        if isinstance(ttl, int):
            if ttl < 0:
                raise ValueError(f"ttl must be >= 0, got {ttl}")
            fixed = ttl
            self.ttl: TtlFn = lambda _name: fixed
        else:
            self.ttl = ttl
        self.records = records
        self.host = host
        self._port = port
        self.counters = Counters()
        self._transport: asyncio.DatagramTransport | None = None
        self._protocol: _Protocol | None = None

    @property
    def port(self) -> int:
        if self._transport is None:
            raise RuntimeError("DNS server is not started")
        return int(self._transport.get_extra_info("sockname")[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: _Protocol(self), local_addr=(self.host, self._port)
        )
        self._transport, self._protocol = transport, protocol

    async def close(self) -> None:
        """Close the socket and wait until it is closed (the transport closes it on a later loop iteration)."""
        if self._transport is None or self._protocol is None:
            return
        self._transport.close()
        await self._protocol.closed
        self._transport = self._protocol = None

    async def __aenter__(self) -> DnsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
