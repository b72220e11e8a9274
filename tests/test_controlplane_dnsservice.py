"""The DNS service shell: planner + enactors in sim time behind a real DNS server, and the AWS race on demand."""

from __future__ import annotations

import asyncio
import collections
import random
from typing import Any

import dns.asyncresolver
import dns.rcode
import dns.resolver
import pytest
from prometheus_client import CollectorRegistry
from support import LOOPS, open_sockets, run_on, wait_for

from backends.controlplane.dnsautomation import DnsAutomation, RaceConfig, RaceMode
from backends.controlplane.dnsplan import Protections, WriteOutcome
from backends.controlplane.dnsservice import DnsService, DnsServiceConfig, served_addresses
from scenarios.schema import ScenarioError, load_scenario
from worlds.clock import ScaledClock

SPEED = 100.0
CONFIG = DnsServiceConfig()  # planner every 5 s, 3 enactors, 0.5 s per write, keep 3 generations
KEY = "ddb.cp.lbsim"  # sorts first: the delayed enactor's first write of a pass hits it
ENDPOINTS = {
    KEY: {"10.0.0.1": 1, "10.0.0.2": 1},
    "leasestore.cp.lbsim": {"10.0.1.1": 1},
    "netconfig.cp.lbsim": {"10.0.2.1": 1, "10.0.2.2": 0},
}
# Several planner intervals longer than keep_generations x planner_interval: the race's condition.
RACE_DELAY = (CONFIG.keep_generations + 3) * CONFIG.planner_interval_s
LB_NAME = "lb.lbsim"


class Recorder:
    """Collects the service's on_event calls."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, kind: str, fields: dict[str, Any]) -> None:
        self.events.append((kind, fields))

    def kinds(self) -> list[str]:
        return [k for k, _ in self.events]

    def first(self, kind: str) -> dict[str, Any]:
        return next(f for k, f in self.events if k == kind)


def extra(name: str) -> list[str] | None:
    return ["10.9.0.1", "10.9.0.2"] if name == LB_NAME else None


def make(
    protections: Protections | None = None, registry: CollectorRegistry | None = None
) -> tuple[DnsService, Recorder, ScaledClock]:
    clock = ScaledClock(SPEED)
    recorder = Recorder()
    config = DnsServiceConfig(protections=protections or Protections())
    service = DnsService(clock, config, ENDPOINTS, registry, extra=extra, extra_ttl=lambda _name: 7, on_event=recorder)
    return service, recorder, clock


def resolver_for(service: DnsService) -> dns.asyncresolver.Resolver:
    r = dns.asyncresolver.Resolver(configure=False)
    r.nameservers = [service.address[0]]
    r.port = service.address[1]
    r.lifetime = 2.0
    r.cache = None
    return r


async def query(service: DnsService, name: str) -> tuple[int, list[str], int | None]:
    """rcode, addresses and TTL of a real query against the service's server."""
    try:
        ans = await resolver_for(service).resolve(name, "A", raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN:
        return dns.rcode.NXDOMAIN, [], None
    rrset = ans.rrset
    return ans.response.rcode(), sorted(r.address for r in rrset or []), None if rrset is None else rrset.ttl


async def run_until(service: DnsService, generation: int, within: float = 3.0) -> None:
    await wait_for(lambda: service.generation >= generation, within)


# -- no sockets


def test_config_is_validated() -> None:
    for bad in (
        {"planner_interval_s": 0},
        {"enactor_poll_s": -1},
        {"retry_s": 0},
        {"apply_time_s": -0.1},
        {"keep_generations": -1},
        {"ttl_s": -1},
        {"enactors": ()},
        {"enactors": ("a", "a")},
    ):
        with pytest.raises(ValueError):
            DnsServiceConfig(**bad)  # type: ignore[arg-type]
    assert CONFIG.fqdn("LeaseStore") == "leasestore.cp.lbsim"
    with pytest.raises(ValueError, match="seeded"):  # the emergent mode draws from an injected rng only
        DnsService(ScaledClock(SPEED), DnsServiceConfig(race=RaceConfig(mode=RaceMode.EMERGENT)), ENDPOINTS)


def test_the_scenario_schema_checks_the_race_mode_and_the_built_in_race_is_forced() -> None:
    scenario, _ = load_scenario("dns-enactor-race")
    assert scenario.control_plane is not None and scenario.control_plane.dns.race.mode == "forced"
    emergent, _ = load_scenario("dns-enactor-race", ["control_plane.dns.race.mode=emergent"])
    assert emergent.control_plane is not None and emergent.control_plane.dns.race.mode == "emergent"
    for override, message in (
        ("control_plane.dns.race.mode=chaotic", "must be 'forced' or 'emergent'"),
        ("control_plane.dns.race.delay_probability=1.5", "less than or equal to 1"),
        ("control_plane.dns.race.delay_mean_s=0", "greater than 0"),
        ("control_plane.dns.race.delay_max=3", "did you mean `delay_max_s`"),
    ):
        with pytest.raises(ScenarioError, match=message):
            load_scenario("dns-enactor-race", [override])


def test_served_addresses_follow_route53_weights() -> None:
    assert served_addresses(None) == [] and served_addresses({}) == []
    assert served_addresses({"10.0.0.2": 1, "10.0.0.1": 3, "10.0.0.3": 0}) == ["10.0.0.1", "10.0.0.2"]
    assert served_addresses({"10.0.0.2": 0, "10.0.0.1": 0}) == ["10.0.0.1", "10.0.0.2"]  # all 0: all answered


def test_the_initial_records_are_published_before_anything_runs() -> None:
    service, recorder, _ = make()
    assert service.generation == 1 and service.applied_generation == 1 and not service.inconsistent
    assert service.record("DDB.cp.lbsim.") == ["10.0.0.1", "10.0.0.2"]
    assert service.record("netconfig.cp.lbsim") == ["10.0.2.1"]  # weight 0 is not answered
    assert service.record(LB_NAME) is None  # not an endpoint of the service
    assert [e.kind for e in service.events] == ["applied"] * 3
    assert recorder.events == []  # the initial publish is not news
    with pytest.raises(ValueError, match="zone"):
        DnsService(ScaledClock(SPEED), CONFIG, {"ddb.elsewhere": {"10.0.0.1": 1}})
    with pytest.raises(KeyError):
        service.set_records("nope.cp.lbsim", {"10.0.0.1": 1})
    with pytest.raises(KeyError):
        service.delay_enactor("z", 10.0)
    with pytest.raises(ValueError):
        service.delay_enactor("a", 10.0, writes=0)
    with pytest.raises(ValueError):
        service.fail_writes("a", -1)


def test_store_events_are_drained_once_each_from_its_bounded_log() -> None:
    registry = CollectorRegistry()
    service, _, _ = make(registry=registry)
    store = service.store
    store.events = collections.deque(store.events, maxlen=5)  # a small log, so it wraps many times below
    for gen in range(2, 12):
        store.add(service.planner.next(float(gen)))
        for endpoint in service.endpoints:
            store.write(endpoint, gen, float(gen))
        store.delete_older_than(gen - 1, float(gen))  # generations 1 to 9, none of them active any more
        service.automation._drain_events()  # as the automation does after every write and clean-up
    assert service.plans_deleted == 9 and service.records_emptied == 0
    assert len(store.events) == 5 and store.events_total == 3 + 10 * 3 + 9
    assert registry.get_sample_value("lbsim_dns_plans_deleted_total") == 9
    assert registry.get_sample_value("lbsim_dns_plans_evicted_total") == 0


# -- on loopback


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_planner_and_enactors_keep_every_record_served_as_generations_advance(loop: str) -> None:
    async def body() -> None:
        before = open_sockets()
        registry = CollectorRegistry()
        service, recorder, _ = make(registry=registry)
        async with service:
            assert open_sockets() == before + 1
            await run_until(service, 6)
            await wait_for(lambda: service.applied_generation >= 6)
            assert not service.inconsistent
            assert all(service.record(e) for e in ENDPOINTS)
            applied = {n for (n, o), c in service.writes.items() if o == WriteOutcome.APPLIED and c}
            assert len(applied) >= 2  # staggered enactors, more than one at work
            await wait_for(lambda: service.plans_deleted >= 2)  # clean-ups run
            assert "emptied" not in recorder.kinds()
            assert await query(service, "DDB.CP.LBSIM.") == (dns.rcode.NOERROR, ["10.0.0.1", "10.0.0.2"], CONFIG.ttl_s)
            assert await query(service, LB_NAME) == (dns.rcode.NOERROR, ["10.9.0.1", "10.9.0.2"], 7)
            assert (await query(service, "nope.cp.lbsim"))[0] == dns.rcode.NXDOMAIN

            def sample(name: str, labels: dict[str, str] | None = None) -> float | None:
                return registry.get_sample_value(name, labels or {})

            assert sample("lbsim_dns_plan_generation") == service.generation
            assert sample("lbsim_dns_applied_generation") == service.applied_generation
            assert sample("lbsim_dns_record_addresses", {"endpoint": KEY}) == 2
            assert sample("lbsim_dns_inconsistent") == 0
            assert (sample("lbsim_dns_enactor_writes_total", {"enactor": "a", "outcome": "applied"}) or 0) > 0
            assert sample("lbsim_dns_records_emptied_total") == 0
            assert sample("lbsim_dns_queries_total", {"outcome": "answered"}) == 2
            assert sample("lbsim_dns_queries_total", {"outcome": "nxdomain"}) == 1
        await service.close()  # idempotent
        assert open_sockets() == before
        generation = service.generation
        await asyncio.sleep(CONFIG.planner_interval_s * 2 / SPEED)
        assert service.generation == generation  # nothing runs after close
        with pytest.raises(RuntimeError, match="closed"):
            await service.start()

    run_on(loop, body)


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_delayed_enactor_empties_the_record_until_an_operator_restores_it(loop: str) -> None:
    async def body() -> None:
        registry = CollectorRegistry()
        service, recorder, _ = make(registry=registry)
        async with service:
            await run_until(service, 3)
            service.delay_enactor("a", RACE_DELAY, endpoint=KEY)
            await wait_for(lambda: service.record(KEY) == [], within=3.0)
            landed = recorder.first("delayed-write-landed")
            emptied = recorder.first("emptied")
            assert landed["enactor"] == "a" and landed["endpoint"] == KEY and landed["outcome"] == "applied"
            assert landed["before_cleanup_of"] == emptied["by"] != "a"  # a fast enactor's clean-up did it
            assert emptied["endpoint"] == KEY and emptied["generation"] == landed["generation"]
            assert service.generation - landed["generation"] > CONFIG.keep_generations
            # A real resolver sees the empty record: NOERROR, no addresses.
            rcode, addresses, _ = await query(service, KEY)
            assert (rcode, addresses) == (dns.rcode.NOERROR, [])
            with pytest.raises(dns.resolver.NoAnswer):
                await resolver_for(service).resolve(KEY, "A")
            # Stuck: new plans keep coming, none is applied, the record stays empty.
            applied, generation = service.applied_generation, service.generation
            await run_until(service, generation + 3)
            assert service.record(KEY) == [] and service.inconsistent
            assert service.applied_generation == applied
            assert "refused-inconsistent" in recorder.kinds()
            assert service.records_emptied == 1
            assert registry.get_sample_value("lbsim_dns_inconsistent") == 1
            assert registry.get_sample_value("lbsim_dns_record_addresses", {"endpoint": KEY}) == 0
            assert registry.get_sample_value("lbsim_dns_records_emptied_total") == 1
            # The operator's repair: the newest plan everywhere, and the enactors back at work.
            restored = service.restore()
            assert restored is not None and restored.generation == service.generation
            assert service.record(KEY) == ["10.0.0.1", "10.0.0.2"] and not service.inconsistent
            assert (await query(service, KEY))[1] == ["10.0.0.1", "10.0.0.2"]
            await wait_for(lambda: service.applied_generation > restored.generation)
            assert service.record(KEY) == ["10.0.0.1", "10.0.0.2"] and service.records_emptied == 1
            assert recorder.kinds().count("restored") == 1

    run_on(loop, body)


@pytest.mark.parametrize("name", ["cas", "keep_active", "guard"])
async def test_each_protection_keeps_the_record_served_through_the_same_delay(name: str) -> None:
    service, recorder, _ = make(Protections(**{name: True}))
    async with service:
        await run_until(service, 3)
        service.delay_enactor("a", RACE_DELAY, endpoint=KEY)
        await wait_for(lambda: "delayed-write-landed" in recorder.kinds(), within=3.0)
        landed = recorder.first("delayed-write-landed")
        await run_until(service, service.generation + 2)  # later clean-ups have run too
        assert "emptied" not in recorder.kinds() and service.records_emptied == 0
        assert (await query(service, KEY))[:2] == (dns.rcode.NOERROR, ["10.0.0.1", "10.0.0.2"])
        if name == "cas":
            assert landed["outcome"] == "skipped-stale" and not service.inconsistent
        elif name == "keep_active":
            assert landed["outcome"] == "applied" and not service.inconsistent
            assert service.applied_generation >= landed["generation"] + CONFIG.keep_generations
        else:
            # The guard saves the data plane only: the plan is gone and the automation is stuck.
            assert "guard-kept" in recorder.kinds() and service.inconsistent
            assert service.record(KEY) == ["10.0.0.1", "10.0.0.2"]


async def test_a_delay_shorter_than_the_clean_up_horizon_leaves_no_empty_record() -> None:
    service, recorder, _ = make()
    async with service:
        await run_until(service, 3)
        service.delay_enactor("a", CONFIG.planner_interval_s, endpoint=KEY)
        await wait_for(lambda: "delayed-write-landed" in recorder.kinds(), within=3.0)
        assert recorder.first("delayed-write-landed")["outcome"] == "applied"  # stale, but its plan is kept
        await run_until(service, service.generation + 2)
        assert "emptied" not in recorder.kinds() and not service.inconsistent
        assert service.record(KEY) == ["10.0.0.1", "10.0.0.2"]


async def test_failed_writes_are_retried_and_the_records_follow_the_desired_capacity() -> None:
    service, recorder, _ = make()
    async with service:
        await run_until(service, 2)
        service.fail_writes("a", 2)
        service.set_records(KEY, {"10.0.0.7": 1})
        await wait_for(lambda: service.writes["a", WriteOutcome.RETRY] == 2)
        await wait_for(lambda: service.record(KEY) == ["10.0.0.7"])
        assert (await query(service, KEY))[1] == ["10.0.0.7"]
        await run_until(service, service.generation + 2)
        assert service.writes["a", WriteOutcome.RETRY] == 2  # only the injected failures
        assert not service.inconsistent
        assert {"fail-injected", "set-records"} <= set(recorder.kinds())


async def test_paused_automation_plans_and_applies_nothing_until_resumed() -> None:
    service, recorder, clock = make()
    async with service:
        await run_until(service, 2)
        service.pause()
        service.pause()  # idempotent
        generation = service.generation
        service.set_records(KEY, {"10.0.0.8": 1})
        await clock.sleep(CONFIG.planner_interval_s * 3)
        assert service.generation == generation and service.paused
        assert service.record(KEY) == ["10.0.0.1", "10.0.0.2"]  # still served, just not updated
        service.resume()
        await wait_for(lambda: service.record(KEY) == ["10.0.0.8"])
        assert service.generation > generation
        assert recorder.kinds().count("paused") == 1 and recorder.kinds().count("resumed") == 1


def test_emergent_mode_on_loopback_empties_the_record_where_the_virtual_clock_run_does() -> None:
    # RACING_SEED: the pure core on a virtual clock (tests/test_controlplane_dnsautomation.py) empties a record
    # at t = 31.7 with these endpoints; the service drives the same core on a scaled clock, so it must too.
    racing_seed, speed = 68, 10.0  # at 10x a poll is 100 ms of wall time: loop lag cannot reorder the steps
    config = DnsServiceConfig(race=RaceConfig(mode=RaceMode.EMERGENT))
    virtual = DnsAutomation(config.automation(), ENDPOINTS, 0.0, random.Random(racing_seed))
    virtual.run_until(100.0)
    assert virtual.first_emptied_at is not None
    emptied_at = virtual.first_emptied_at
    emptied = next(e for e in virtual.store.events if e.kind == "emptied")
    endpoint = emptied.endpoint
    assert endpoint is not None

    async def body() -> None:
        recorder = Recorder()
        clock = ScaledClock(speed)
        service = DnsService(clock, config, ENDPOINTS, on_event=recorder, rng=random.Random(racing_seed))
        t0 = service.automation.t0
        async with service:
            bound = (emptied_at + 2 * config.planner_interval_s) / speed + 1.0
            await wait_for(lambda: service.records_emptied > 0, within=bound)
            real = recorder.first("emptied")
            assert (real["endpoint"], real["generation"]) == (emptied.endpoint, emptied.generation)
            assert real["at"] - t0 == pytest.approx(emptied_at, abs=1e-6)  # transitions run at their due times
            assert any(f["drawn"] and f["generation"] == emptied.generation
                       for k, f in recorder.events if k == "delayed-write-landed")
            assert service.inconsistent and service.record(endpoint) == []
            rcode, addresses, _ = await query(service, endpoint)
            assert (rcode, addresses) == (dns.rcode.NOERROR, [])  # a real resolver sees the empty record

    asyncio.run(body())
