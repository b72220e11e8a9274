"""The control-plane DNS service: the pure DnsAutomation driven by a sim clock, served by a DnsServer.

The asyncio shell around `dnsautomation` (the timing rules: planner ticks, enactor passes, the forced and
emergent race modes) and `dnsplan` (planner, enactors, plan store). Rules:
1. One driver task sleeps until the automation's next transition is due, then runs every transition due by
   the clock's now (`DnsAutomation.advance`); an operator action catches the automation up to now, acts, and
   wakes the driver, whose next transition may have moved. Everything else is in `dnsautomation.py`.
2. The emergent race mode draws its delays from the `rng` the caller injects (seeded per run), never from the
   global `random`; the forced mode draws nothing.
3. DNS: endpoint names (and the names `extra` answers) are matched lower-case without the trailing dot. An
   endpoint answers the addresses of its published record with a weight > 0 (all of them if every weight is
   0, as Route 53 does), [] (NOERROR, no answer) when the record is empty; names that are neither endpoints
   nor known to `extra` are NXDOMAIN. Endpoint TTLs are `ttl_s`, in sim seconds (see resolver.py).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Annotated, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from pydantic import Field

from backends.controlplane.dnsautomation import AutomationConfig, DnsAutomation, DnsTiming, EnactorNames
from backends.controlplane.dnsplan import Event, Plan, Planner, PlanStore, Records, WriteOutcome
from backends.controlplane.dnsserver import HOST, DnsServer
from simconfig import WholeSeconds
from worlds.base import Clock

log = logging.getLogger(__name__)

EventHook = Callable[[str, dict[str, Any]], None]


class DnsSettings(DnsTiming):
    """The DNS automation's settings (a scenario's `control_plane.dns`): its timing, protections and race
    (`dnsautomation.DnsTiming`) and the TTL of every endpoint's record, in sim seconds."""

    ttl_s: Annotated[WholeSeconds, Field(ge=0, le=86400)] = 5


class DnsServiceConfig(DnsSettings):
    """The settings, the zone and the enactors' names."""

    zone_suffix: str = "cp.lbsim"
    enactors: EnactorNames = ("a", "b", "c")

    def automation(self) -> AutomationConfig:
        """What the pure core takes: every field but the zone and the TTL, already checked by the same rules."""
        return AutomationConfig.from_settings(self)

    def fqdn(self, label: str) -> str:
        """The name of an endpoint in the zone: fqdn("leasestore") -> "leasestore.cp.lbsim"."""
        return f"{label}.{self.zone_suffix}".lower().rstrip(".")


def _normalize(name: str) -> str:
    return name.strip().rstrip(".").lower()


def served_addresses(records: Mapping[str, int] | None) -> list[str]:
    """What DNS answers for a published record: addresses with weight > 0, or all if every weight is 0."""
    if not records:
        return []
    positive = sorted(a for a, w in records.items() if w > 0)
    return positive or sorted(records)


class DnsService:
    """The DNS automation in sim time, answering DNS for the control-plane endpoints."""

    def __init__(
        self,
        clock: Clock,
        config: DnsServiceConfig,
        endpoints: Mapping[str, Records],
        registry: CollectorRegistry | None = None,
        extra: Callable[[str], list[str] | None] | None = None,
        extra_ttl: Callable[[str], int] | None = None,
        on_event: EventHook | None = None,
        host: str = HOST,
        port: int = 0,
        rng: random.Random | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one endpoint is needed")
        self._clock = clock
        self.config = config
        self.extra = extra
        self.extra_ttl = extra_ttl
        self.on_event = on_event
        initial: dict[str, Records] = {}
        zone = _normalize(config.zone_suffix)
        for name, records in endpoints.items():
            key = _normalize(name)
            if key != zone and not key.endswith("." + zone):
                raise ValueError(f"endpoint {name} is not in the zone {zone}")
            if key in initial:
                raise ValueError(f"endpoint {name} is given twice")
            initial[key] = records
        self.automation = DnsAutomation(config.automation(), initial, clock.now(), rng, notify=self._emit)
        self._owned = frozenset(self.automation.endpoints)
        self.server = DnsServer(self._lookup, ttl=self._ttl, host=host, port=port)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._started = self._closed = False
        if registry is not None:
            registry.register(_ServiceCollector(self))

    # -- reading

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self.automation.endpoints

    @property
    def planner(self) -> Planner:
        return self.automation.planner

    @property
    def store(self) -> PlanStore:
        return self.automation.store

    @property
    def events(self) -> Sequence[Event]:
        return self.automation.store.events

    @property
    def writes(self) -> dict[tuple[str, WriteOutcome], int]:
        return self.automation.writes

    @property
    def plans_deleted(self) -> int:
        return self.automation.plans_deleted

    @property
    def records_emptied(self) -> int:
        return self.automation.records_emptied

    @property
    def generation(self) -> int:
        """The newest planned generation."""
        return self.automation.planner.generation

    @property
    def applied_generation(self) -> int:
        """The highest generation applied on any endpoint (0 if none)."""
        return self.automation.store.applied_generation() or 0

    @property
    def inconsistent(self) -> bool:
        return self.automation.store.inconsistent

    @property
    def paused(self) -> bool:
        return self.automation.paused

    def record(self, endpoint: str) -> list[str] | None:
        """The addresses DNS answers for an endpoint now ([] = the empty record); None if not an endpoint."""
        key = _normalize(endpoint)
        return served_addresses(self.store.published.get(key)) if key in self._owned else None

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def address(self) -> tuple[str, int]:
        return self.server.host, self.server.port

    # -- operator / scenario actions: catch the automation up to now, act, wake the driver

    def set_records(self, endpoint: str, records: Records) -> None:
        """Change an endpoint's desired records (capacity, health); the next plan carries it."""
        key = self._endpoint(endpoint)
        self.automation.planner.set_records(key, records)
        self._emit("set-records", {"at": self._clock.now(), "endpoint": key, "addresses": len(records)})

    def delay_enactor(self, name: str, delay_s: float, writes: int = 1, endpoint: str | None = None) -> None:
        """The next `writes` write attempts of an enactor each take `delay_s` longer (dnsautomation rules 4 and
        6); with `endpoint`, counting starts at its next write to that endpoint."""
        key = None if endpoint is None else self._endpoint(endpoint)
        now = self._catch_up()
        self.automation.delay_enactor(name, delay_s, now, writes=writes, endpoint=key)
        self._wake.set()

    def fail_writes(self, name: str, count: int) -> None:
        """The next `count` write attempts of an enactor fail, each retried after retry_s."""
        now = self._catch_up()
        self.automation.fail_writes(name, count, now)
        self._wake.set()

    def restore(self) -> Plan | None:
        """Operator repair: publish the newest plan everywhere, leave the inconsistent state, drop every pass
        in progress; the enactors resume from the next plan."""
        plan = self.automation.restore(self._catch_up())
        self._wake.set()
        return plan

    def pause(self) -> None:
        """Disable the automation (planner and enactors), as AWS did worldwide after the event."""
        self.automation.pause(self._catch_up())
        self._wake.set()

    def resume(self) -> None:
        self.automation.resume(self._catch_up())
        self._wake.set()

    # -- lifecycle

    async def start(self) -> None:
        if self._closed:
            raise RuntimeError("DNS service is closed")
        if self._started:
            return
        await self.server.start()
        self._started = True
        self._task = asyncio.get_running_loop().create_task(self._drive(), name="dns-automation")

    async def close(self) -> None:
        """Stop the driver and wait for it, and close the UDP socket. Idempotent."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self.server.close()

    async def __aenter__(self) -> DnsService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- DNS callbacks (DnsServer passes lower-case names without the trailing dot)

    def _lookup(self, name: str) -> list[str] | None:
        if name in self._owned:
            return served_addresses(self.store.published.get(name))
        return self.extra(name) if self.extra is not None else None

    def _ttl(self, name: str) -> int:
        if name in self._owned or self.extra_ttl is None:
            return self.config.ttl_s
        return self.extra_ttl(name)

    # -- the driver

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            sleeper = loop.create_task(self._clock.sleep_until(self.automation.next_due()))
            waker = loop.create_task(self._wake.wait())
            try:
                await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (sleeper, waker):
                    task.cancel()
                await asyncio.gather(sleeper, waker, return_exceptions=True)
            try:
                self.automation.advance(self._clock.now())
            except Exception:
                # A broken rule must not stop the DNS automation silently: say so, then stop it.
                log.exception("DNS automation failed; its records stay as they are")
                raise

    def _catch_up(self) -> float:
        now = self._clock.now()
        if self._started and not self._closed:
            self.automation.advance(now)
        return now

    # -- observability

    def _emit(self, kind: str, fields: dict[str, Any]) -> None:
        log.info("dns %s %s", kind, fields)
        if self.on_event is None:
            return
        try:
            self.on_event(kind, fields)
        except Exception:
            # A broken hook must not stop the automation it observes.
            log.exception("DNS service event hook failed")

    def _endpoint(self, endpoint: str) -> str:
        key = _normalize(endpoint)
        if key not in self._owned:
            raise KeyError(f"no endpoint {endpoint!r}; have {list(self.endpoints)}")
        return key


class _ServiceCollector(Collector):
    """Reads the service when scraped."""

    def __init__(self, service: DnsService) -> None:
        self._service = service

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        return self._families(fill=True)

    def _families(self, fill: bool = False) -> Iterator[Metric]:
        s = self._service
        generation = GaugeMetricFamily("lbsim_dns_plan_generation", "Newest DNS plan generation planned")
        applied = GaugeMetricFamily("lbsim_dns_applied_generation", "Highest DNS plan generation applied")
        addresses = GaugeMetricFamily(
            "lbsim_dns_record_addresses", "Addresses DNS answers per control-plane endpoint", labels=["endpoint"]
        )
        inconsistent = GaugeMetricFamily(
            "lbsim_dns_inconsistent", "1 while an endpoint's applied plan is deleted (enactors blocked)"
        )
        writes = CounterMetricFamily(
            "lbsim_dns_enactor_writes",
            "Enactor endpoint write attempts by enactor and outcome",
            labels=["enactor", "outcome"],
        )
        deleted = CounterMetricFamily("lbsim_dns_plans_deleted", "DNS plans deleted by enactor clean-ups")
        emptied = CounterMetricFamily("lbsim_dns_records_emptied", "Records emptied by deleting their active plan")
        evicted = CounterMetricFamily(
            "lbsim_dns_plans_evicted", "DNS plans evicted at the plan store's hard cap (a memory bound, not a clean-up)"
        )
        queries = CounterMetricFamily(
            "lbsim_dns_queries",
            "DNS questions answered by outcome (answered, empty, nxdomain, error)",
            labels=["outcome"],
        )
        if fill:
            generation.add_metric([], s.generation)
            applied.add_metric([], s.applied_generation)
            for endpoint in s.endpoints:
                addresses.add_metric([endpoint], len(s.record(endpoint) or []))
            inconsistent.add_metric([], int(s.inconsistent))
            for (enactor, outcome), n in s.writes.items():
                writes.add_metric([enactor, outcome.value], n)
            deleted.add_metric([], s.plans_deleted)
            emptied.add_metric([], s.records_emptied)
            evicted.add_metric([], s.store.plans_evicted)
            c = s.server.counters
            by_outcome = {"answered": c.answered, "empty": c.empty, "nxdomain": c.nxdomain, "error": c.errors}
            for label, n in by_outcome.items():
                queries.add_metric([label], n)
        yield from (generation, applied, addresses, inconsistent, writes, deleted, emptied, evicted, queries)
