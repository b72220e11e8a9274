"""The host manager (DWFM): lease decay, placement, the recovery queue's congestive collapse and its two cures.

Pure-core tests step the core with a fake `now`; shell tests run the manager on a ScaledClock against an
in-test lease store that sleeps its latency in sim time and can be switched down (answers "unresolvable" at
once, as with the empty DNS record).
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from support import LOOPS, open_sockets, run_on, wait_for

from backends.controlplane.hostmanager import (
    DEFAULT_HARD_CAP,
    HostLeases,
    HostManager,
    HostManagerConfig,
    LeaseApi,
    LeaseState,
    Offer,
    Placement,
    RecoveryQueue,
)
from worlds.base import Clock
from worlds.clock import ManualClock, ScaledClock

# -- pure core: leases


def drive_renewals(leases: HostLeases, start: float, end: float, ok: bool, dt: float = 0.5) -> dict[str, float]:
    """Step from start to end: answer every due renewal with `ok`, expire lapsed leases; return expiry times."""
    lapsed: dict[str, float] = {}
    now = start
    while now <= end:
        for host in leases.due(now):
            leases.renewing(host)
            leases.renewed(host, now, ok)
        for host in leases.expire(now):
            lapsed[host] = now
        now += dt
    return lapsed


def test_renewals_are_staggered_evenly_over_the_interval() -> None:
    leases = HostLeases(10, lease_ttl_s=300, renew_interval_s=60, now=100.0)
    assert leases.hosts[:2] == ("h000", "h001") and len(leases.hosts) == 10
    assert leases.due(100.0) == ["h000"]
    assert leases.due(100.0 + 6 * 3 + 0.1) == ["h000", "h001", "h002", "h003"]
    assert len(leases.due(100.0 + 60)) == 10
    leases.renewing("h000")
    assert "h000" not in leases.due(200.0)  # in flight: not handed out twice
    leases.renewed("h000", 101.0, ok=True)
    assert leases.expiry("h000") == 101.0 + leases.ttl("h000")
    assert "h000" not in leases.due(160.9) and "h000" in leases.due(161.0)


def test_a_failed_renewal_keeps_the_expiry_and_retries_sooner() -> None:
    leases = HostLeases(4, lease_ttl_s=100, renew_interval_s=40, now=0.0)
    expiry = leases.expiry("h001")
    leases.renewing("h001")
    assert leases.renewed("h001", 10.0, ok=False)
    assert leases.expiry("h001") == expiry
    assert leases.next_due() == 0.0  # h000 still due at 0
    assert "h001" not in leases.due(19.9) and "h001" in leases.due(20.0)  # retry after 40 / 4


def test_leases_expire_gradually_over_the_ttl_spread() -> None:
    hosts, ttl, interval, spread = 200, 300.0, 60.0, 0.5
    leases = HostLeases(hosts, ttl, interval, ttl_spread=spread)
    ttls = sorted(leases.ttl(h) for h in leases.hosts)
    assert ttls[0] >= ttl * (1 - spread) and ttls[-1] == ttl
    assert ttls[hosts // 2] == pytest.approx(ttl * (1 - spread / 2), rel=0.02)  # spread evenly
    assert not drive_renewals(leases, 0.0, 600.0, ok=True)  # steady state: nothing lapses
    stop = 600.5
    lapsed = drive_renewals(leases, stop, stop + ttl + 10, ok=False)
    assert len(lapsed) == hosts
    times = sorted(lapsed.values())
    # Each host's last success was within one interval before `stop`, so its lease lapses within
    # (stop - interval + its TTL, stop + its TTL].
    assert times[0] >= stop + ttl * (1 - spread) - interval
    assert times[-1] <= stop + ttl + 0.5
    assert times[-1] - times[0] >= spread * ttl - interval
    per_10s = collections.Counter(int(t // 10) for t in times)
    assert max(per_10s.values()) <= 2 * hosts * 10 / (spread * ttl)  # no cliff
    assert leases.counts(stop + ttl + 10) == {"leased": 0, "expired": hosts, "recovering": 0}


def test_without_spread_the_whole_fleet_lapses_within_one_interval() -> None:
    leases = HostLeases(50, 300.0, 60.0, ttl_spread=0.0)
    lapsed = drive_renewals(leases, 0.0, 1000.0, ok=False)
    assert max(lapsed.values()) - min(lapsed.values()) <= 60.0


def test_counts_treat_a_lapsed_lease_as_expired_before_expire_is_called() -> None:
    leases = HostLeases(2, 100.0, 50.0)
    late = leases.expiry("h001") + 1
    assert leases.counts(late) == {"leased": 0, "expired": 2, "recovering": 0}
    assert leases.expire(late) == ["h000", "h001"]
    leases.mark_recovering("h000")
    leases.established("h001", late)
    assert leases.counts(late) == {"leased": 1, "expired": 0, "recovering": 1}
    assert not leases.renewed("h000", late, ok=True)  # a late renewal answer does not revive a lapsed lease
    assert leases.state("h000") == LeaseState.RECOVERING
    assert leases.mark_expired("h001") and not leases.mark_expired("h000")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"hosts": 0}, "hosts"),
        ({"lease_ttl_s": 0}, "lease_ttl_s"),
        ({"renew_interval_s": -1}, "renew_interval_s"),
        ({"ttl_spread": 1.0}, "ttl_spread"),
        ({"renew_interval_s": 200}, "renew_interval_s"),  # longer than the shortest lease
    ],
)
def test_lease_table_validates(kwargs: dict[str, float], field: str) -> None:
    args: dict[str, Any] = {"hosts": 4, "lease_ttl_s": 300.0, "renew_interval_s": 60.0, "ttl_spread": 0.5}
    with pytest.raises(ValueError, match=field):
        HostLeases(**(args | kwargs))


# -- pure core: placement


def test_placement_fills_least_loaded_leased_hosts_and_refuses_on_expired_ones() -> None:
    leases = HostLeases(3, 100.0, 50.0)
    placement = Placement(leases, slots_per_host=2)
    assert [placement.place(f"i{n}", 0.0) for n in range(3)] == ["h000", "h001", "h002"]
    assert placement.free_slots(0.0) == 3
    late = max(leases.expiry(h) for h in leases.hosts) + 1
    leases.established("h002", late)  # only h002 recovered
    assert placement.place("i3", late) == "h002"
    assert placement.place("i4", late) is None  # h002 full, h000/h001 idle but unleased
    assert placement.insufficient == 1 and placement.placed == 4
    assert placement.host_of("i0") == "h000"  # running instances are unaffected by the lapse
    assert placement.release("i3") == "h002"
    assert placement.place("i5", late) == "h002"
    with pytest.raises(ValueError, match="placed already"):
        placement.place("i5", late)


# -- pure core: recovery queue


class QueueSim:
    """Steps a RecoveryQueue with a fake clock the way the shell drives it: workers take items, an item ends
    after its service time plus the store latency, or times out at its deadline; hosts the queue turned away
    or failed are offered again later."""

    def __init__(self, q: RecoveryQueue, latency: float = 0.0, retry_s: float = 5.0, dt: float = 0.1) -> None:
        self.q, self.latency, self.retry_s, self.dt = q, latency, retry_s, dt
        self.now = 0.0
        self.to_offer: dict[str, float] = {}
        self.running: dict[str, tuple[float, float]] = {}  # host -> (done at, deadline)
        self.recovered: dict[str, float] = {}
        self.depths: list[int] = []

    def offer_all(self, hosts: list[str], at: float) -> None:
        for h in hosts:
            self.to_offer[h] = at

    def flush(self) -> list[str]:
        hosts = self.q.flush(self.now)
        self.running.clear()
        self.offer_all(hosts, self.now + self.retry_s)
        return hosts

    def run_until(self, end: float) -> None:
        while self.now < end:
            self._offer()
            while (item := self.q.start(self.now)) is not None:
                host, service = item
                self.running[host] = (self.now + service + self.latency, self.now + self.q.item_timeout_s)
            for host, (done_at, deadline) in list(self.running.items()):
                if done_at <= deadline and done_at <= self.now:
                    del self.running[host]
                    assert self.q.finish(host, self.now, ok=True)
                    self.recovered[host] = self.now
                elif done_at > deadline and deadline <= self.now:
                    del self.running[host]
                    assert self.q.timed_out(host, self.now)
            self.depths.append(self.q.depth)
            self.now = round(self.now + self.dt, 6)

    def _offer(self) -> None:
        for t, host in sorted((t, h) for h, t in self.to_offer.items() if t <= self.now):
            outcome = self.q.offer(host, self.now)
            if outcome == Offer.REJECTED_THROTTLE:
                return
            if outcome in (Offer.REJECTED_DEPTH, Offer.DROPPED):
                self.to_offer[host] = self.now + self.retry_s
                continue
            assert outcome == Offer.ACCEPTED, (t, outcome)
            del self.to_offer[host]


HOSTS = [f"h{i:03d}" for i in range(100)]


def queue(max_depth: int | None = None, hard_cap: int = DEFAULT_HARD_CAP) -> RecoveryQueue:
    return RecoveryQueue(
        workers=4, item_timeout_s=10.0, base_service_s=1.0, per_depth_s=0.5, max_depth=max_depth, hard_cap=hard_cap
    )


def test_queue_is_fifo_with_duplicates_and_depth_dependent_service() -> None:
    q = RecoveryQueue(workers=2, item_timeout_s=10.0, base_service_s=1.0, per_depth_s=0.5)
    assert [q.offer(h, 0.0) for h in ("a", "b", "c", "a")] == ["accepted"] * 3 + ["duplicate"]
    assert q.start(0.0) == ("a", 2.5)  # depth 3 at start
    assert q.start(0.0) == ("b", 2.5)
    assert q.start(0.0) is None  # both workers busy
    assert q.offer("b", 0.0) == Offer.DUPLICATE  # in progress counts too
    assert q.timed_out("a", 10.0) and q.finish("b", 3.0, ok=True)
    assert q.start(10.0) == ("c", 2.0) and q.start(10.0) == ("a", 2.0)  # a went to the tail
    assert (q.goodput, q.timeouts, q.depth) == (1, 1, 2)
    assert q.flush(11.0) == ["c", "a"] and q.depth == 0
    assert not q.finish("c", 12.0, ok=True) and not q.timed_out("a", 12.0)  # flushed meanwhile: ignored
    assert q.collapse_depth() == 18.0 and q.collapse_depth(latency_s=1.0) == 16.0


def test_admission_control_rejects_above_max_depth_and_the_throttle_is_a_token_bucket() -> None:
    q = queue(2)
    assert [q.offer(h, 0.0) for h in "abc"] == ["accepted", "accepted", "rejected-depth"]
    q.set_max_depth(None)
    q.set_throttle(0.5)
    assert q.offer("c", 0.0) == Offer.ACCEPTED  # the bucket starts with one token
    assert q.offer("d", 0.0) == Offer.REJECTED_THROTTLE
    assert q.next_admission(0.0) == pytest.approx(2.0)
    assert q.offer("d", 1.9) == Offer.REJECTED_THROTTLE and q.offer("d", 2.0) == Offer.ACCEPTED
    assert q.offer("e", 100.0) == Offer.ACCEPTED and q.offer("f", 100.0) == Offer.REJECTED_THROTTLE  # burst of 1
    assert q.rejected == {"depth": 1, "throttle": 3}
    with pytest.raises(ValueError, match="max_depth"):
        q.set_max_depth(0)
    with pytest.raises(ValueError, match="throttle_per_s"):
        q.set_throttle(0)


def test_the_queue_collapses_with_the_whole_fleet_expired() -> None:
    q = queue()
    assert len(HOSTS) > q.collapse_depth()
    sim = QueueSim(q)
    sim.offer_all(HOSTS, 0.0)
    sim.run_until(300.0)  # 30 item timeouts
    assert q.goodput == 0
    assert q.timeouts >= q.workers * (300.0 / q.item_timeout_s - 1)
    assert min(sim.depths) == len(HOSTS) and q.depth == len(HOSTS)
    assert q.last_service_s == 1.0 + 0.5 * len(HOSTS)


def test_below_the_collapse_depth_the_same_queue_drains() -> None:
    q = queue()
    small = HOSTS[: math.floor(q.collapse_depth(latency_s=0.5))]
    sim = QueueSim(q, latency=0.5)
    sim.offer_all(small, 0.0)
    sim.run_until(200.0)
    assert q.timeouts == 0 and len(sim.recovered) == len(small)


def test_admission_control_keeps_the_queue_out_of_collapse() -> None:
    max_depth, retry_s = 10, 5.0
    q = queue(max_depth)
    max_service = q.base_service_s + q.per_depth_s * max_depth
    assert max_service < q.item_timeout_s
    sim = QueueSim(q, retry_s=retry_s)
    sim.offer_all(HOSTS, 0.0)
    # Each round admits at most max_depth hosts, drains them in ceil(max_depth / workers) services, and the
    # rest retry every retry_s.
    bound = math.ceil(len(HOSTS) / max_depth) * (retry_s + math.ceil(max_depth / q.workers) * max_service)
    sim.run_until(bound)
    assert q.timeouts == 0 and max(sim.depths) <= max_depth
    assert len(sim.recovered) == len(HOSTS) and q.goodput == len(HOSTS)
    assert q.rejected["depth"] > 0


def test_flush_alone_collapses_again_but_flush_and_throttle_recover_every_host() -> None:
    q = queue()
    sim = QueueSim(q)
    sim.offer_all(HOSTS, 0.0)
    sim.run_until(100.0)
    assert q.goodput == 0
    assert len(sim.flush()) == len(HOSTS) and q.depth == 0
    sim.run_until(200.0)  # every host offered again at once: back to the same state
    assert q.goodput == 0 and q.depth == len(HOSTS)

    rate = 0.5
    sim.flush()
    q.set_throttle(rate)
    flushed_at, timeouts = sim.now, q.timeouts
    # Hosts come back at the throttle's rate after the retry delay; the last one needs less than a timeout.
    bound = sim.retry_s + len(HOSTS) / rate + q.item_timeout_s
    sim.run_until(flushed_at + bound)
    assert len(sim.recovered) == len(HOSTS)
    assert max(sim.recovered.values()) <= flushed_at + bound
    assert q.timeouts == timeouts  # no work wasted after the restart
    assert max(sim.depths[int(100.0 / sim.dt) * 2 :]) < q.collapse_depth()


# -- pure core: the hard cap (a memory bound, apart from the modelled admission control)


def test_hard_cap_drops_new_items_and_the_depth_never_exceeds_it() -> None:
    q = RecoveryQueue(workers=2, item_timeout_s=10.0, base_service_s=1.0, per_depth_s=0.5, hard_cap=3)
    assert [q.offer(h, 0.0) for h in "abcde"] == ["accepted"] * 3 + ["dropped"] * 2
    assert q.offer("a", 0.0) == Offer.DUPLICATE  # a duplicate is not new work
    assert (q.depth, q.dropped, q.accepted, q.rejected) == (3, 2, 3, {"depth": 0, "throttle": 0})
    assert q.start(0.0) == ("a", 2.5) and q.start(0.0) == ("b", 2.5)
    assert q.offer("d", 1.0) == Offer.DROPPED  # in progress counts towards the depth
    assert q.timed_out("a", 10.0) and q.depth == 3  # re-queued at the tail: the depth does not grow
    assert q.offer("d", 10.0) == Offer.DROPPED
    assert q.finish("b", 10.0, ok=True) and q.depth == 2
    assert q.offer("d", 10.0) == Offer.ACCEPTED and q.depth == 3  # room again
    assert q.dropped == 4
    with pytest.raises(ValueError, match="hard_cap"):
        RecoveryQueue(workers=1, item_timeout_s=1.0, base_service_s=0.0, per_depth_s=0.0, hard_cap=0)


def test_admission_control_takes_precedence_and_a_dropped_item_spends_no_token() -> None:
    q = queue(max_depth=2, hard_cap=2)
    assert [q.offer(h, 0.0) for h in "abc"] == ["accepted", "accepted", "rejected-depth"]
    assert q.dropped == 0  # the modelled mitigation is what the run reports when both apply
    q = queue(hard_cap=1)
    q.set_throttle(1.0)
    assert q.offer("a", 0.0) == Offer.ACCEPTED
    assert q.offer("b", 5.0) == Offer.DROPPED  # the bucket refilled, and keeps its token
    assert q.start(5.0) is not None and q.finish("a", 5.0, ok=True)
    assert q.offer("b", 5.0) == Offer.ACCEPTED and q.rejected["throttle"] == 0


def test_the_collapse_still_reproduces_under_a_hard_cap_above_its_depth() -> None:
    cap = 30
    q = queue(hard_cap=cap)
    assert q.collapse_depth() < cap < len(HOSTS)
    sim = QueueSim(q)
    sim.offer_all(HOSTS, 0.0)
    sim.run_until(300.0)
    assert q.goodput == 0 and q.timeouts > 0  # still the congestive collapse
    assert max(sim.depths) == cap and min(sim.depths[1:]) == cap
    assert q.dropped > 0


def test_below_the_hard_cap_nothing_changes() -> None:
    runs = []
    for cap in (DEFAULT_HARD_CAP, len(HOSTS)):
        q = queue(hard_cap=cap)
        sim = QueueSim(q)
        sim.offer_all(HOSTS, 0.0)
        sim.run_until(100.0)
        sim.flush()
        q.set_throttle(0.5)
        sim.run_until(400.0)
        runs.append((sim.depths, sim.recovered, q.goodput, q.timeouts, q.dropped))
    assert runs[0] == runs[1]
    assert runs[0][4] == 0 and len(runs[0][1]) == len(HOSTS)


# -- shell


@dataclass(frozen=True, slots=True)
class Result:
    ok: bool
    outcome: str
    latency_s: float


class FakeLeaseStore:
    """A lease store on the sim clock. Down: every call answers "unresolvable" at once (empty DNS record)."""

    def __init__(self, clock: Clock, latency_s: float = 0.05) -> None:
        self.clock, self.latency_s = clock, latency_s
        self.up = True
        self.expiry: dict[str, float] = {}
        self.calls: collections.Counter[str] = collections.Counter()

    async def acquire_lease(self, key: str, ttl_s: float) -> Result:
        self.calls["acquire"] += 1
        if not self.up:
            return Result(False, "unresolvable", 0.0)
        await self.clock.sleep(self.latency_s)
        self.expiry[key] = self.clock.now() + ttl_s
        return Result(True, "ok", self.latency_s)

    async def renew_lease(self, key: str, ttl_s: float) -> Result:
        self.calls["renew"] += 1
        if not self.up:
            return Result(False, "unresolvable", 0.0)
        await self.clock.sleep(self.latency_s)
        now = self.clock.now()
        if self.expiry.get(key, -math.inf) <= now:
            return Result(False, "not_found", self.latency_s)
        self.expiry[key] = now + ttl_s
        return Result(True, "ok", self.latency_s)


SPEED = 100.0
TOL = 2.0  # sim seconds: scheduling lag at SPEED plus the 5 ms polling of wait_for
CFG = HostManagerConfig(
    hosts=40,
    lease_ttl_s=30.0,
    renew_interval_s=10.0,
    ttl_spread=0.5,
    renew_concurrency=8,
    workers=4,
    item_timeout_s=10.0,
    base_service_s=1.0,
    per_depth_s=0.5,
    retry_s=5.0,
    slots_per_host=2,
)


def wall(sim_s: float) -> float:
    return sim_s / SPEED + 0.5


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        self.events.append((kind, data))

    def at(self, kind: str) -> float | None:
        return next((d["at"] for k, d in self.events if k == kind), None)

    def seen(self, kind: str) -> bool:
        return self.at(kind) is not None


async def outage(m: HostManager, store: FakeLeaseStore, clock: ScaledClock, rec: Recorder) -> None:
    """Every lease put, then the store goes down: check the leases lapse gradually and launches fail."""
    cfg = m.config
    await wait_for(lambda: m.renewals["ok"] >= cfg.hosts, within=wall(2 * cfg.renew_interval_s))
    assert len(store.expiry) == cfg.hosts  # the first renewal of each host was a put
    assert m.place("i-old") is not None
    down_at = clock.now()
    store.up = False
    min_ttl, max_ttl = cfg.lease_ttl_s * (1 - cfg.ttl_spread), cfg.lease_ttl_s
    await wait_for(lambda: rec.seen("all_leases_expired"), within=wall(max_ttl + cfg.renew_interval_s))
    first, last = rec.at("first_lease_expired"), rec.at("all_leases_expired")
    assert first is not None and last is not None
    # A lease renewed up to one interval before the outage lapses no sooner than min TTL after that renewal.
    assert first >= down_at + min_ttl - cfg.renew_interval_s - TOL
    assert last <= down_at + max_ttl + TOL
    assert last - first >= cfg.ttl_spread * cfg.lease_ttl_s - cfg.renew_interval_s - TOL  # gradual
    assert m.place("i-new") is None  # insufficient capacity on idle hardware
    assert m.placement.host_of("i-old") is not None
    assert m.renewals["unresolvable"] > 0


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_store_outage_collapse_then_restart_and_throttle_recover_every_lease(loop: str) -> None:
    async def body() -> None:
        before = open_sockets()
        clock = ScaledClock(speed=SPEED)
        store, rec, registry = FakeLeaseStore(clock), Recorder(), CollectorRegistry()
        async with HostManager(clock, store, CFG, registry, on_event=rec) as m:
            await outage(m, store, clock, rec)
            collapse_depth = m.recovery.collapse_depth(store.latency_s)
            assert CFG.hosts > collapse_depth
            # With every item timing out, the expired hosts pile into the queue while the store is still down.
            await wait_for(lambda: m.queue_depth == CFG.hosts, within=wall(4 * CFG.item_timeout_s))
            store.up = True
            up_at, timeouts = clock.now(), m.timeouts_total
            window = 6 * CFG.item_timeout_s
            min_depth = m.queue_depth
            while clock.now() < up_at + window:  # observe: the trigger is gone, the collapse stays
                min_depth = min(min_depth, m.queue_depth)
                await clock.sleep(CFG.item_timeout_s / 10)
            assert m.goodput_total == 0
            assert min_depth > collapse_depth
            assert m.timeouts_total - timeouts >= CFG.workers * (window / CFG.item_timeout_s - 1)
            assert rec.seen("collapse_suspected")
            assert m.counts()["leased"] == 0

            rate = 1.0
            m.throttle(rate)
            assert len(m.restart()) == CFG.hosts
            assert m.queue_depth == 0 and m.counts()["expired"] == CFG.hosts
            restart_at, timeouts = clock.now(), m.timeouts_total
            bound = CFG.retry_s + CFG.hosts / rate + CFG.item_timeout_s + TOL
            await wait_for(lambda: rec.seen("all_leases_back"), within=wall(bound))
            back = rec.at("all_leases_back")
            assert back is not None and back - restart_at <= bound
            assert m.counts() == {"leased": CFG.hosts, "expired": 0, "recovering": 0}
            assert m.goodput_total == CFG.hosts and m.timeouts_total == timeouts
            assert m.place("i-new") is not None

            kinds = [k for k, _ in rec.events]
            assert kinds.index("first_lease_expired") < kinds.index("collapse_suspected") < kinds.index("restart")
            value = registry.get_sample_value
            assert value("lbsim_host_leases", {"state": "leased"}) == CFG.hosts
            assert value("lbsim_host_recovery_goodput_total") == CFG.hosts
            assert value("lbsim_host_recovery_timeouts_total") == m.timeouts_total > 0
            throttled = m.recovery.rejected["throttle"]
            assert value("lbsim_host_recovery_rejected_total", {"reason": "throttle"}) == throttled > 0
            assert value("lbsim_host_lease_renewals_total", {"outcome": "unresolvable"}) == m.renewals["unresolvable"]
            assert value("lbsim_host_placements_total", {"outcome": "insufficient_capacity"}) == 1
            assert value("lbsim_host_placements_total", {"outcome": "placed"}) == 2
            assert value("lbsim_host_recovery_queue_depth") == 0
            assert (value("lbsim_host_recovery_service_seconds") or 0) >= CFG.base_service_s
        assert open_sockets() == before

    run_on(loop, body)


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_admission_control_alone_avoids_the_collapse(loop: str) -> None:
    max_depth = 8

    async def body() -> None:
        clock = ScaledClock(speed=SPEED)
        store, rec = FakeLeaseStore(clock), Recorder()
        cfg = CFG.model_validate({**dict(CFG), "max_depth": max_depth})
        async with HostManager(clock, store, cfg, on_event=rec) as m:
            assert max_depth < m.recovery.collapse_depth(store.latency_s)
            await outage(m, store, clock, rec)
            store.up = True
            up_at = clock.now()
            max_service = cfg.base_service_s + cfg.per_depth_s * max_depth + store.latency_s
            rounds = math.ceil(cfg.hosts / max_depth)
            bound = rounds * (cfg.retry_s + math.ceil(max_depth / cfg.workers) * max_service) + TOL
            await wait_for(lambda: rec.seen("all_leases_back"), within=wall(bound))
            back = rec.at("all_leases_back")
            assert back is not None and back - up_at <= bound
            assert m.timeouts_total == 0 and not rec.seen("collapse_suspected")
            assert m.recovery.rejected["depth"] > 0
            assert m.counts()["leased"] == cfg.hosts

    run_on(loop, body)


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_lease_the_store_forgot_is_recovered_through_the_queue(loop: str) -> None:
    async def body() -> None:
        clock = ScaledClock(speed=SPEED)
        store = FakeLeaseStore(clock)
        cfg = CFG.model_validate({**dict(CFG), "hosts": 4})
        api: LeaseApi = store
        async with HostManager(clock, api, cfg) as m:
            await wait_for(lambda: m.renewals["ok"] >= cfg.hosts, within=wall(2 * cfg.renew_interval_s))
            acquires = store.calls["acquire"]
            del store.expiry[f"{cfg.key_prefix}h002"]
            await wait_for(lambda: m.renewals["not_found"] == 1, within=wall(2 * cfg.renew_interval_s))
            await wait_for(lambda: m.goodput_total == 1, within=wall(cfg.retry_s + cfg.item_timeout_s))
            assert m.lease_table.state("h002") == LeaseState.LEASED
            assert f"{cfg.key_prefix}h002" in store.expiry and store.calls["acquire"] == acquires + 1
            assert m.counts()["leased"] == cfg.hosts
        await m.close()  # idempotent

    run_on(loop, body)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"hosts": 0}, "hosts"),
        ({"workers": 0}, "workers"),
        ({"item_timeout_s": 0.0}, "item_timeout_s"),
        ({"retry_s": -1.0}, "retry_s"),
        ({"per_depth_s": -0.5}, "per_depth_s"),
        ({"max_depth": 0}, "max_depth"),
        ({"throttle_per_s": 0.0}, "throttle_per_s"),
        ({"ttl_spread": 1.5}, "ttl_spread"),
        ({"renew_interval_s": 200.0}, "renew_interval_s"),
        ({"key_prefix": ""}, "key_prefix"),
        ({"hard_cap": 0}, "hard_cap"),
    ],
)
def test_config_validation_names_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        HostManagerConfig(**change)


def test_the_shell_offers_a_dropped_host_again_later_and_counts_the_drop() -> None:
    clock = ManualClock()
    registry = CollectorRegistry()
    cfg = CFG.model_validate({**dict(CFG), "hosts": 10, "hard_cap": 4})
    m = HostManager(clock, FakeLeaseStore(clock), cfg, registry)
    clock.set(max(m.lease_table.expiry(h) for h in m.lease_table.hosts) + 1.0)  # every lease lapsed

    def sample(name: str) -> float | None:
        return registry.get_sample_value(name)

    m._step(clock.now())  # expire and offer, as the scheduler task would
    assert m.counts() == {"leased": 0, "expired": 6, "recovering": 4}
    assert m.queue_depth == 4 and m.recovery.dropped == 1  # the rest wait: no room until items leave
    assert sample("lbsim_host_recovery_dropped_total") == 1 and sample("lbsim_host_recovery_queue_depth") == 4
    clock.advance(cfg.retry_s)
    m._step(clock.now())
    assert m.queue_depth == 4 and m.recovery.dropped == 2
    item = m.recovery.start(clock.now())  # one item done: room for one more
    assert item is not None
    m._finished(item[0], clock.now(), Result(True, "ok", 0.0))
    clock.advance(cfg.retry_s)
    m._step(clock.now())
    assert m.counts() == {"leased": 1, "expired": 5, "recovering": 4} and m.queue_depth == 4
    assert sample("lbsim_host_recovery_dropped_total") == 3
