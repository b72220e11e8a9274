"""The authoritative DNS server on real loopback UDP, resolved through dnspython's async resolver and dig."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import dns.asyncresolver
import dns.flags
import dns.message
import dns.rcode
import dns.resolver
import pytest
from support import LOOPS, open_sockets, require_binary, run_on

from backends.controlplane.dnsplan import Planner, PlanStore
from backends.controlplane.dnsserver import DnsServer, answer

ZONE: dict[str, list[str]] = {
    "dynamodb.us-east-1.sim": ["10.0.0.1", "10.0.0.2"],
    "empty.sim": [],
    "big.sim": [f"10.9.{i // 250}.{i % 250 + 1}" for i in range(100)],
}


def lookup(name: str) -> list[str] | None:
    return ZONE.get(name)


@pytest.fixture
async def server() -> AsyncIterator[DnsServer]:
    async with DnsServer(lookup, ttl=lambda name: 30 if name.startswith("dynamodb") else 5) as s:
        yield s


def resolver_for(server: DnsServer) -> dns.asyncresolver.Resolver:
    r = dns.asyncresolver.Resolver(configure=False)
    r.nameservers = [server.host]
    r.port = server.port
    r.lifetime = 2.0
    r.cache = dns.resolver.Cache()
    return r


async def test_resolves_a_records_with_their_ttl(server: DnsServer) -> None:
    ans = await resolver_for(server).resolve("dynamodb.us-east-1.sim", "A")
    assert sorted(r.address for r in ans) == ZONE["dynamodb.us-east-1.sim"]
    assert ans.rrset is not None and ans.rrset.ttl == 30
    assert ans.response.flags & dns.flags.AA
    assert server.counters.answered == 1


async def test_name_lookup_is_case_insensitive(server: DnsServer) -> None:
    ans = await resolver_for(server).resolve("DynamoDB.US-East-1.sim.", "A")
    assert len(ans) == 2


async def test_unknown_name_is_nxdomain(server: DnsServer) -> None:
    with pytest.raises(dns.resolver.NXDOMAIN):
        await resolver_for(server).resolve("nope.sim", "A")
    assert server.counters.nxdomain == 1


async def test_empty_record_is_noerror_with_an_empty_answer(server: DnsServer) -> None:
    r = resolver_for(server)
    with pytest.raises(dns.resolver.NoAnswer):
        await r.resolve("empty.sim", "A")
    ans = await r.resolve("empty.sim", "A", raise_on_no_answer=False)
    assert ans.rrset is None and ans.response.rcode() == dns.rcode.NOERROR
    # Another type for a name that exists: empty answer too, not NXDOMAIN.
    ans = await r.resolve("dynamodb.us-east-1.sim", "AAAA", raise_on_no_answer=False)
    assert ans.rrset is None and ans.response.rcode() == dns.rcode.NOERROR


async def test_the_resolver_cache_keeps_an_answer_for_its_ttl_while_the_record_changes(server: DnsServer) -> None:
    r = resolver_for(server)
    await r.resolve("dynamodb.us-east-1.sim", "A")
    ZONE["dynamodb.us-east-1.sim"], saved = [], ZONE["dynamodb.us-east-1.sim"]
    try:
        cached = await r.resolve("dynamodb.us-east-1.sim", "A")  # within 30 s: served from the cache
        assert len(cached) == 2 and server.counters.queries == 1
    finally:
        ZONE["dynamodb.us-east-1.sim"] = saved


async def test_serves_the_plan_stores_records_including_the_empty_one() -> None:
    planner, store = Planner({"ddb.sim": {"10.0.0.7": 1}}), PlanStore()
    store.add(planner.next(0))
    store.write("ddb.sim", 1, 0)

    def from_store(name: str) -> list[str] | None:
        rs = store.records(name)
        return None if rs is None else sorted(a for a, w in rs.items() if w > 0)

    async with DnsServer(from_store, ttl=1) as s:
        r = resolver_for(s)
        assert [a.address for a in await r.resolve("ddb.sim", "A")] == ["10.0.0.7"]
        store.add(planner.next(1))
        store.write("ddb.sim", 2, 1)
        store.delete_older_than(3, 2)  # deletes the active plan 2: the AWS empty record
        r.cache = dns.resolver.Cache()
        with pytest.raises(dns.resolver.NoAnswer):
            await r.resolve("ddb.sim", "A")


async def test_oversized_udp_answer_is_truncated(server: DnsServer) -> None:
    q = dns.message.make_query("big.sim", "A")  # no EDNS: 512-byte limit
    reply = dns.message.from_wire(answer(q.to_wire(), lookup, lambda _n: 5) or b"")
    assert reply.flags & dns.flags.TC and not reply.answer
    q = dns.message.make_query("big.sim", "A", use_edns=0, payload=4096)
    reply = dns.message.from_wire(answer(q.to_wire(), lookup, lambda _n: 5) or b"")
    assert len(reply.answer[0]) == 100


def test_garbage_gets_formerr_or_is_dropped() -> None:
    reply = answer(b"\x12\x34" + b"\x00" * 10 + b"\xff\xff", lookup, lambda _n: 5)
    assert reply is not None
    msg = dns.message.from_wire(reply)
    assert msg.id == 0x1234 and msg.rcode() == dns.rcode.FORMERR
    assert answer(b"\x00\x01", lookup, lambda _n: 5) is None


async def test_a_failing_callback_does_not_kill_the_server() -> None:
    def broken(name: str) -> list[str] | None:
        if name == "boom.sim":
            raise RuntimeError("boom")
        return ZONE.get(name)

    async with DnsServer(broken, ttl=5) as s:
        r = resolver_for(s)
        r.lifetime = 0.3
        with pytest.raises(dns.resolver.LifetimeTimeout):
            await r.resolve("boom.sim", "A")
        r.lifetime = 2.0
        assert len(await r.resolve("dynamodb.us-east-1.sim", "A")) == 2
        assert s.counters.errors == 1


def test_negative_ttl_is_rejected() -> None:
    with pytest.raises(ValueError, match="ttl"):
        DnsServer(lookup, ttl=-1)


async def test_dig_resolves_through_the_server(server: DnsServer) -> None:
    dig = require_binary("dig", package="dnsutils")
    proc = await asyncio.create_subprocess_exec(
        dig,
        f"@{server.host}",
        "-p",
        str(server.port),
        "dynamodb.us-east-1.sim",
        "A",
        "+short",
        "+time=2",
        "+tries=1",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 5)
    assert sorted(out.decode().split()) == ZONE["dynamodb.us-east-1.sim"]


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_serves_on_both_loops_and_closes_its_socket(loop: str) -> None:
    async def body() -> None:
        before = open_sockets()  # inside the loop: the loop's own self-pipe sockets are counted already
        async with DnsServer(lookup, ttl=5) as s:
            assert open_sockets() == before + 1
            ans = await resolver_for(s).resolve("dynamodb.us-east-1.sim", "A")
            assert len(ans) == 2
        with pytest.raises(RuntimeError, match="not started"):
            _ = s.port
        assert open_sockets() == before

    run_on(loop, body)
