"""The stub resolver control-plane clients use: A lookups against our DNS server, cached for the TTL in sim time.

Rules:
1. The TTL on the wire is in SIM seconds (an lbsim convention: the server and every resolver share the run's
   clock, so a 60 s TTL lasts 60 sim seconds, 0.6 wall seconds at speed 100). A positive answer is cached for
   the smallest TTL of its A records, per name (lower-case, no trailing dot); TTL 0 is not cached.
2. No negative caching: the server sends no SOA, so an empty answer (the empty record of the AWS race),
   NXDOMAIN, a timeout or an error returns [] and the next lookup asks the server again. Recovery after a fix
   is therefore staggered only by the positive answers clients still hold, as in the 02:25-02:40 window
   (docs/sources.md#aws-summary).
3. Concurrent lookups of one name that miss the cache share one query (no thundering herd on the server).
4. One query per miss over UDP (`dns.asyncquery.udp`), no retry and no TCP fallback: a truncated answer is an
   error. The timeout is in sim seconds and converted to loop time by the clock.
5. Every lookup is counted once by outcome: `cache`, or the outcome of the query it waited for.
The cache and the answer classification are pure (`DnsCache`, `classify`); `Resolver` is the asyncio shell.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from worlds.base import Clock

log = logging.getLogger(__name__)

# How a control-plane client finds a service by name: the addresses the name resolves to now (an empty list
# when the record is empty, NXDOMAIN or the DNS server does not answer). The resolver honours TTLs on its own.
Resolve = Callable[[str], Awaitable[list[str]]]


class LookupOutcome(StrEnum):
    CACHE = "cache"
    ANSWERED = "answered"
    EMPTY = "empty"  # NOERROR without A records
    NXDOMAIN = "nxdomain"
    TIMEOUT = "timeout"
    ERROR = "error"  # another rcode, a truncated answer, a socket error


@dataclass(frozen=True, slots=True)
class Answer:
    """What one query yielded: the addresses and how long they may be cached (sim seconds)."""

    outcome: LookupOutcome
    addresses: tuple[str, ...] = ()
    ttl_s: float = 0.0


def normalize(name: str) -> str:
    """DNS names compare case-insensitively; the root dot is implied."""
    return name.strip().rstrip(".").lower()


def classify(response: dns.message.Message) -> Answer:
    """The outcome of one response to an A query. Pure."""
    if response.flags & dns.flags.TC:
        return Answer(LookupOutcome.ERROR)
    rcode = response.rcode()
    if rcode == dns.rcode.NXDOMAIN:
        return Answer(LookupOutcome.NXDOMAIN)
    if rcode != dns.rcode.NOERROR:
        return Answer(LookupOutcome.ERROR)
    addresses: list[str] = []
    ttls: list[int] = []
    for rrset in response.answer:
        if rrset.rdtype == dns.rdatatype.A and rrset.rdclass == dns.rdataclass.IN:
            addresses.extend(rdata.to_text() for rdata in rrset)
            ttls.append(rrset.ttl)
    if not addresses:
        return Answer(LookupOutcome.EMPTY)
    return Answer(LookupOutcome.ANSWERED, tuple(sorted(set(addresses))), float(min(ttls)))


class DnsCache:
    """Positive answers by name until they expire, in sim seconds. Pure: the caller passes `now`."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, tuple[str, ...]]] = {}  # name -> (expires at, addresses)

    def get(self, name: str, now: float) -> list[str] | None:
        """The cached addresses, or None on a miss (never cached, or expired: an expired entry is dropped)."""
        entry = self._entries.get(name)
        if entry is None:
            return None
        expires, addresses = entry
        if now >= expires:
            del self._entries[name]
            return None
        return list(addresses)

    def put(self, name: str, addresses: Iterable[str], ttl_s: float, now: float) -> bool:
        """Cache a positive answer for `ttl_s`; return whether it was cached (not for TTL 0 or no addresses)."""
        kept = tuple(addresses)
        if ttl_s <= 0 or not kept:
            return False
        self._entries[name] = (now + ttl_s, kept)
        return True

    def expires_at(self, name: str) -> float | None:
        entry = self._entries.get(name)
        return None if entry is None else entry[0]

    def flush(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class _LookupCollector(Collector):
    """One per registry, shared by every resolver on it (a second collector with the same metric name would be
    rejected by the registry); counts are kept by client label."""

    def __init__(self) -> None:
        self.counts: dict[str, dict[LookupOutcome, int]] = {}

    def for_client(self, client: str) -> dict[LookupOutcome, int]:
        return self.counts.setdefault(client, dict.fromkeys(LookupOutcome, 0))

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        return self._families(fill=True)

    def _families(self, fill: bool = False) -> Iterator[Metric]:
        lookups = CounterMetricFamily(
            "lbsim_dns_lookups",
            "Control-plane DNS lookups by client and outcome (cache, answered, empty, nxdomain, timeout, error)",
            labels=["client", "outcome"],
        )
        if fill:
            for client, counts in sorted(self.counts.items()):
                for outcome in LookupOutcome:
                    lookups.add_metric([client, outcome.value], counts[outcome])
        yield lookups


_collectors: weakref.WeakKeyDictionary[CollectorRegistry, _LookupCollector] = weakref.WeakKeyDictionary()


def _collector_for(registry: CollectorRegistry) -> _LookupCollector:
    collector = _collectors.get(registry)
    if collector is None:
        collector = _collectors[registry] = _LookupCollector()
        registry.register(collector)
    return collector


class Resolver:
    """A caching stub resolver for one authoritative server; `resolve` fits `Resolve`."""

    def __init__(
        self,
        clock: Clock,
        server: tuple[str, int],
        timeout_s: float = 2.0,
        registry: CollectorRegistry | None = None,
        client: str = "default",
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self._clock = clock
        self._host, self._port = server
        self.timeout_s = timeout_s
        self.client = client
        self.cache = DnsCache()
        # Without a registry the counts are still kept (tests and callers read `counts`), just not exported.
        self.counts = (
            _collector_for(registry).for_client(client) if registry is not None else dict.fromkeys(LookupOutcome, 0)
        )
        self._inflight: dict[str, asyncio.Task[Answer]] = {}
        self._closed = False

    @property
    def server(self) -> tuple[str, int]:
        return self._host, self._port

    def flush(self) -> None:
        """Forget every cached answer (tests; a client restart)."""
        self.cache.flush()

    async def resolve(self, name: str) -> list[str]:
        """The addresses `name` resolves to now, sorted; [] for an empty record, NXDOMAIN, timeout or error."""
        if self._closed:
            raise RuntimeError("resolver is closed")
        key = normalize(name)
        cached = self.cache.get(key, self._clock.now())
        if cached is not None:
            self.counts[LookupOutcome.CACHE] += 1
            return cached
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._query(key))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._forget(key, done))
        try:
            # Shielded: a caller that gives up must not cancel the query the other callers share.
            answer = await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            answer = Answer(LookupOutcome.ERROR)  # the resolver closed under us, not our caller's cancellation
        self.counts[answer.outcome] += 1
        return list(answer.addresses)

    def _forget(self, key: str, done: asyncio.Task[Answer]) -> None:
        if self._inflight.get(key) is done:
            del self._inflight[key]

    async def _query(self, key: str) -> Answer:
        query = dns.message.make_query(key, dns.rdatatype.A)
        try:
            response = await dns.asyncquery.udp(
                query, self._host, timeout=self._clock.to_loop(self.timeout_s), port=self._port
            )
        except dns.exception.Timeout:
            return Answer(LookupOutcome.TIMEOUT)
        except (OSError, dns.exception.DNSException) as exc:
            log.debug("DNS query for %s failed: %r", key, exc)
            return Answer(LookupOutcome.ERROR)
        answer = classify(response)
        if answer.outcome == LookupOutcome.ANSWERED:
            # Cached from when the answer arrived: the server's TTL counts from the moment it answered.
            self.cache.put(key, answer.addresses, answer.ttl_s, self._clock.now())
        return answer

    async def close(self) -> None:
        """Cancel the queries in flight and wait for them (their sockets close with them). Idempotent."""
        self._closed = True
        tasks = list(self._inflight.values())
        self._inflight.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> Resolver:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
