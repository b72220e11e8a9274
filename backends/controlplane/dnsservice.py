"""The control-plane DNS service: the dnsplan Planner and Enactors run in sim time, served by a DnsServer.

The asyncio shell around `dnsplan` (the pure core). Rules:
1. At construction generation 1 is planned from the initial records and written to every endpoint (actor
   "init"): the system starts consistent.
2. The Planner plans every `planner_interval_s` on a fixed grid from `start()`; paused, it skips its ticks.
3. Each Enactor polls for a newer plan every `enactor_poll_s`, on its own fixed grid offset by
   (i + 1/2) / n of a poll, so they never all start at once and which enactor picks a plan up first does
   not depend on event-loop timing (with the defaults "a" and "b" apply each new plan, "c" stands by).
   After a pass it looks again at once. A write takes `apply_time_s`; a failed attempt is retried after
   `retry_s`; the plan is read from the store when the write lands (dnsplan rule 3).
4. `delay_enactor(name, delay_s)` makes that enactor's next write(s) take `delay_s` longer: a hung Route 53
   transaction. Such a write carries the plan it was started with, and once the delay has passed it lands at
   the next moment another enactor finishes a pass, just before that enactor's clean-up ("at the same
   moment", research/aws-facts.md section 3), or on its own after `hold_bound_s` if none comes. If the
   clean-up deleted its plan meanwhile, landing re-creates it (the transaction holds the record data), so
   that clean-up then deletes it again. This makes the race deterministic: with `delay_s` a few planner
   intervals longer than keep_generations x planner_interval_s, the stale plan overwrites a newer one on the
   endpoint, the clean-up deletes it while active, and the record is emptied, whatever the loop timing.
   A shorter delay leaves a stale but non-empty record that the next pass repairs.
5. `pause()` and `restore()` abandon every pass in progress (in-flight writes included): a stopped enactor
   loses its in-memory plan, and a repair must not be undone by a stale write still in flight.
6. DNS: endpoint names (and the names `extra` answers) are matched lower-case without the trailing dot. An
   endpoint answers the addresses of its published record with a weight > 0 (all of them if every weight is
   0, as Route 53 does), [] (NOERROR, no answer) when the record is empty; names that are neither endpoints
   nor known to `extra` are NXDOMAIN. Endpoint TTLs are `ttl_s`, in sim seconds (see resolver.py).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from pydantic import AfterValidator, Field

from backends.config import ConfigModel, Seconds, Whole, WholeSeconds
from backends.controlplane.clock import SimClock
from backends.controlplane.dnsplan import (
    Enactor,
    EnactorState,
    Event,
    Plan,
    Planner,
    PlanStore,
    Protections,
    Records,
    StartOutcome,
    WriteOutcome,
)
from backends.controlplane.dnsserver import HOST, DnsServer

log = logging.getLogger(__name__)

EventHook = Callable[[str, dict[str, Any]], None]


class DnsSettings(ConfigModel):
    """The DNS automation's timing and protections (a scenario's `control_plane.dns`), in sim seconds."""

    planner_interval_s: Annotated[Seconds, Field(gt=0)] = 5.0
    apply_time_s: Annotated[Seconds, Field(ge=0)] = 0.5  # per endpoint write
    retry_s: Annotated[Seconds, Field(gt=0)] = 1.0  # wait after a failed attempt
    enactor_poll_s: Annotated[Seconds, Field(gt=0)] = 1.0  # how often an idle enactor looks for a newer plan
    keep_generations: Annotated[Whole, Field(ge=0, le=1000)] = 3
    ttl_s: Annotated[WholeSeconds, Field(ge=0, le=86400)] = 5  # of every endpoint's record
    protections: Protections = Protections()


def _distinct(names: tuple[str, ...]) -> tuple[str, ...]:
    if len(set(names)) != len(names):
        raise ValueError(f"enactor names must be distinct, got {list(names)}")
    return names


# One per zone, as AWS runs one per AZ.
EnactorNames = Annotated[tuple[str, ...], Field(min_length=1), AfterValidator(_distinct)]


class DnsServiceConfig(DnsSettings):
    """The settings, the zone and the enactors' names."""

    zone_suffix: str = "cp.lbsim"
    enactors: EnactorNames = ("a", "b", "c")

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


@dataclass(slots=True)
class _Delay:
    delay_s: float
    writes: int
    endpoint: str | None  # wait for the first write to this endpoint before counting writes

    def take(self, endpoint: str) -> float:
        if self.endpoint is not None:
            if endpoint != self.endpoint:
                return 0.0
            self.endpoint = None
        self.writes -= 1
        return self.delay_s


@dataclass(slots=True)
class _Slot:
    """One enactor and the shell's state around it."""

    name: str
    offset_s: float  # poll grid offset
    enactor: Enactor
    epoch: int = 0  # bumped when its pass is abandoned: a task that sees a new epoch drops what it was doing
    delay: _Delay | None = None
    failures: int = 0

    def take_delay(self, endpoint: str) -> float:
        if self.delay is None:
            return 0.0
        extra = self.delay.take(endpoint)
        if self.delay.writes <= 0:
            self.delay = None
        return extra

    def take_failure(self) -> bool:
        if self.failures <= 0:
            return False
        self.failures -= 1
        return True


@dataclass(slots=True)
class _Held:
    """A delayed write whose delay has passed, waiting to land."""

    slot: _Slot
    endpoint: str
    plan: Plan
    epoch: int
    landed: asyncio.Future[None]


class DnsService:
    """Planner + Enactors + plan store in sim time, answering DNS for the control-plane endpoints."""

    def __init__(
        self,
        clock: SimClock,
        config: DnsServiceConfig,
        endpoints: Mapping[str, Records],
        registry: CollectorRegistry | None = None,
        extra: Callable[[str], list[str] | None] | None = None,
        extra_ttl: Callable[[str], int] | None = None,
        on_event: EventHook | None = None,
        host: str = HOST,
        port: int = 0,
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
        self._endpoints = tuple(sorted(initial))
        self._owned = frozenset(self._endpoints)
        self.planner = Planner(initial)
        self.store = PlanStore(config.protections)
        now = clock.now()
        first = self.planner.next(now)
        self.store.add(first)
        for endpoint in self._endpoints:
            self.store.write(endpoint, first.generation, now, actor="init")
        n = len(config.enactors)
        self._slots = {
            name: _Slot(name, (i + 0.5) / n * config.enactor_poll_s, self._new_enactor(name))
            for i, name in enumerate(config.enactors)
        }
        # The longest a ripe delayed write waits for another enactor's clean-up: the next plan, the poll that
        # picks it up and a whole pass, with one retry to spare.
        self.hold_bound_s = (
            config.planner_interval_s
            + config.enactor_poll_s
            + (len(self._endpoints) + 1) * config.apply_time_s
            + config.retry_s
        )
        self._held: dict[str, _Held] = {}
        self._running = asyncio.Event()
        self._running.set()
        self._refusal_noted = False
        self._seen_events = self.store.events_total
        self.writes: dict[tuple[str, WriteOutcome], int] = {
            (name, outcome): 0 for name in config.enactors for outcome in WriteOutcome
        }
        self.plans_deleted = 0
        self.records_emptied = 0
        self.server = DnsServer(self._lookup, ttl=self._ttl, host=host, port=port)
        self._tasks: list[asyncio.Task[None]] = []
        self._t0 = now
        self._started = self._closed = False
        if registry is not None:
            registry.register(_ServiceCollector(self))

    # -- reading

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self._endpoints

    @property
    def events(self) -> Sequence[Event]:
        return self.store.events

    @property
    def generation(self) -> int:
        """The newest planned generation."""
        return self.planner.generation

    @property
    def applied_generation(self) -> int:
        """The highest generation applied on any endpoint (0 if none)."""
        return self.store.applied_generation() or 0

    @property
    def inconsistent(self) -> bool:
        return self.store.inconsistent

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

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

    # -- operator / scenario actions

    def set_records(self, endpoint: str, records: Records) -> None:
        """Change an endpoint's desired records (capacity, health); the next plan carries it."""
        key = self._endpoint(endpoint)
        self.planner.set_records(key, records)
        self._emit("set-records", endpoint=key, addresses=len(records))

    def delay_enactor(self, name: str, delay_s: float, writes: int = 1, endpoint: str | None = None) -> None:
        """The next `writes` write attempts of an enactor each take `delay_s` longer (rule 4); with `endpoint`,
        counting starts at its next write to that endpoint. Replaces a delay not used up yet."""
        slot = self._slot(name)
        if delay_s < 0 or writes < 1:
            raise ValueError(f"need delay_s >= 0 and writes >= 1, got {delay_s} and {writes}")
        key = None if endpoint is None else self._endpoint(endpoint)
        slot.delay = _Delay(delay_s, writes, key)
        self._emit("delay-injected", enactor=name, delay_s=delay_s, writes=writes, endpoint=key)

    def fail_writes(self, name: str, count: int) -> None:
        """The next `count` write attempts of an enactor fail, each retried after retry_s."""
        slot = self._slot(name)
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        slot.failures = count
        self._emit("fail-injected", enactor=name, count=count)

    def restore(self) -> Plan | None:
        """Operator repair: publish the newest plan everywhere, leave the inconsistent state, drop every pass
        in progress; the enactors resume from the next plan."""
        now = self._clock.now()
        plan = self.store.restore(now)
        self._abandon_passes()
        self._refusal_noted = False
        self._drain_events()
        self._emit("restored", generation=None if plan is None else plan.generation)
        return plan

    def pause(self) -> None:
        """Disable the automation (planner and enactors), as AWS did worldwide after the event."""
        if self.paused:
            return
        self._running.clear()
        self._abandon_passes()
        self._emit("paused")

    def resume(self) -> None:
        if not self.paused:
            return
        self._running.set()
        self._emit("resumed")

    # -- lifecycle

    async def start(self) -> None:
        if self._closed:
            raise RuntimeError("DNS service is closed")
        if self._started:
            return
        await self.server.start()
        self._started = True
        self._t0 = self._clock.now()
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._planner_loop(), name="dns-planner"))
        for slot in self._slots.values():
            self._tasks.append(loop.create_task(self._enactor_loop(slot), name=f"dns-enactor-{slot.name}"))

    async def close(self) -> None:
        """Stop every task and wait for it, and close the UDP socket. Idempotent."""
        self._closed = True
        self._abandon_passes()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
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

    # -- the automation

    async def _planner_loop(self) -> None:
        interval = self.config.planner_interval_s
        tick = self._t0 + interval
        while True:
            await self._clock.sleep_until(tick)
            if not self.paused:
                self.store.add(self.planner.next(self._clock.now()))
                self._drain_events()
            # Next grid point after now: a loop that fell behind skips ticks instead of planning in a burst.
            tick += interval * max(1, math.floor((self._clock.now() - tick) / interval) + 1)

    async def _enactor_loop(self, slot: _Slot) -> None:
        poll = self.config.enactor_poll_s
        await self._clock.sleep_until(self._t0 + slot.offset_s)
        while True:
            await self._running.wait()
            now = self._clock.now()
            outcome = slot.enactor.start(now)
            if outcome == StartOutcome.STARTED:
                await self._run_pass(slot)
                continue  # a newer plan may have come meanwhile: look again at once
            if outcome == StartOutcome.REFUSED_INCONSISTENT:
                self._note_refusal(slot.name, "start")
            # The next point of this enactor's poll grid, so its phase never drifts.
            k = math.floor((now - self._t0 - slot.offset_s) / poll) + 1
            await self._clock.sleep_until(self._t0 + slot.offset_s + k * poll)

    async def _run_pass(self, slot: _Slot) -> None:
        epoch, enactor = slot.epoch, slot.enactor
        while enactor.state == EnactorState.APPLYING:
            assert enactor.plan is not None
            endpoint, plan = enactor.pending[0], enactor.plan
            extra = slot.take_delay(endpoint)
            fail = slot.take_failure()
            await self._clock.sleep(self.config.apply_time_s + extra)
            if slot.epoch != epoch:
                return
            if fail:
                enactor.apply_next(self._clock.now(), ok=False)
                self.writes[slot.name, WriteOutcome.RETRY] += 1
                await self._clock.sleep(self.config.retry_s)
                if slot.epoch != epoch:
                    return
            elif extra > 0:
                await self._hold(slot, endpoint, plan)
                if slot.epoch != epoch:
                    return
            else:
                self._write(slot, self._clock.now())
        if enactor.state == EnactorState.CLEANUP_PENDING:
            now = self._clock.now()
            self._land_held(now, besides=slot.name)
            enactor.cleanup(now)
            self._drain_events()

    async def _hold(self, slot: _Slot, endpoint: str, plan: Plan) -> None:
        """Wait, as a ripe delayed write, for another enactor's clean-up to land it; land it alone after the
        bound."""
        held = _Held(slot, endpoint, plan, slot.epoch, asyncio.get_running_loop().create_future())
        self._held[slot.name] = held
        bound = asyncio.get_running_loop().create_task(self._clock.sleep(self.hold_bound_s))
        try:
            await asyncio.wait({held.landed, bound}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            bound.cancel()
            await asyncio.gather(bound, return_exceptions=True)
        if self._held.get(slot.name) is held:
            del self._held[slot.name]
            if slot.epoch == held.epoch:
                self._land(held, self._clock.now(), by=slot.name)

    def _land_held(self, now: float, besides: str) -> None:
        for name in sorted(self._held):
            if name == besides:
                continue
            held = self._held.pop(name)
            if held.slot.epoch == held.epoch:
                self._land(held, now, by=besides)
            if not held.landed.done():
                held.landed.set_result(None)

    def _land(self, held: _Held, now: float, by: str) -> None:
        recreated = (
            not self.store.inconsistent
            and held.plan.generation not in self.store.plans
            and held.slot.enactor.state == EnactorState.APPLYING
        )
        if recreated:
            self.store.add(held.plan)
        outcome = self._write(held.slot, now)
        self._emit(
            "delayed-write-landed",
            enactor=held.slot.name,
            endpoint=held.endpoint,
            generation=held.plan.generation,
            outcome=outcome.value,
            recreated=recreated,
            before_cleanup_of=None if by == held.slot.name else by,
            at=now,
        )

    def _write(self, slot: _Slot, now: float) -> WriteOutcome:
        _endpoint, outcome = slot.enactor.apply_next(now)
        self.writes[slot.name, outcome] += 1
        self._drain_events()
        if outcome == WriteOutcome.REFUSED_INCONSISTENT:
            self._note_refusal(slot.name, "write")
        return outcome

    def _abandon_passes(self) -> None:
        for slot in self._slots.values():
            slot.epoch += 1
            slot.enactor = self._new_enactor(slot.name)
        held, self._held = self._held, {}
        for h in held.values():
            if not h.landed.done():
                h.landed.set_result(None)

    def _new_enactor(self, name: str) -> Enactor:
        return Enactor(name, self.store, keep_generations=self.config.keep_generations)

    # -- observability

    def _drain_events(self) -> None:
        """Count the store's new events and report the notable ones."""
        events = self.store.events
        # The store's log is bounded, so count from its running total rather than index into it.
        fresh = min(self.store.events_total - self._seen_events, len(events))
        for event in itertools.islice(events, len(events) - fresh, None):
            if event.kind == "deleted":
                self.plans_deleted += 1
            elif event.kind in ("emptied", "guard-kept"):
                self.records_emptied += event.kind == "emptied"
                fields = {"at": event.at, "endpoint": event.endpoint, "generation": event.generation}
                self._emit(event.kind, by=event.actor, **fields)
        self._seen_events = self.store.events_total

    def _note_refusal(self, enactor: str, step: str) -> None:
        if not self._refusal_noted:
            self._refusal_noted = True
            self._emit("refused-inconsistent", enactor=enactor, step=step, generation=self.generation)

    def _emit(self, kind: str, **fields: Any) -> None:
        fields.setdefault("at", self._clock.now())
        log.info("dns %s %s", kind, fields)
        if self.on_event is None:
            return
        try:
            self.on_event(kind, fields)
        except Exception:
            # A broken hook must not stop the automation it observes.
            log.exception("DNS service event hook failed")

    def _slot(self, name: str) -> _Slot:
        slot = self._slots.get(name)
        if slot is None:
            raise KeyError(f"no enactor {name!r}; have {sorted(self._slots)}")
        return slot

    def _endpoint(self, endpoint: str) -> str:
        key = _normalize(endpoint)
        if key not in self._owned:
            raise KeyError(f"no endpoint {endpoint!r}; have {list(self._endpoints)}")
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
