"""Assembles the system a run drives inside a world: backends, load balancer, control plane, traffic, listeners."""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from backends.admin import AdminServer
from backends.fleet import Targets, UnknownTarget
from lb.balancer import BalancerConfig, LbEvent, LoadBalancer
from lb.checker import CheckConfig
from lb.metrics import MetricsServer
from lb.policy import Policy
from lb.targets import Target
from scenarios.controlplane import ControlPlane
from scenarios.journal import Journal
from scenarios.ports import LOOPBACK, ListenError, connect_host, url_host
from scenarios.recorder import Recorder
from scenarios.schema import Event, Scenario, ScenarioError
from scenarios.traffic import DnsCache, TrafficGenerator
from scenarios.truth import RunCollector
from worlds.base import Clock, World


def world_speed(world: World) -> float | None:
    """Sim seconds per wall second: the real world's speed; None in the simulated world, which has no wall clock."""
    return world.clock.to_sim(1.0) if world.name == "real" else None


@dataclass(frozen=True)
class Listeners:
    """Where a run listens. `ports` fixes listeners that are otherwise ephemeral: "dns" (the control plane's DNS
    server) and "node" (the zone nodes: one shared port with a control plane, node, node+1, ... without).
    `bind` (an IP literal) is where /metrics and, without a control plane, the zone nodes listen; with one the
    nodes keep their 127.0.1.N addresses (the name resolves to them), and the backends, their admin API and the
    control plane stay on loopback whatever `bind` is."""

    metrics_port: int = 0
    admin_port: int = 0
    ports: Mapping[str, int] = field(default_factory=dict)
    bind: str = LOOPBACK


class Registrar:
    """Adds targets (a backend, its network path, its registration) and picks the live ones an event names."""

    def __init__(self, fleet: Targets, lb: LoadBalancer, source: str) -> None:
        self.fleet = fleet
        self.lb = lb
        self.source = source
        self._next_index: dict[str, int] = {}

    async def add(self, zone: str, ev: Event | None = None, in_service: bool = False) -> str:
        n = self._next_index.get(zone, 0)
        self._next_index[zone] = n + 1
        tid = f"{zone}-{n}"
        host, port = await self.fleet.add(tid, zone)
        if ev is not None and ev.register_ is not None:
            # Network and backend state are set before registration: a new instance comes up as it is.
            if ev.register_.path is not None:
                p = ev.register_.path
                await self.fleet.set_path(tid, p.state, cut_existing=p.cut_existing, **p.params())
            if ev.register_.backend is not None:
                b = ev.register_.backend
                await self.fleet.set_backend(tid, b.mode, **b.params())
        self.lb.register(Target(tid, zone, host, port), in_service=in_service)
        return tid

    def select(self, ev: Event) -> list[str]:
        # Targets whose backend is gone (deregistered and drained, terminated) cannot be acted on any more.
        ids = sorted(t for t in self.lb.targets if t in self.fleet)
        if ev.zone is not None:
            ids = [t for t in ids if self.lb.targets[t].zone == ev.zone]
        if ev.targets is not None:
            unknown = sorted(set(ev.targets) - set(ids))
            if unknown:
                raise ScenarioError(f"{self.source}: event at {ev.at:g}: unknown targets {unknown}")
            wanted = set(ev.targets)
            ids = [t for t in ids if t in wanted]
        if ev.count is not None:
            ids = ids[: ev.count]
        return ids


@dataclass
class System:
    """Everything a run drives, assembled and listening (the traffic and recorder not yet started); `close`
    releases it all, in the reverse order of assembly."""

    clock: Clock
    fleet: Targets
    lb: LoadBalancer
    registrar: Registrar
    control: ControlPlane | None  # None: the scenario has no control plane
    metrics: MetricsServer
    admin: AdminServer
    recorder: Recorder | None  # None: a run without recording (record=False)
    traffic: TrafficGenerator
    nodes: dict[str, str]
    ports: dict[str, Any]
    _stack: contextlib.AsyncExitStack

    async def close(self) -> None:
        await self._stack.aclose()


def balancer_config(sc: Scenario) -> BalancerConfig:
    check = CheckConfig.from_settings(sc.health_check)
    return BalancerConfig.from_settings(sc.load_balancer, zones=tuple(sc.zones), check=check, capacity=sc.checker)


async def assemble(world: World, sc: Scenario, policies: Sequence[Policy], journal: Journal, *,
                   seed: int, source: str, listeners: Listeners, record: bool) -> System:
    """Build and start the system of `sc` in `world`; what fails part-way is released before the error propagates.

    Ports go into `journal.state.ports` as they are bound. A listener that cannot bind raises `ListenError`
    naming it ("metrics", "admin").
    """
    async with contextlib.AsyncExitStack() as stack:
        system = await _assemble(world, sc, policies, journal, stack, seed=seed, source=source, listeners=listeners,
                                 record=record)
        system._stack = stack.pop_all()
        return system
    raise AssertionError("unreachable")  # pragma: no cover - the stack re-raises what failed


async def _assemble(world: World, sc: Scenario, policies: Sequence[Policy], journal: Journal,
                    stack: contextlib.AsyncExitStack, *, seed: int, source: str, listeners: Listeners,
                    record: bool) -> System:
    clock = world.clock
    state = journal.state
    lb_registry = CollectorRegistry()
    fleet = Targets(clock=clock, seed=seed, capacity_per_s=sc.backend_capacity_per_s,
                    flap_can_serve_below=sc.ground_truth.flap_can_serve_below)
    stack.push_async_callback(fleet.close)
    retiring: set[asyncio.Task[None]] = set()

    async def retire(tid: str) -> None:
        with contextlib.suppress(UnknownTarget):  # a terminated instance's backend is already gone
            await fleet.remove(tid)

    def on_lb_event(ev: LbEvent) -> None:
        journal.on_lb_event(ev)
        if ev.kind == "transition" and ev.detail.endswith("->unused"):
            # The load balancer has forgotten the target; release its backend and network path too, so a run
            # with churn does not hold every socket it ever opened.
            task = asyncio.create_task(retire(ev.subject), name=f"retire-{ev.subject}")
            retiring.add(task)
            task.add_done_callback(retiring.discard)

    lb = LoadBalancer(balancer_config(sc), clock, list(policies), lb_registry, seed=seed, on_event=on_lb_event,
                      on_probe=journal.on_probe)
    cp_registry = CollectorRegistry()
    run_registry = CollectorRegistry()
    run_registry.register(RunCollector(lambda: state.last_row, state.client_outcomes))
    metrics = MetricsServer(lb_registry, fleet.registry, cp_registry, run_registry)
    admin = AdminServer(fleet, port=listeners.admin_port)
    stack.push_async_callback(admin.stop)
    stack.push_async_callback(metrics.stop)
    stack.push_async_callback(lb.stop)
    registrar = Registrar(fleet, lb, source)
    for zone in sc.zones:
        for _ in range(sc.targets_per_zone):
            await registrar.add(zone, None, in_service=sc.start_in_service)
    clock.restart()  # setting up many targets takes wall time the scenario must not lose
    fixed = listeners.ports.get("node", 0)
    if sc.control_plane is None:
        nodes = await lb.start(host=listeners.bind,
                               ports={z: fixed + i for i, z in enumerate(sc.zones)} if fixed else None)
    else:
        # Each zone's node on its own address and all on one port: the name is served as A records.
        hosts = {z: f"127.0.1.{i + 1}" for i, z in enumerate(sc.zones)}
        nodes = await lb.start(hosts=hosts, same_port=True, ports={sc.zones[0]: fixed})
    state.ports["nodes"] = nodes

    def resolve() -> tuple[str, ...]:
        assert lb.dns is not None  # set by lb.start
        return lb.dns.addresses()

    control: ControlPlane | None = None
    if sc.control_plane is not None:
        def on_launched(tid: str, zone: str, host: str, port: int) -> None:
            lb.register(Target(tid, zone, host, port), in_service=False)
            journal.log(clock.now(), "registered", tid, {"zone": zone})

        def on_terminated(tid: str) -> None:
            if tid in lb.targets:
                lb.deregister(tid)

        control = ControlPlane(
            sc, clock, fleet, cp_registry, lb_addresses=lambda: list(resolve()), on_launched=on_launched,
            on_terminated=on_terminated, on_event=journal.on_cp_event, dns_port=listeners.ports.get("dns", 0),
            seed=seed,
        )
        stack.push_async_callback(control.close)
        await control.start([(t.id, t.zone) for t in lb.targets.values()])
        assert control.dns is not None
        state.ports["dns"] = control.dns.port
    # Checked free before the run (check_free), a port can still be taken meanwhile: say which one it was.
    try:
        state.ports["metrics"] = await metrics.start(listeners.bind, listeners.metrics_port)
    except OSError as e:
        raise ListenError("metrics", e) from e
    try:
        state.ports["admin"] = await admin.start()
    except OSError as e:
        raise ListenError("admin", e) from e
    # Everything the report's time series holds is what a Prometheus server would have scraped.
    # A scrape gets at least half a wall second: at a high speed half an interval is too short a
    # time for a busy loop to answer, and a missed scrape is a hole in the series.
    recorder: Recorder | None = None
    if record:
        scrape_host = url_host(connect_host(listeners.bind))
        recorder = Recorder(
            clock, {"lbsim": f"http://{scrape_host}:{state.ports['metrics']}/metrics"},
            sc.record_interval_s, timeout_s=max(sc.record_interval_s / 2, clock.to_sim(0.5)),
        )
    cache = DnsCache(resolve, sc.traffic.dns_ttl_s)
    node_port = int(next(iter(nodes.values())).rpartition(":")[2])

    async def lookup(now: float) -> tuple[str, ...]:
        if control is not None:
            return tuple(await control.lookup_lb(node_port))
        return cache.lookup(now)

    traffic = TrafficGenerator(
        clock, lookup, sc.traffic.rate_per_s, sc.traffic.path, sc.traffic.timeout_s,
        sc.traffic.max_outstanding, seed, state.add_request,
    )
    stack.push_async_callback(traffic.stop)

    async def wait_retiring() -> None:
        if retiring:
            await asyncio.gather(*retiring, return_exceptions=True)

    stack.push_async_callback(wait_retiring)
    system = System(world.clock, fleet, lb, registrar, control, metrics, admin, recorder, traffic, nodes,
                    state.ports, contextlib.AsyncExitStack())
    if recorder is not None:
        weakref.finalize(system, recorder.close)
    return system
