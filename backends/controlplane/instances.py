"""The instance lifecycle and an autoscaler: launches that need a host, an API token and network propagation.

The AWS mechanism (docs/sources.md#aws-summary): launches failed with "insufficient capacity" while host
leases had lapsed, then with "request limit exceeded" under the deliberate throttles; the launches that got
through queued their network configuration behind a backlog, and NLB brought them into service before that
configuration had propagated. Autoscaling kept retrying, so the backlog grew while launches failed and
flooded the network manager once they succeeded.

Rules of this model:
1. States: pending -> launching -> network-pending -> running -> terminated, in that order only; terminate is
   allowed from every state but terminated itself; anything else raises `InvalidTransition`.
2. A launch, in order: the API throttle (a token bucket of `launch_rate_per_s`; over it ->
   "request_limit_exceeded", nothing created); pending; `Placement.place` (None -> "insufficient_capacity",
   nothing created); launching: the backend starts with its path `blackhole` before anyone knows its address,
   and boots for `launch_time_s`; network-pending: its network item is submitted (rejected by admission
   control -> "network_admission_rejected", the instance is cleaned up and terminated), and only then
   `on_launched` registers it with the load balancer, whose checks may reach it before its network does;
   running: when the network manager applies `open` to its path.
3. `Autoscaler.plan` launches, per zone, the gap between desired and live (non-terminated) instances, at most
   `max_launch_per_tick` in all, shared round-robin between zones. It never scales in. A failed launch creates
   nothing, so the next tick simply tries again.
4. Terminate: release the host, submit a terminate item (if the instance's network was ever configured),
   remove the backend, then `on_terminated` (if `on_launched` had been called).
5. A memory bound, not part of the model: the fleet keeps the records of the newest `max_terminated`
   terminated instances; older ones are forgotten (`instance(id)` no longer knows them) but still counted as
   terminated. Launches that keep failing at network admission would otherwise add records without limit.
Everything is in sim seconds; the pure parts take `now`, the shell `InstanceFleet` reads the clock.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, Any, Protocol

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import Field

from backends.controlplane.netmanager import NetworkManager
from backends.fleet import Targets, UnknownTarget
from simconfig import ConfigModel, Number, Rate, Seconds, Whole, validated
from worlds.base import Clock

log = logging.getLogger(__name__)

# Launch-to-running in sim seconds: a boot on a healthy control plane to hours behind a propagation backlog.
LAUNCH_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 21600)


class InstanceState(StrEnum):
    PENDING = "pending"
    LAUNCHING = "launching"
    NETWORK_PENDING = "network-pending"
    RUNNING = "running"
    TERMINATED = "terminated"


_NEXT = {
    InstanceState.PENDING: InstanceState.LAUNCHING,
    InstanceState.LAUNCHING: InstanceState.NETWORK_PENDING,
    InstanceState.NETWORK_PENDING: InstanceState.RUNNING,
}


class InvalidTransition(ValueError):
    pass


class UnknownInstance(LookupError):
    def __init__(self, instance_id: str) -> None:
        super().__init__(f"unknown instance {instance_id!r}")
        self.instance_id = instance_id


@dataclass(slots=True)
class Instance:
    """One instance and when it entered each state (`times[state]`, sim seconds)."""

    id: str
    zone: str
    state: InstanceState = InstanceState.PENDING
    host: str | None = None
    times: dict[InstanceState, float] = field(default_factory=dict)

    @classmethod
    def new(cls, instance_id: str, zone: str, now: float) -> Instance:
        return cls(instance_id, zone, InstanceState.PENDING, None, {InstanceState.PENDING: now})

    @property
    def live(self) -> bool:
        return self.state is not InstanceState.TERMINATED

    def advance(self, to: InstanceState, now: float) -> None:
        """Move to `to` (rule 1); InvalidTransition, and no change, for anything out of order."""
        if to is InstanceState.TERMINATED:
            if not self.live:
                raise InvalidTransition(f"instance {self.id} is terminated already")
        elif _NEXT.get(self.state) is not to:
            raise InvalidTransition(f"instance {self.id} cannot go from {self.state} to {to}")
        self.state = to
        self.times[to] = now

    def terminate(self, now: float) -> None:
        self.advance(InstanceState.TERMINATED, now)

    def launch_to_running(self) -> float | None:
        """Sim seconds from pending to running; None if it never launched through both (e.g. adopted)."""
        start, end = self.times.get(InstanceState.PENDING), self.times.get(InstanceState.RUNNING)
        return None if start is None or end is None else end - start


def _check(**values: object) -> None:
    """The config's rules (InstanceConfig) for values handed to the core or an operator knob directly;
    ValueError names the field."""
    validated(InstanceConfig, values)


class Autoscaler:
    """Rule 3: how many instances to launch now in each zone."""

    def __init__(self, desired: Mapping[str, int], max_launch_per_tick: int) -> None:
        _check(max_launch_per_tick=max_launch_per_tick)
        self._desired: dict[str, int] = {}
        for zone, n in desired.items():
            self.set_desired(zone, n)
        self.max_launch_per_tick = max_launch_per_tick

    @property
    def desired(self) -> dict[str, int]:
        return dict(self._desired)

    def set_desired(self, zone: str, n: int) -> None:
        if n < 0:
            raise ValueError(f"desired count for zone {zone} must be >= 0, got {n}")
        self._desired[zone] = n

    def plan(self, live_counts: Mapping[str, int]) -> dict[str, int]:
        """Launches per zone (zones with none left out), the total capped at max_launch_per_tick."""
        gaps = {z: max(0, n - live_counts.get(z, 0)) for z, n in sorted(self._desired.items())}
        out: collections.Counter[str] = collections.Counter()
        budget = self.max_launch_per_tick
        # Round-robin so one zone's large gap does not starve the others (bounded: each pass spends >= 1).
        while budget > 0 and any(gaps.values()):
            for zone in gaps:
                if budget > 0 and gaps[zone] > 0:
                    gaps[zone] -= 1
                    out[zone] += 1
                    budget -= 1
        return dict(out)


class LaunchThrottle:
    """The EC2 API throttle: a token bucket of `rate_per_s` and `burst` (None rate = unthrottled)."""

    def __init__(self, rate_per_s: float | None, burst: float | None = None, now: float = 0.0) -> None:
        self._rate: float | None = None
        self._burst = 0.0
        self._tokens = 0.0
        self._last = now
        self.set_rate(rate_per_s, burst, now)

    @property
    def rate_per_s(self) -> float | None:
        return self._rate

    def set_rate(self, rate_per_s: float | None, burst: float | None = None, now: float | None = None) -> None:
        """Change the throttle (operators relaxing it, as from 11:23 on 2025-10-20); burst defaults to one
        second's worth, at least one request. The bucket starts full."""
        _check(launch_rate_per_s=rate_per_s, launch_burst=burst)
        self._rate = rate_per_s
        self._burst = burst if burst is not None else max(1.0, rate_per_s or 0.0)
        self._tokens = self._burst
        if now is not None:
            self._last = now

    def try_acquire(self, now: float) -> bool:
        if self._rate is None:
            return True
        self._tokens = min(self._burst, self._tokens + max(0.0, now - self._last) * self._rate)
        self._last = max(self._last, now)
        if self._tokens >= 1.0 - 1e-9:
            self._tokens -= 1.0
            return True
        return False


class Placement(Protocol):
    """Where instances run: the host manager implements it (a host id, None = insufficient capacity).

    `release` may return anything (the host manager returns the host freed); the fleet ignores it.
    """

    def place(self, instance_id: str) -> str | None: ...

    def release(self, instance_id: str) -> object: ...


class LaunchOutcome(StrEnum):
    LAUNCHED = "launched"  # reached network-pending and was registered; running follows propagation
    INSUFFICIENT_CAPACITY = "insufficient_capacity"
    REQUEST_LIMIT_EXCEEDED = "request_limit_exceeded"
    NETWORK_ADMISSION_REJECTED = "network_admission_rejected"
    ABORTED = "aborted"  # terminated while it was still launching


@dataclass(frozen=True, slots=True)
class LaunchResult:
    outcome: LaunchOutcome
    zone: str
    instance_id: str | None = None  # None when nothing was created




class InstanceSettings(ConfigModel):
    """The instance fleet's tunables (a scenario's `control_plane.instances`), in sim seconds."""

    launch_time_s: Annotated[Seconds, Field(ge=0)] = 2.0
    launch_rate_per_s: Rate | None = None  # the API throttle; None = unthrottled
    autoscale_interval_s: Annotated[Seconds, Field(gt=0)] = 5.0
    max_launch_per_tick: Annotated[Whole, Field(ge=0, le=1000)] = 5


class InstanceConfig(InstanceSettings):
    """The settings, the throttle's burst and a memory bound."""

    # None: one second's worth of launch_rate_per_s, at least 1 (a smaller bucket never holds a whole token)
    launch_burst: Annotated[Number, Field(ge=1)] | None = None
    max_terminated: Annotated[Whole, Field(ge=1)] = 10_000  # terminated records kept (rule 5)


@dataclass(frozen=True, slots=True)
class InstanceEvent:
    """kind: an InstanceState value (the instance entered it) or a failed LaunchOutcome value."""

    at: float
    kind: str
    zone: str
    instance_id: str | None


OnLaunched = Callable[[str, str, str, int], None]  # (instance id, zone, address host, port)
OnTerminated = Callable[[str], None]


class InstanceFleet:
    """The asyncio shell: launches real backends through `Targets`, the network manager and the callbacks.

    It installs its own `apply` on `network`, which sets the instance's path and marks it running on "open".
    `on_launched` gets the path's address host (127.0.0.1), not the placement host id (see `instance(id).host`).
    """

    def __init__(
        self,
        clock: Clock,
        targets: Targets,
        placement: Placement,
        network: NetworkManager,
        registry: CollectorRegistry | None = None,
        config: InstanceConfig | None = None,
        on_launched: OnLaunched | None = None,
        on_terminated: OnTerminated | None = None,
        *,
        desired: Mapping[str, int] | None = None,
        on_event: Callable[[InstanceEvent], None] | None = None,
    ) -> None:
        self.config = config or InstanceConfig()
        self._clock = clock
        self._targets = targets
        self._placement = placement
        self._network = network
        self.on_launched = on_launched
        self.on_terminated = on_terminated
        self.on_event = on_event
        self.autoscaler = Autoscaler(desired or {}, self.config.max_launch_per_tick)
        self.throttle = LaunchThrottle(self.config.launch_rate_per_s, self.config.launch_burst, clock.now())
        self._instances: dict[str, Instance] = {}
        self._serial: collections.Counter[str] = collections.Counter()  # per zone: ids are never reused
        self._placed: set[str] = set()  # instances holding a host from `placement`
        self._backend_up: set[str] = set()  # instances whose backend exists; whoever discards one removes it
        self._registered: set[str] = set()  # instances on_launched was called for
        self._networked: set[str] = set()  # instances whose network configuration was submitted or adopted
        self._launches: set[asyncio.Task[LaunchResult | None]] = set()
        self._terminated: collections.deque[str] = collections.deque()  # oldest first (rule 5)
        self.forgotten = 0  # terminated records dropped by rule 5
        self._task: asyncio.Task[None] | None = None
        self.outcomes: collections.Counter[LaunchOutcome] = collections.Counter()
        self.events: collections.deque[InstanceEvent] = collections.deque(maxlen=1000)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.registry.register(_InstancesCollector(self))
        self._to_running = Histogram(
            "lbsim_instance_launch_to_running_seconds",
            "Time from a launch request to the instance's network opening (running)",
            buckets=LAUNCH_BUCKETS,
            registry=self.registry,
        )
        network.set_apply(self._apply)

    # -- reading

    def instance(self, instance_id: str) -> Instance:
        try:
            return self._instances[instance_id]
        except KeyError:
            raise UnknownInstance(instance_id) from None

    def instances(self) -> list[Instance]:
        return list(self._instances.values())

    def counts(self) -> dict[str, int]:
        """Instances by state, every state present (terminated ones count, forgotten ones too)."""
        c = collections.Counter(i.state.value for i in self._instances.values())
        c[InstanceState.TERMINATED.value] += self.forgotten
        return {s.value: c[s.value] for s in InstanceState}

    def live_counts(self) -> dict[str, int]:
        """Non-terminated instances per zone: what the autoscaler compares with desired."""
        return dict(collections.Counter(i.zone for i in self._instances.values() if i.live))

    def could_serve(self, instance_id: str) -> bool:
        """Ground truth from the target itself; False once its backend is gone."""
        try:
            return self._targets.can_serve(instance_id)
        except UnknownTarget:
            return False

    # -- control

    def set_desired(self, zone: str, n: int) -> None:
        self.autoscaler.set_desired(zone, n)

    def set_launch_rate(self, rate_per_s: float | None, burst: float | None = None) -> None:
        self.throttle.set_rate(rate_per_s, burst, self._clock.now())

    def adopt(self, instance_id: str, zone: str, host: str | None = None) -> Instance:
        """Take over a target that existed before the control plane started: running, no network item.

        `host`: the placement host it already holds, if any; terminate then releases it from `placement`.
        """
        if instance_id in self._instances:
            raise ValueError(f"instance {instance_id!r} exists already")
        self._targets.info(instance_id)  # UnknownTarget if there is no such target
        inst = Instance(instance_id, zone, InstanceState.RUNNING, host, {InstanceState.RUNNING: self._clock.now()})
        self._instances[instance_id] = inst
        self._backend_up.add(instance_id)
        self._registered.add(instance_id)
        self._networked.add(instance_id)
        if host is not None:
            self._placed.add(instance_id)
        return inst

    async def launch(self, zone: str) -> LaunchResult:
        """Rule 2, through to network-pending (or a failure); returns after about launch_time_s."""
        started = self._begin(zone)
        if isinstance(started, LaunchResult):
            return started
        return await self._finish(started)

    async def terminate(self, instance_id: str) -> None:
        """Rule 4. UnknownInstance for an unknown id, InvalidTransition for a terminated one."""
        inst = self.instance(instance_id)
        inst.terminate(self._clock.now())  # first, so a launch still in progress sees it and stops
        self._emit(inst.state.value, inst)
        await self._tear_down(inst)
        if instance_id in self._registered:
            self._registered.discard(instance_id)
            if self.on_terminated is not None:
                self.on_terminated(instance_id)

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("instance fleet already started")
        self._task = asyncio.get_running_loop().create_task(self._autoscale(), name="autoscaler")

    async def close(self) -> None:
        """Stop the autoscaler and every launch in progress; the backends stay (Targets owns them)."""
        tasks: list[asyncio.Task[None] | asyncio.Task[LaunchResult | None]] = [*self._launches]
        if self._task is not None:
            tasks.append(self._task)
        self._task = None
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> InstanceFleet:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the autoscaler

    async def _autoscale(self) -> None:
        interval = self.config.autoscale_interval_s
        due = self._clock.now()
        while True:  # ends when close() cancels it
            self.autoscale_tick()
            due = max(due + interval, self._clock.now())
            await self._clock.sleep_until(due)

    def autoscale_tick(self) -> list[LaunchResult | Instance]:
        """Start what the plan says now; instances that got a host finish launching in the background."""
        started: list[LaunchResult | Instance] = []
        for zone, n in self.autoscaler.plan(self.live_counts()).items():
            for _ in range(n):
                s = self._begin(zone)
                started.append(s)
                if isinstance(s, Instance):
                    task = asyncio.get_running_loop().create_task(self._finish_quietly(s), name=f"launch {s.id}")
                    self._launches.add(task)
                    task.add_done_callback(self._launches.discard)
        return started

    async def _finish_quietly(self, inst: Instance) -> LaunchResult | None:
        try:
            return await self._finish(inst)
        except Exception:
            log.exception("launch of %s failed", inst.id)
            return None

    # -- one launch

    def _begin(self, zone: str) -> LaunchResult | Instance:
        """The synchronous part of a launch: throttle, pending, placement, launching."""
        now = self._clock.now()
        if not self.throttle.try_acquire(now):
            return self._failed(LaunchOutcome.REQUEST_LIMIT_EXCEEDED, zone)
        instance_id = self._next_id(zone)
        inst = Instance.new(instance_id, zone, now)
        host = self._placement.place(instance_id)
        if host is None:
            return self._failed(LaunchOutcome.INSUFFICIENT_CAPACITY, zone)
        inst.host = host
        self._placed.add(instance_id)
        inst.advance(InstanceState.LAUNCHING, self._clock.now())
        self._instances[instance_id] = inst
        self._emit(inst.state.value, inst)
        return inst

    async def _finish(self, inst: Instance) -> LaunchResult:
        """Boot the backend behind a blackholed path, then submit its network configuration."""
        try:
            await self._targets.add(inst.id, inst.zone)
        except BaseException:
            if inst.live:
                inst.terminate(self._clock.now())
                self._emit(inst.state.value, inst)
                self._release(inst)
            raise
        self._backend_up.add(inst.id)
        try:
            if inst.live:
                # Nobody knows the path's address until on_launched, so nothing reached it open in between.
                await self._targets.set_path(inst.id, "blackhole")
            if inst.state is InstanceState.LAUNCHING:
                await self._clock.sleep(self.config.launch_time_s)
        except Exception:
            if inst.live:
                inst.terminate(self._clock.now())
                self._emit(inst.state.value, inst)
                await self._tear_down(inst)
                raise
            # Terminated meanwhile: that is why the path went away under us.
        except BaseException:
            if inst.live:  # cancelled (the fleet is closing): do not leave a half-launched backend behind
                inst.terminate(self._clock.now())
                self._emit(inst.state.value, inst)
                await self._tear_down(inst)
            raise
        if inst.state is not InstanceState.LAUNCHING:
            await self._tear_down(inst)  # terminated while it booted; removes the backend if terminate() could not
            return self._failed(LaunchOutcome.ABORTED, inst.zone, inst.id)
        inst.advance(InstanceState.NETWORK_PENDING, self._clock.now())
        if not self._network.submit_launch(inst.id):
            inst.terminate(self._clock.now())
            self._emit(inst.state.value, inst)
            await self._tear_down(inst)
            return self._failed(LaunchOutcome.NETWORK_ADMISSION_REJECTED, inst.zone, inst.id)
        self._networked.add(inst.id)
        self._emit(inst.state.value, inst)
        self.outcomes[LaunchOutcome.LAUNCHED] += 1
        info = self._targets.info(inst.id)
        self._registered.add(inst.id)
        if self.on_launched is not None:
            self.on_launched(inst.id, inst.zone, info.host, info.port)
        return LaunchResult(LaunchOutcome.LAUNCHED, inst.zone, inst.id)

    async def _apply(self, instance_id: str, state: str, params: dict[str, float]) -> None:
        """The network manager's callback: set the path; "open" makes a network-pending instance running."""
        inst = self._instances.get(instance_id)
        if inst is None or not inst.live or instance_id not in self._backend_up:
            return  # terminated while its item waited: nothing left to configure
        try:
            # Any: set_path's keywords mix the path parameters (floats) with its own cut_existing flag.
            path_params: dict[str, Any] = dict(params)
            await self._targets.set_path(instance_id, state, **path_params)
        except UnknownTarget:
            return  # removed while we switched it
        if state == "open" and inst.state is InstanceState.NETWORK_PENDING:
            inst.advance(InstanceState.RUNNING, self._clock.now())
            elapsed = inst.launch_to_running()
            if elapsed is not None:
                self._to_running.observe(elapsed)
            self._emit(inst.state.value, inst)

    async def _tear_down(self, inst: Instance) -> None:
        self._release(inst)
        if inst.id in self._networked:
            self._networked.discard(inst.id)
            self._network.submit_terminate(inst.id)
        if inst.id in self._backend_up:
            self._backend_up.discard(inst.id)
            with contextlib.suppress(UnknownTarget):
                await self._targets.remove(inst.id)

    def _release(self, inst: Instance) -> None:
        # `inst.host` stays for the record; the set says whether the placement still holds it.
        if inst.id in self._placed:
            self._placed.discard(inst.id)
            self._placement.release(inst.id)

    def _next_id(self, zone: str) -> str:
        while True:  # bounded: adopted ids are finite, and each pass moves past one
            self._serial[zone] += 1
            instance_id = f"{zone}-i{self._serial[zone]}"
            if instance_id not in self._instances:
                return instance_id

    def _failed(self, outcome: LaunchOutcome, zone: str, instance_id: str | None = None) -> LaunchResult:
        self.outcomes[outcome] += 1
        self._emit_event(InstanceEvent(self._clock.now(), outcome.value, zone, instance_id))
        return LaunchResult(outcome, zone, instance_id)

    def _emit(self, kind: str, inst: Instance) -> None:
        # Every termination is emitted exactly once (terminate() refuses a second), so rule 5 hooks in here.
        if inst.state is InstanceState.TERMINATED and self._instances.get(inst.id) is inst:
            self._terminated.append(inst.id)
            while len(self._terminated) > self.config.max_terminated:
                del self._instances[self._terminated.popleft()]
                self.forgotten += 1
        self._emit_event(InstanceEvent(self._clock.now(), kind, inst.zone, inst.id))

    def _emit_event(self, event: InstanceEvent) -> None:
        self.events.append(event)
        if self.on_event is not None:
            self.on_event(event)


class _InstancesCollector(Collector):
    """Reads the fleet when scraped."""

    def __init__(self, fleet: InstanceFleet) -> None:
        self._fleet = fleet

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        return self._families(fill=True)

    def _families(self, fill: bool = False) -> Iterator[Metric]:
        by_state = GaugeMetricFamily("lbsim_instances", "Instances by lifecycle state", labels=["state"])
        launches = CounterMetricFamily(
            "lbsim_instance_launches",
            "Launch attempts by outcome (launched, insufficient_capacity, request_limit_exceeded, "
            "network_admission_rejected, aborted)",
            labels=["outcome"],
        )
        forgotten = CounterMetricFamily(
            "lbsim_instance_records_dropped",
            "Terminated instances' records dropped at the fleet's hard cap (still counted as terminated)",
        )
        if fill:
            for state, n in self._fleet.counts().items():
                by_state.add_metric([state], n)
            for outcome in LaunchOutcome:
                launches.add_metric([outcome.value], self._fleet.outcomes[outcome])
            forgotten.add_metric([], self._fleet.forgotten)
        yield from (by_state, launches, forgotten)
