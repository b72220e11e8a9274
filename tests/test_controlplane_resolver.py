"""The caching stub resolver: pure cache and answer classification, then against a real DnsServer on loopback."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
from prometheus_client import CollectorRegistry
from support import LOOPS, open_sockets, run_on, wait_for

from backends.controlplane.dnsserver import DnsServer
from backends.controlplane.resolver import Answer, DnsCache, LookupOutcome, Resolver, classify, normalize
from worlds.clock import ScaledClock

SPEED = 100.0
TTL = 30  # sim seconds: 0.3 s wall at SPEED

ZONE: dict[str, list[str]] = {}


def lookup(name: str) -> list[str] | None:
    return ZONE.get(name)


@pytest.fixture(autouse=True)
def zone() -> None:
    ZONE.clear()
    ZONE.update({"ddb.cp.lbsim": ["10.0.0.1", "10.0.0.2"], "empty.cp.lbsim": [], "zero.cp.lbsim": ["10.0.9.9"]})


@pytest.fixture
async def server() -> AsyncIterator[DnsServer]:
    async with DnsServer(lookup, ttl=lambda name: 0 if name.startswith("zero") else TTL) as s:
        yield s


def resolver(
    server: DnsServer, clock: ScaledClock, client: str = "default", registry: CollectorRegistry | None = None
) -> Resolver:
    return Resolver(clock, (server.host, server.port), registry=registry, client=client)


# -- pure


def test_cache_keeps_positive_answers_until_their_ttl_in_sim_time() -> None:
    cache = DnsCache()
    assert cache.get("a", 0.0) is None
    assert cache.put("a", ["10.0.0.1"], 30.0, now=100.0)
    assert cache.get("a", 129.9) == ["10.0.0.1"]
    assert cache.expires_at("a") == 130.0
    assert cache.get("a", 130.0) is None  # expired at exactly now + ttl, and dropped
    assert len(cache) == 0
    assert not cache.put("b", ["10.0.0.1"], 0.0, now=0.0)  # TTL 0: not cached
    assert not cache.put("c", [], 30.0, now=0.0)  # nothing to cache: no negative caching
    cache.put("d", ["10.0.0.4"], 5.0, now=0.0)
    cache.flush()
    assert cache.get("d", 1.0) is None


def _response(rcode: int = dns.rcode.NOERROR, ttls: tuple[int, ...] = (), tc: bool = False) -> dns.message.Message:
    query = dns.message.make_query("ddb.cp.lbsim", "A")
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    for i, ttl in enumerate(ttls):
        response.answer.append(
            dns.rrset.from_text_list(
                f"n{i}.ddb.cp.lbsim.", ttl, dns.rdataclass.IN, dns.rdatatype.A, [f"10.0.{i}.2", f"10.0.{i}.1"]
            )
        )
    if tc:
        response.flags |= dns.flags.TC
    return response


def test_classify_answers() -> None:
    assert classify(_response(ttls=(40, 25))) == Answer(
        LookupOutcome.ANSWERED, ("10.0.0.1", "10.0.0.2", "10.0.1.1", "10.0.1.2"), 25.0
    )
    assert classify(_response()) == Answer(LookupOutcome.EMPTY)
    assert classify(_response(dns.rcode.NXDOMAIN)) == Answer(LookupOutcome.NXDOMAIN)
    assert classify(_response(dns.rcode.SERVFAIL)) == Answer(LookupOutcome.ERROR)
    assert classify(_response(ttls=(40,), tc=True)) == Answer(LookupOutcome.ERROR)
    assert normalize(" DDB.Cp.LBSim. ") == "ddb.cp.lbsim"


def test_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        Resolver(ScaledClock(SPEED), ("127.0.0.1", 53), timeout_s=0)


# -- against the real server


async def test_a_cached_answer_survives_a_record_change_until_its_ttl_passes(server: DnsServer) -> None:
    clock = ScaledClock(SPEED)
    r = resolver(server, clock)
    before = clock.now()
    assert await r.resolve("DDB.cp.lbsim.") == ["10.0.0.1", "10.0.0.2"]
    expires = r.cache.expires_at("ddb.cp.lbsim")
    assert expires is not None and before + TTL <= expires <= clock.now() + TTL
    ZONE["ddb.cp.lbsim"] = ["10.0.0.3"]
    assert await r.resolve("ddb.cp.lbsim") == ["10.0.0.1", "10.0.0.2"]  # well within the TTL
    assert server.counters.queries == 1 and r.counts[LookupOutcome.CACHE] == 1
    seen: list[str] = []

    async def changed() -> bool:
        seen[:] = await r.resolve("ddb.cp.lbsim")
        return seen == ["10.0.0.3"]

    deadline = time.monotonic() + 2.0
    while not await changed():
        assert time.monotonic() < deadline, "the new record was never seen"
        await asyncio.sleep(0.005)
    switched = clock.now()
    assert switched >= expires  # never before the TTL ran out in sim time
    assert switched <= expires + 10  # and promptly after (10 sim s = 0.1 s wall of slack)
    assert server.counters.queries == 2
    r.flush()
    ZONE["ddb.cp.lbsim"] = ["10.0.0.4"]
    assert await r.resolve("ddb.cp.lbsim") == ["10.0.0.4"]  # flushed: asked again at once
    await r.close()


async def test_empty_record_and_nxdomain_give_no_addresses_and_are_not_cached(server: DnsServer) -> None:
    r = resolver(server, ScaledClock(SPEED))
    assert await r.resolve("empty.cp.lbsim") == []
    assert await r.resolve("empty.cp.lbsim") == []
    assert await r.resolve("nope.cp.lbsim") == []
    assert server.counters.queries == 3  # every one asked the server: no negative caching
    assert r.counts[LookupOutcome.EMPTY] == 2 and r.counts[LookupOutcome.NXDOMAIN] == 1
    ZONE["empty.cp.lbsim"] = ["10.0.5.1"]  # the record comes back: seen at the very next lookup
    assert await r.resolve("empty.cp.lbsim") == ["10.0.5.1"]
    assert await r.resolve("zero.cp.lbsim") == ["10.0.9.9"]
    assert await r.resolve("zero.cp.lbsim") == ["10.0.9.9"]
    assert server.counters.queries == 6  # TTL 0 is not cached either
    await r.close()


async def test_concurrent_lookups_of_one_name_share_one_query(server: DnsServer) -> None:
    r = resolver(server, ScaledClock(SPEED))
    results = await asyncio.gather(*(r.resolve("ddb.cp.lbsim") for _ in range(10)), r.resolve("empty.cp.lbsim"))
    assert results[:10] == [["10.0.0.1", "10.0.0.2"]] * 10 and results[10] == []
    assert server.counters.queries == 2
    assert r.counts[LookupOutcome.ANSWERED] == 10 and r.counts[LookupOutcome.EMPTY] == 1
    await r.close()


async def test_recovery_is_staggered_by_when_each_client_cached_the_answer(server: DnsServer) -> None:
    clock = ScaledClock(SPEED)
    early, late = resolver(server, clock, client="early"), resolver(server, clock, client="late")
    await early.resolve("ddb.cp.lbsim")
    await clock.sleep(TTL / 2)  # the second client asks half a TTL later
    await late.resolve("ddb.cp.lbsim")
    e_exp, l_exp = early.cache.expires_at("ddb.cp.lbsim"), late.cache.expires_at("ddb.cp.lbsim")
    assert e_exp is not None and l_exp is not None and l_exp - e_exp >= TTL / 2
    ZONE["ddb.cp.lbsim"] = ["10.0.0.3"]  # the fix: both still hold the old answer
    switched: dict[str, float] = {}
    deadline = time.monotonic() + 3.0
    while len(switched) < 2:
        assert time.monotonic() < deadline
        for name, r in (("early", early), ("late", late)):
            if name not in switched and await r.resolve("ddb.cp.lbsim") == ["10.0.0.3"]:
                switched[name] = clock.now()
        await asyncio.sleep(0.002)
    assert e_exp <= switched["early"] < l_exp <= switched["late"]
    assert switched["late"] - switched["early"] >= TTL / 2 - 5  # 5 sim s = 50 ms wall for polling slack
    await early.close()
    await late.close()


async def test_a_server_that_never_answers_times_out_within_the_timeout() -> None:
    clock = ScaledClock(SPEED)
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    down = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    down.bind(("127.0.0.1", 0))
    down_port = down.getsockname()[1]
    down.close()  # nothing listens there any more
    try:
        for port in (silent.getsockname()[1], down_port):
            r = Resolver(clock, ("127.0.0.1", port), timeout_s=20.0)  # 0.2 s wall
            t = time.monotonic()
            assert await r.resolve("ddb.cp.lbsim") == []
            elapsed = clock.to_sim(time.monotonic() - t)
            assert elapsed <= 20.0 + 10.0  # the timeout, plus 0.1 s wall of slack
            assert r.counts[LookupOutcome.TIMEOUT] + r.counts[LookupOutcome.ERROR] == 1
            await r.close()
        assert r.counts[LookupOutcome.TIMEOUT] == 1  # the closed port: loopback UDP just goes unanswered
    finally:
        silent.close()


async def test_lookups_are_exported_by_client_and_outcome(server: DnsServer) -> None:
    registry = CollectorRegistry()
    clock = ScaledClock(SPEED)
    traffic = resolver(server, clock, registry=registry, client="traffic")
    hosts = resolver(server, clock, registry=registry, client="host-manager")  # same registry: no clash
    await traffic.resolve("ddb.cp.lbsim")
    await traffic.resolve("ddb.cp.lbsim")
    await hosts.resolve("empty.cp.lbsim")

    def sample(client: str, outcome: str) -> float | None:
        return registry.get_sample_value("lbsim_dns_lookups_total", {"client": client, "outcome": outcome})

    assert sample("traffic", "answered") == 1 and sample("traffic", "cache") == 1
    assert sample("host-manager", "empty") == 1 and sample("host-manager", "timeout") == 0
    await traffic.close()
    await hosts.close()


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_close_cancels_queries_in_flight_and_releases_sockets(loop: str) -> None:
    async def body() -> None:
        before = open_sockets()
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        silent.bind(("127.0.0.1", 0))
        clock = ScaledClock(SPEED)
        r = Resolver(clock, ("127.0.0.1", silent.getsockname()[1]), timeout_s=1000.0)  # 10 s wall: never
        waiting = asyncio.ensure_future(r.resolve("ddb.cp.lbsim"))
        await wait_for(lambda: open_sockets() == before + 2)  # the silent server's and the query's
        t = time.monotonic()
        await r.close()
        assert await waiting == []  # the caller gets no addresses, not a stray CancelledError
        assert time.monotonic() - t < 1.0
        assert r.counts[LookupOutcome.ERROR] == 1
        with pytest.raises(RuntimeError, match="closed"):
            await r.resolve("ddb.cp.lbsim")
        await r.close()  # idempotent
        silent.close()
        async with DnsServer(lookup, ttl=TTL) as s, Resolver(clock, (s.host, s.port)) as r2:
            assert await r2.resolve("ddb.cp.lbsim") == ["10.0.0.1", "10.0.0.2"]
        assert open_sockets() == before

    run_on(loop, body)
