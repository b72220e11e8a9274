"""The host manager (EC2's DropletWorkflow Manager): per-host leases kept through the lease store, their gradual
expiry while the store is unreachable, and the recovery work queue that falls into congestive collapse.

The AWS mechanism (docs/sources.md#aws-summary): DWFM keeps a lease on every droplet (physical host) and
renews it every few minutes through a state check that depends on DynamoDB. With DynamoDB unresolvable from
23:48, renewals failed and leases lapsed one by one over ~2.5 h; a host without a lease takes no new launches
("insufficient capacity") while its running instances carry on. When DynamoDB came back at 02:25, DWFM tried to
re-establish every lease at once: the work took longer than its timeout, each timeout queued the work again, and
DWFM made no progress (congestive collapse) until operators throttled intake and restarted DWFM hosts (04:14),
which flushed the queues; all leases were back at 05:28.

Rules of this model:
1. `HostLeases`: hosts "h000", "h001", ... all start leased. Host i is first due for renewal at
   now + i/hosts * renew_interval (renewals are staggered evenly) and holds a lease as if renewed one interval
   before that. Host i's TTL is lease_ttl * (1 - ttl_spread * f_i), f_i = frac(i * golden ratio): spread over
   [lease_ttl * (1 - ttl_spread), lease_ttl], deterministically and uncorrelated with the renewal phase, so that
   when renewals stop the fleet's leases lapse gradually over about ttl_spread * lease_ttl + renew_interval.
2. A successful renewal moves the host's expiry to now + its TTL and its next renewal to now + renew_interval;
   a failed one leaves the expiry alone and retries after retry_s. A renewal answered "not_found" means the store
   forgot the lease: the caller treats the host as expired (`mark_expired`). A host whose expiry has passed is
   expired (`expire`); from then on only the recovery queue brings it back (`established`).
3. `Placement`: `slots_per_host` instances per host; a new instance goes to the least-loaded host holding a
   lease (ties by host id), or nowhere ("insufficient capacity"). Instances already placed on a host whose lease
   lapses keep running: only new placements need a leased host.
4. `RecoveryQueue`: re-establishing one expired host's lease is one work item, FIFO, with `workers` items in
   progress at most. Admission (`offer`): an item already queued or in progress is a duplicate; with `max_depth`
   an item that would make the depth exceed it is rejected (AWS remediation 4: rate-limit intake by queue size);
   with `throttle_per_s` intake is a token bucket (burst max(1, rate)) and an item without a token is rejected
   (the operators' 04:14 throttle). Depth = queued + in progress. Separately from that modelled admission
   control, `hard_cap` is a safety bound on memory, not part of the model: an item that would take the depth
   past it is dropped (`Offer.DROPPED`, counted in `dropped`) and the caller offers the host again later. A
   timed-out item goes back to the queue without changing the depth, so the depth never exceeds the cap.
5. An item started at depth d is modelled to take base_service_s + per_depth_s * d (the state-check work grows
   with the backlog, as DWFM's did), then a store round trip. An item not done by item_timeout_s after its start
   is abandoned and RE-QUEUED at the tail: its work is wasted. A failed item (store unreachable) leaves the
   queue; the caller offers it again later.
6. Collapse condition: once base_service_s + per_depth_s * depth + store latency > item_timeout_s, no item can
   finish; every one times out and is re-queued, so the depth never falls, goodput is 0 and the queue stays
   full for as long as nothing changes (a metastable state: the trigger, the store outage, is long gone). The
   depth the fleet produces is about the number of expired hosts, so collapse follows when that number exceeds
   (item_timeout_s - base_service_s - latency) / per_depth_s (with 10, 1, 0.5 and no latency: 18 hosts).
   Ways out: `flush` (operator restart drops every item) with a throttle that keeps the depth under the
   threshold while the hosts are offered again, or, preventively, max_depth below the threshold.
No I/O and no clock reads in the core (`HostLeases`, `Placement`, `RecoveryQueue`): the caller passes `now`.

The asyncio shell, `HostManager`, drives the core on a `Clock`: a scheduler task hands due renewals to
`renew_concurrency` renewer tasks (a host's first renewal is a put, `acquire_lease`: the fleet was leased
before the simulation began but the store starts empty), moves lapsed hosts to expired and offers them to the
queue (rejected ones again after retry_s, throttled ones as soon as the bucket has a token); `workers` worker
tasks each wait an item's modelled service time with the clock, then call `acquire_lease`, all under the item's
deadline; a failed acquire is offered again after retry_s.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Protocol, Self

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import Field, model_validator

from simconfig import ConfigModel, Fraction, MaxDepth, Rate, Seconds, Whole, validated
from worlds.base import Clock

log = logging.getLogger(__name__)

# Spreads TTL fractions evenly over [0, 1) in any prefix of the hosts, uncorrelated with the renewal phase.
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0

# Rounding in the refill must not make a retry at exactly the computed time find 0.9999999 tokens.
_ONE_TOKEN = 1.0 - 1e-9

# The recovery queue's hard cap by default: far above any fleet the schema allows (5000 hosts, one item each),
# so it never changes a modelled run; it only keeps a misconfigured or runaway one from growing without limit.
DEFAULT_HARD_CAP = 100_000

# The lease store's outcomes, exported with zeros so that no renewal series appears out of nowhere.
STORE_OUTCOMES = ("ok", "conflict", "not_found", "throttled", "unavailable", "unresolvable", "timeout", "error")


class LeaseResultLike(Protocol):
    @property
    def ok(self) -> bool: ...

    @property
    def outcome(self) -> str: ...

    @property
    def latency_s(self) -> float: ...


class LeaseApi(Protocol):
    """The lease store client the manager needs; the calls never raise (failures are outcomes)."""

    async def acquire_lease(self, key: str, ttl_s: float) -> LeaseResultLike: ...  # put unconditionally

    async def renew_lease(self, key: str, ttl_s: float) -> LeaseResultLike: ...  # "not_found" = expired


class LeaseState(StrEnum):
    LEASED = "leased"
    EXPIRED = "expired"
    RECOVERING = "recovering"  # expired, with a work item in the recovery queue


class Offer(StrEnum):
    """What `RecoveryQueue.offer` did with an item."""

    ACCEPTED = "accepted"
    REJECTED_DEPTH = "rejected-depth"
    REJECTED_THROTTLE = "rejected-throttle"
    DUPLICATE = "duplicate"
    DROPPED = "dropped"  # the hard cap (a safety bound, not the modelled admission control)


def _check(**values: object) -> None:
    """The settings' rules (HostManagerSettings) for values handed to a core object directly, not by a config;
    ValueError names the field."""
    validated(HostManagerSettings, values)


def host_ids(hosts: int) -> list[str]:
    width = max(3, len(str(hosts - 1)))
    return [f"h{i:0{width}d}" for i in range(hosts)]


class HostLeases:
    """The lease of every host: state, expiry and next renewal time (rules 1-2)."""

    def __init__(
        self,
        hosts: int,
        lease_ttl_s: float,
        renew_interval_s: float,
        ttl_spread: float = 0.0,
        now: float = 0.0,
        retry_s: float | None = None,
    ) -> None:
        self.retry_s = renew_interval_s / 4.0 if retry_s is None else retry_s
        _check(hosts=hosts, lease_ttl_s=lease_ttl_s, renew_interval_s=renew_interval_s, ttl_spread=ttl_spread,
               retry_s=self.retry_s)
        self.lease_ttl_s = lease_ttl_s
        self.renew_interval_s = renew_interval_s
        self.ttl_spread = ttl_spread
        self.hosts: tuple[str, ...] = tuple(host_ids(hosts))
        self._ttl: dict[str, float] = {}
        self._state: dict[str, LeaseState] = {}
        self._expiry: dict[str, float] = {}
        self._next_due: dict[str, float] = {}
        self._renewing: set[str] = set()  # renewal in flight: not due again until it comes back
        for i, host in enumerate(self.hosts):
            self._ttl[host] = lease_ttl_s * (1.0 - ttl_spread * ((i * _GOLDEN) % 1.0))
            first_due = now + i / hosts * renew_interval_s
            self._next_due[host] = first_due
            self._expiry[host] = first_due - renew_interval_s + self._ttl[host]
            self._state[host] = LeaseState.LEASED

    # -- reading

    def ttl(self, host: str) -> float:
        return self._ttl[host]

    def state(self, host: str) -> LeaseState:
        return self._state[host]

    def expiry(self, host: str) -> float:
        return self._expiry[host]

    def is_leased(self, host: str, now: float) -> bool:
        """Holds a lease at `now`, whether or not `expire` has been called since it lapsed."""
        return self._state[host] == LeaseState.LEASED and self._expiry[host] > now

    def counts(self, now: float) -> dict[str, int]:
        c = {s.value: 0 for s in LeaseState}
        for host in self.hosts:
            state = self._state[host]
            if state == LeaseState.LEASED and self._expiry[host] <= now:
                state = LeaseState.EXPIRED
            c[state.value] += 1
        return c

    def due(self, now: float) -> list[str]:
        """Leased hosts whose renewal is due and not in flight, earliest first."""
        due = [
            h
            for h in self.hosts
            if self._state[h] == LeaseState.LEASED and h not in self._renewing and self._next_due[h] <= now
        ]
        return sorted(due, key=lambda h: (self._next_due[h], h))

    def next_due(self) -> float | None:
        """When the next renewal falls due (None: none is pending)."""
        return min(
            (self._next_due[h] for h in self.hosts if self._state[h] == LeaseState.LEASED and h not in self._renewing),
            default=None,
        )

    def next_expiry(self) -> float | None:
        """When the next leased host's lease lapses (None: no host is leased)."""
        return min((self._expiry[h] for h in self.hosts if self._state[h] == LeaseState.LEASED), default=None)

    # -- writing

    def renewing(self, host: str) -> None:
        """A renewal for `host` is in flight."""
        self._renewing.add(host)

    def renewed(self, host: str, now: float, ok: bool) -> bool:
        """A renewal came back; False if it no longer applies (the lease lapsed meanwhile)."""
        self._renewing.discard(host)
        if self._state[host] != LeaseState.LEASED:
            return False
        if ok:
            self._expiry[host] = now + self._ttl[host]
            self._next_due[host] = now + self.renew_interval_s
        else:
            self._next_due[host] = now + self.retry_s
        return True

    def expire(self, now: float) -> list[str]:
        """Leased hosts whose lease has lapsed by `now`, now expired; earliest expiry first."""
        lapsed = [h for h in self.hosts if self._state[h] == LeaseState.LEASED and self._expiry[h] <= now]
        lapsed.sort(key=lambda h: (self._expiry[h], h))
        for host in lapsed:
            self._state[host] = LeaseState.EXPIRED
        return lapsed

    def established(self, host: str, now: float) -> None:
        """The host's lease was put again (recovered): leased until now + its TTL."""
        self._state[host] = LeaseState.LEASED
        self._expiry[host] = now + self._ttl[host]
        self._next_due[host] = now + self.renew_interval_s

    def mark_recovering(self, host: str) -> None:
        self._state[host] = LeaseState.RECOVERING

    def mark_expired(self, host: str) -> bool:
        """Expired and not queued (lease forgotten by the store, item flushed or failed); True if it was leased."""
        was_leased = self._state[host] == LeaseState.LEASED
        self._state[host] = LeaseState.EXPIRED
        return was_leased


class Placement:
    """Where new instances launch: on leased hosts only, `slots_per_host` each (rule 3)."""

    def __init__(self, leases: HostLeases, slots_per_host: int) -> None:
        _check(slots_per_host=slots_per_host)
        self.leases = leases
        self.slots_per_host = slots_per_host
        self._host_of: dict[str, str] = {}
        self._load: collections.Counter[str] = collections.Counter()
        self.placed = 0
        self.insufficient = 0

    def place(self, instance_id: str, now: float) -> str | None:
        """The host the instance launches on, or None: insufficient capacity."""
        if instance_id in self._host_of:
            raise ValueError(f"instance {instance_id!r} is placed already")
        free = [h for h in self.leases.hosts if self._load[h] < self.slots_per_host and self.leases.is_leased(h, now)]
        if not free:
            self.insufficient += 1
            return None
        host = min(free, key=lambda h: (self._load[h], h))
        self._host_of[instance_id] = host
        self._load[host] += 1
        self.placed += 1
        return host

    def release(self, instance_id: str) -> str | None:
        """The instance terminated; returns the host it ran on (None if unknown)."""
        host = self._host_of.pop(instance_id, None)
        if host is not None:
            self._load[host] -= 1
        return host

    def host_of(self, instance_id: str) -> str | None:
        return self._host_of.get(instance_id)

    def load(self, host: str) -> int:
        return self._load[host]

    @property
    def instances(self) -> int:
        return len(self._host_of)

    def free_slots(self, now: float) -> int:
        """Launchable capacity: free slots on leased hosts."""
        return sum(self.slots_per_host - self._load[h] for h in self.leases.hosts if self.leases.is_leased(h, now))


class RecoveryQueue:
    """The lease re-establishment work queue (rules 4-6)."""

    def __init__(
        self,
        workers: int,
        item_timeout_s: float,
        base_service_s: float,
        per_depth_s: float,
        max_depth: int | None = None,
        throttle_per_s: float | None = None,
        hard_cap: int = DEFAULT_HARD_CAP,
    ) -> None:
        _check(workers=workers, item_timeout_s=item_timeout_s, base_service_s=base_service_s,
               per_depth_s=per_depth_s, hard_cap=hard_cap)
        self.workers = workers
        self.item_timeout_s = item_timeout_s
        self.base_service_s = base_service_s
        self.per_depth_s = per_depth_s
        self.hard_cap = hard_cap
        self.max_depth: int | None = None
        self.throttle_per_s: float | None = None
        self.set_max_depth(max_depth)
        self.set_throttle(throttle_per_s)
        self._queued: collections.OrderedDict[str, None] = collections.OrderedDict()  # FIFO, O(1) membership
        self._in_progress: dict[str, float] = {}  # host -> start time
        self.accepted = 0
        self.goodput = 0
        self.failures = 0
        self.timeouts = 0
        self.duplicates = 0
        self.flushed = 0
        self.rejected: dict[str, int] = {"depth": 0, "throttle": 0}
        self.dropped = 0  # offers refused by the hard cap
        self.last_service_s = 0.0

    # -- reading

    @property
    def depth(self) -> int:
        return len(self._queued) + len(self._in_progress)

    @property
    def queued(self) -> int:
        return len(self._queued)

    @property
    def in_progress(self) -> int:
        return len(self._in_progress)

    def holds(self, host: str) -> bool:
        return host in self._queued or host in self._in_progress

    def started_at(self, host: str) -> float | None:
        return self._in_progress.get(host)

    def collapse_depth(self, latency_s: float = 0.0) -> float:
        """The depth above which no item can finish before its timeout (rule 6)."""
        if self.per_depth_s == 0:
            return math.inf if self.base_service_s + latency_s <= self.item_timeout_s else 0.0
        return (self.item_timeout_s - self.base_service_s - latency_s) / self.per_depth_s

    def next_admission(self, now: float) -> float:
        """When the throttle will next admit an item (now if it would now, or if there is no throttle)."""
        if self.throttle_per_s is None:
            return now
        self._refill(now)
        return now if self._tokens >= _ONE_TOKEN else now + (1.0 - self._tokens) / self.throttle_per_s

    # -- operator settings

    def set_throttle(self, per_s: float | None) -> None:
        """Limit intake to `per_s` items per sim-second (None: no limit); the bucket starts full."""
        _check(throttle_per_s=per_s)
        self.throttle_per_s = per_s
        self._burst = max(1.0, per_s) if per_s is not None else 0.0
        self._tokens = self._burst
        self._refilled_at: float | None = None

    def set_max_depth(self, n: int | None) -> None:
        _check(max_depth=n)
        self.max_depth = n

    # -- work

    def offer(self, host: str, now: float) -> Offer:
        if self.holds(host):
            self.duplicates += 1
            return Offer.DUPLICATE
        if self.max_depth is not None and self.depth + 1 > self.max_depth:
            self.rejected["depth"] += 1
            return Offer.REJECTED_DEPTH
        # After admission control, so the modelled mitigation is what a run reports whenever it applies; before
        # the throttle, so a dropped item spends no token.
        if self.depth >= self.hard_cap:
            self.dropped += 1
            return Offer.DROPPED
        if self.throttle_per_s is not None:
            self._refill(now)
            if self._tokens < _ONE_TOKEN:
                self.rejected["throttle"] += 1
                return Offer.REJECTED_THROTTLE
            self._tokens -= 1.0
        self._queued[host] = None
        self.accepted += 1
        return Offer.ACCEPTED

    def start(self, now: float) -> tuple[str, float] | None:
        """The next item and its modelled service time, if a worker is free and an item is queued."""
        if not self._queued or len(self._in_progress) >= self.workers:
            return None
        service = self.base_service_s + self.per_depth_s * self.depth
        host, _ = self._queued.popitem(last=False)
        self._in_progress[host] = now
        self.last_service_s = service
        return host, service

    def finish(self, host: str, now: float, ok: bool) -> bool:
        """The item's attempt ended before its deadline; False if it is not in progress (flushed meanwhile)."""
        if self._in_progress.pop(host, None) is None:
            return False
        if ok:
            self.goodput += 1
        else:
            self.failures += 1
        return True

    def timed_out(self, host: str, now: float) -> bool:
        """The item passed its deadline: its work is wasted and it goes back to the tail of the queue."""
        if self._in_progress.pop(host, None) is None:
            return False
        self.timeouts += 1
        self._queued[host] = None
        return True

    def flush(self, now: float) -> list[str]:
        """Operator restart: drop every item, in progress first, and return their hosts."""
        hosts = [*self._in_progress, *self._queued]
        self._in_progress.clear()
        self._queued.clear()
        self.flushed += len(hosts)
        return hosts

    def _refill(self, now: float) -> None:
        assert self.throttle_per_s is not None
        if self._refilled_at is None:
            self._refilled_at = now
        elif now > self._refilled_at:
            self._tokens = min(self._burst, self._tokens + (now - self._refilled_at) * self.throttle_per_s)
            self._refilled_at = now


# -- the asyncio shell


class HostManagerSettings(ConfigModel):
    """The host manager's tunables (a scenario's `control_plane.host_manager`), in sim seconds."""

    hosts: Annotated[Whole, Field(ge=1, le=5000)] = 60
    lease_ttl_s: Annotated[Seconds, Field(gt=0)] = 300.0
    renew_interval_s: Annotated[Seconds, Field(gt=0)] = 60.0
    ttl_spread: Annotated[Fraction, Field(ge=0, lt=1)] = 0.5
    renew_concurrency: Annotated[Whole, Field(ge=1, le=1000)] = 16
    workers: Annotated[Whole, Field(ge=1, le=1000)] = 4
    item_timeout_s: Annotated[Seconds, Field(gt=0)] = 10.0
    base_service_s: Annotated[Seconds, Field(ge=0)] = 1.0
    per_depth_s: Annotated[Seconds, Field(ge=0)] = 0.5
    max_depth: MaxDepth | None = None
    throttle_per_s: Rate | None = None
    retry_s: Annotated[Seconds, Field(gt=0)] = 5.0  # renewal retries, offers rejected for depth, failed acquires
    slots_per_host: Annotated[Whole, Field(ge=1, le=1000)] = 4
    # A memory bound on the recovery queue, not the modelled admission control (`max_depth`): beyond it new
    # items are dropped and counted (lbsim_host_recovery_dropped_total).
    hard_cap: Annotated[Whole, Field(ge=1)] = DEFAULT_HARD_CAP

    @model_validator(mode="after")
    def _leases_outlive_renewals(self) -> Self:
        # Otherwise the shortest leases lapse between two successful renewals.
        shortest = self.lease_ttl_s * (1.0 - self.ttl_spread)
        if shortest <= self.renew_interval_s:
            raise ValueError(f"lease_ttl_s * (1 - ttl_spread) = {shortest:g} must exceed renew_interval_s = "
                             f"{self.renew_interval_s:g}, or the shortest leases lapse between two renewals")
        return self


class HostManagerConfig(HostManagerSettings):
    """The settings, and the lease keys' prefix in the lease store."""

    key_prefix: Annotated[str, Field(min_length=1)] = "host-"


EventHook = Callable[[str, dict[str, Any]], None]


async def _cancel_and_wait(tasks: Iterable[asyncio.Future[Any] | None]) -> None:
    """Cancel and await every task; re-raise only if the task running this is itself being cancelled."""
    pending = [t for t in tasks if t is not None]
    for t in pending:
        t.cancel()
    for t in pending:
        try:
            await t
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
        except Exception:
            log.exception("host manager task failed")


class HostManager:
    """DWFM on a clock: renews leases through `leases`, recovers expired hosts through the recovery queue.

    The core objects are public for inspection: `lease_table` (HostLeases), `placement`, `recovery`
    (RecoveryQueue). Operator actions (`throttle`, `restart`, `set_admission`) take effect at once.
    """

    def __init__(
        self,
        clock: Clock,
        leases: LeaseApi,
        config: HostManagerConfig | None = None,
        registry: CollectorRegistry | None = None,
        on_event: EventHook | None = None,
    ) -> None:
        self.config = cfg = config if config is not None else HostManagerConfig()
        self._clock = clock
        self._api = leases
        self.on_event = on_event
        self.lease_table = self._new_lease_table()
        self.placement = Placement(self.lease_table, cfg.slots_per_host)
        self.recovery = RecoveryQueue(
            cfg.workers,
            cfg.item_timeout_s,
            cfg.base_service_s,
            cfg.per_depth_s,
            cfg.max_depth,
            cfg.throttle_per_s,
            cfg.hard_cap,
        )
        self.renewals: collections.Counter[str] = collections.Counter()
        self.registry = registry if registry is not None else CollectorRegistry()
        self.registry.register(HostManagerCollector(self))
        # Hosts this manager has never put: the store starts empty, so their first renewal is an acquire.
        self._fresh: set[str] = set(self.lease_table.hosts)
        self._to_offer: dict[str, float] = {}  # expired hosts not in the queue -> when to offer them
        self._epoch = 0  # bumped by restart(): results of attempts started before it are dropped
        self._tasks: list[asyncio.Task[None]] = []
        self._attempts: set[asyncio.Task[LeaseResultLike]] = set()
        self._renew_queue: asyncio.Queue[str] = asyncio.Queue()
        self._poke = asyncio.Event()  # wake the scheduler: its next wake-up time may have moved
        self._work = asyncio.Event()  # wake idle workers: an item may be startable
        self._started = self._closed = False
        self._ever_expired = False
        self._all_expired_told = False
        self._timeouts_since_goodput = 0
        self._collapse_told = False

    # -- lifecycle

    async def start(self) -> None:
        if self._closed:
            raise RuntimeError("host manager is closed")
        if self._started:
            return
        self._started = True
        # Stagger from now, not from construction: a scenario may restart its clock in between.
        self.lease_table = self._new_lease_table()
        self.placement.leases = self.lease_table
        self._tasks.append(asyncio.create_task(self._schedule(), name="hostmanager-scheduler"))
        for i in range(self.config.renew_concurrency):
            self._tasks.append(asyncio.create_task(self._renewer(), name=f"hostmanager-renewer-{i}"))
        for i in range(self.config.workers):
            self._tasks.append(asyncio.create_task(self._worker(), name=f"hostmanager-worker-{i}"))

    def _new_lease_table(self) -> HostLeases:
        cfg = self.config
        return HostLeases(
            cfg.hosts, cfg.lease_ttl_s, cfg.renew_interval_s, cfg.ttl_spread, self._clock.now(), retry_s=cfg.retry_s
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        tasks: list[asyncio.Future[Any]] = [*self._attempts, *self._tasks]
        self._tasks.clear()
        await _cancel_and_wait(tasks)

    async def __aenter__(self) -> HostManager:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- observability

    def counts(self) -> dict[str, int]:
        """Hosts by lease state: leased, expired, recovering."""
        return self.lease_table.counts(self._clock.now())

    @property
    def queue_depth(self) -> int:
        return self.recovery.depth

    @property
    def goodput_total(self) -> int:
        return self.recovery.goodput

    @property
    def timeouts_total(self) -> int:
        return self.recovery.timeouts

    # -- launches and operator actions

    def place(self, instance_id: str) -> str | None:
        """The host a new instance launches on, or None: insufficient capacity."""
        return self.placement.place(instance_id, self._clock.now())

    def release(self, instance_id: str) -> str | None:
        return self.placement.release(instance_id)

    def throttle(self, per_s: float | None) -> None:
        """Limit recovery intake to `per_s` items per sim-second (None lifts the limit)."""
        self.recovery.set_throttle(per_s)
        self._emit("throttle", per_s=per_s)
        self._poke.set()

    def set_admission(self, max_depth: int | None) -> None:
        """Reject recovery work above `max_depth` queued + in progress (None: no limit)."""
        self.recovery.set_max_depth(max_depth)
        self._emit("admission", max_depth=max_depth)
        self._poke.set()

    def restart(self) -> list[str]:
        """Restart the DWFM hosts: every queued and in-progress item is dropped, its host offered again later."""
        now = self._clock.now()
        self._epoch += 1
        for attempt in self._attempts:
            attempt.cancel()  # the worker sees it done and drops it: the epoch has moved
        hosts = self.recovery.flush(now)
        for host in hosts:
            self.lease_table.mark_expired(host)
            self._to_offer[host] = now + self.config.retry_s
        self._timeouts_since_goodput = 0
        self._collapse_told = False
        self._emit("restart", flushed=len(hosts))
        self._poke.set()
        return hosts

    # -- tasks

    async def _schedule(self) -> None:
        while not self._closed:
            self._poke.clear()
            wake = self._step(self._clock.now())
            await self._sleep_until(wake)

    def _step(self, now: float) -> float | None:
        """One pass: hand out due renewals, expire lapsed leases, offer expired hosts; return the next wake time."""
        table = self.lease_table
        for host in table.due(now):
            table.renewing(host)
            self._renew_queue.put_nowait(host)
        self._expired(table.expire(now), now)
        blocked_until = self._offer(now)
        wakes = [table.next_due(), table.next_expiry(), blocked_until]
        wakes.extend(t for t in self._to_offer.values() if t > now)
        return min((w for w in wakes if w is not None), default=None)

    def _offer(self, now: float) -> float | None:
        """Offer the expired hosts whose time has come, in order; return when a throttled offer can be retried."""
        due = sorted((t, h) for h, t in self._to_offer.items() if t <= now)
        for i, (_, host) in enumerate(due):
            outcome = self.recovery.offer(host, now)
            if outcome == Offer.REJECTED_THROTTLE:
                return self.recovery.next_admission(now)  # the rest stay due
            if outcome in (Offer.REJECTED_DEPTH, Offer.DROPPED):
                if outcome == Offer.DROPPED and self.recovery.dropped == 1:
                    log.warning("host manager: recovery queue at its hard cap (%d items); dropping offers",
                                self.recovery.hard_cap)
                # No room for any of them until items leave. A dropped host stays expired and in `_to_offer`
                # (one entry per host, so bounded by the fleet): only the work item is dropped, not the host.
                for _, later in due[i:]:
                    self._to_offer[later] = now + self.config.retry_s
                return None
            del self._to_offer[host]
            if outcome == Offer.ACCEPTED:
                self.lease_table.mark_recovering(host)
                self._work.set()
        return None

    def _expired(self, hosts: list[str], now: float) -> None:
        for host in hosts:
            self._to_offer[host] = now
            if not self._ever_expired:
                self._ever_expired = True
                self._emit("first_lease_expired", host=host)
        if hosts and not self._all_expired_told and self.lease_table.counts(now)["leased"] == 0:
            self._all_expired_told = True
            self._emit("all_leases_expired")

    async def _sleep_until(self, wake: float | None) -> None:
        """Sleep until sim time `wake` (None: indefinitely) or until poked."""
        poked = asyncio.ensure_future(self._poke.wait())
        timer = None if wake is None else asyncio.ensure_future(self._clock.sleep_until(wake))
        try:
            await asyncio.wait([f for f in (poked, timer) if f is not None], return_when=asyncio.FIRST_COMPLETED)
        finally:
            await _cancel_and_wait((poked, timer))

    async def _renewer(self) -> None:
        while not self._closed:
            host = await self._renew_queue.get()
            key, ttl = self.config.key_prefix + host, self.lease_table.ttl(host)
            if host in self._fresh:
                result = await self._call(self._api.acquire_lease(key, ttl))
            else:
                result = await self._call(self._api.renew_lease(key, ttl))
            now = self._clock.now()
            self.renewals[result.outcome] += 1
            if result.ok:
                self._fresh.discard(host)
            if result.outcome == "not_found" and self.lease_table.state(host) == LeaseState.LEASED:
                self.lease_table.renewed(host, now, False)
                self.lease_table.mark_expired(host)  # the store forgot the lease
                self._expired([host], now)
            else:
                self.lease_table.renewed(host, now, result.ok)
            self._poke.set()

    async def _worker(self) -> None:
        while not self._closed:
            item = self.recovery.start(self._clock.now())
            if item is None:
                self._work.clear()
                await self._work.wait()
                continue
            host, service_s = item
            epoch = self._epoch
            deadline = self._clock.now() + self.config.item_timeout_s
            attempt = asyncio.create_task(self._attempt(host, service_s))
            self._attempts.add(attempt)
            timer = asyncio.ensure_future(self._clock.sleep_until(deadline))
            try:
                await asyncio.wait((attempt, timer), return_when=asyncio.FIRST_COMPLETED)
            finally:
                self._attempts.discard(attempt)
                await _cancel_and_wait((timer, None if attempt.done() else attempt))
            now = self._clock.now()
            if epoch != self._epoch:
                continue  # flushed by a restart while in progress
            if attempt.done() and not attempt.cancelled():
                self._finished(host, now, attempt.result())
            elif self.recovery.timed_out(host, now):
                self._timed_out(now)
            self._work.set()
            self._poke.set()

    async def _attempt(self, host: str, service_s: float) -> LeaseResultLike:
        await self._clock.sleep(service_s)  # the modelled state-check work, which grows with the backlog
        return await self._call(self._api.acquire_lease(self.config.key_prefix + host, self.lease_table.ttl(host)))

    def _finished(self, host: str, now: float, result: LeaseResultLike) -> None:
        if not self.recovery.finish(host, now, result.ok):
            return
        if result.ok:
            self._fresh.discard(host)
            self.lease_table.established(host, now)
            self._timeouts_since_goodput = 0
            self._collapse_told = False
            self._check_all_back(now)
        else:
            self.lease_table.mark_expired(host)
            self._to_offer[host] = now + self.config.retry_s

    def _timed_out(self, now: float) -> None:
        self._timeouts_since_goodput += 1
        # Every worker has timed out three times in a row with nothing done in between: no forward progress.
        if not self._collapse_told and self._timeouts_since_goodput >= 3 * self.config.workers:
            self._collapse_told = True
            self._emit(
                "collapse_suspected",
                depth=self.recovery.depth,
                service_s=self.recovery.last_service_s,
                timeouts_in_a_row=self._timeouts_since_goodput,
            )

    def _check_all_back(self, now: float) -> None:
        if self._ever_expired and self.lease_table.counts(now)["leased"] == self.config.hosts:
            self._ever_expired = False  # re-armed: the next expiry starts a new story
            self._all_expired_told = False
            self._emit("all_leases_back")

    async def _call(self, call: Coroutine[Any, Any, LeaseResultLike]) -> LeaseResultLike:
        """The store calls never raise by contract; a client that does anyway counts as an error."""
        try:
            return await call
        except Exception:
            log.exception("lease store client raised")
            return _Failed()

    def _emit(self, kind: str, **data: Any) -> None:
        if self.on_event is None:
            return
        data.update(at=self._clock.now(), **self.counts(), depth=self.recovery.depth)
        try:
            self.on_event(kind, data)
        except Exception:
            log.exception("on_event hook failed for %s", kind)


@dataclass(frozen=True, slots=True)
class _Failed:
    ok: bool = False
    outcome: str = "error"
    latency_s: float = 0.0


class HostManagerCollector(Collector):
    """Reads the host manager when scraped."""

    def __init__(self, manager: HostManager) -> None:
        self._m = manager

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        return self._families(fill=True)

    def _families(self, fill: bool = False) -> Iterator[Metric]:
        leases = GaugeMetricFamily("lbsim_host_leases", "Hosts by lease state", labels=["state"])
        depth = GaugeMetricFamily("lbsim_host_recovery_queue_depth", "Lease recovery work items queued or in progress")
        goodput = CounterMetricFamily("lbsim_host_recovery_goodput", "Lease recovery items that re-established a lease")
        timeouts = CounterMetricFamily(
            "lbsim_host_recovery_timeouts", "Lease recovery items abandoned at their deadline and re-queued"
        )
        rejected = CounterMetricFamily(
            "lbsim_host_recovery_rejected",
            "Lease recovery items refused at intake, by reason (depth: admission control, throttle)",
            labels=["reason"],
        )
        dropped = CounterMetricFamily(
            "lbsim_host_recovery_dropped",
            "Lease recovery items dropped at the queue's hard cap (a memory bound, not admission control)",
        )
        renewals = CounterMetricFamily(
            "lbsim_host_lease_renewals", "Lease renewals by lease store outcome", labels=["outcome"]
        )
        placements = CounterMetricFamily(
            "lbsim_host_placements",
            "Instance placements by outcome (placed, insufficient_capacity)",
            labels=["outcome"],
        )
        service = GaugeMetricFamily(
            "lbsim_host_recovery_service_seconds", "Modelled service time of the last recovery item started"
        )
        if fill:
            m = self._m
            for state, n in m.counts().items():
                leases.add_metric([state], n)
            q = m.recovery
            depth.add_metric([], q.depth)
            goodput.add_metric([], q.goodput)
            timeouts.add_metric([], q.timeouts)
            for reason, n in sorted(q.rejected.items()):
                rejected.add_metric([reason], n)
            dropped.add_metric([], q.dropped)
            for outcome in sorted(set(STORE_OUTCOMES) | set(m.renewals)):
                renewals.add_metric([outcome], m.renewals[outcome])
            placements.add_metric(["placed"], m.placement.placed)
            placements.add_metric(["insufficient_capacity"], m.placement.insufficient)
            service.add_metric([], q.last_service_s)
        yield from (leases, depth, goodput, timeouts, rejected, dropped, renewals, placements, service)
