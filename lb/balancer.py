"""The NLB emulator's shell: zone nodes, their checkers and listeners, the policy engine, DNS view and metrics.

Everything here is wiring. Decisions live in pure cores (`health.HealthBoard`, `policy.PolicyEngine`,
`passive.PassiveTracker`, `select`); this class feeds them events from the checkers and the proxies and applies
their answers: which targets each node routes to, which nodes DNS publishes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Literal

from prometheus_client import CollectorRegistry
from pydantic import Field

from lb.aio import cancel_and_wait
from lb.checker import CheckConfig, CheckerCapacity, NodeChecker, ProbeReport
from lb.dnsview import DnsView
from lb.health import HealthBoard, Transition
from lb.metrics import LbMetrics
from lb.passive import PassiveTracker
from lb.policy import Policy, PolicyEngine, RoutingPlan, Snapshot, TargetView, WithholdReason, ZoneMode
from lb.proxy import ConnectionReport, ConnOutcome, NodeProxy
from lb.select import FlowHashSelector, RoundRobinSelector
from lb.targets import ProbeOutcome, Target, TargetState
from simconfig import ConfigModel, Flag, Seconds, validated
from worlds.base import Clock

# Data-path outcomes that say something about the target (the others are about the client or the LB itself).
_PASSIVE_OK = {ConnOutcome.OK}
_PASSIVE_FAIL = {
    ConnOutcome.CONNECT_FAILED,
    ConnOutcome.CONNECT_TIMEOUT,
    ConnOutcome.UPSTREAM_RESET,
    ConnOutcome.NO_RESPONSE,
}


class BalancerSettings(ConfigModel):
    """A load balancer's own settings as its owner sets them, in sim seconds (NLB's defaults and ranges)."""

    cross_zone: Flag = False
    selection: Literal["flow-hash", "round-robin"] = "flow-hash"
    deregistration_delay_s: Annotated[Seconds, Field(ge=0, le=3600)] = 300.0  # AWS's default and range
    terminate_unhealthy_connections: Flag = True  # NLB default: RST live flows of an unhealthy target
    connect_timeout_s: Annotated[Seconds, Field(gt=0)] = 10.0
    # NLB's TCP idle timeout (AWS allows 60-6000 s); None: flows never time out.
    idle_timeout_s: Annotated[Seconds, Field(gt=0)] | None = 350.0


class BalancerConfig(BalancerSettings):
    """A load balancer: its settings, its zones (one node each), and each node's health check and checker."""

    zones: Annotated[tuple[str, ...], Field(min_length=1)]
    check: CheckConfig = CheckConfig()
    capacity: CheckerCapacity = CheckerCapacity()
    evaluate_interval_s: Annotated[Seconds, Field(gt=0)] = 1.0  # time-driven policies re-evaluate this often


@dataclass(frozen=True, slots=True)
class LbEvent:
    """Something the balancer did, for a run's event log."""

    at: float
    kind: str  # transition | ejected | admitted | restored | dns_removed | dns_added | mode | withheld
    subject: str
    detail: str = ""


class LoadBalancer:
    """An NLB: one node per zone, each with a health checker and an L4 listener, one shared verdict."""

    def __init__(
        self,
        config: BalancerConfig,
        clock: Clock,
        policies: Iterable[Policy],
        registry: CollectorRegistry | None = None,
        seed: int = 0,
        on_event: Callable[[LbEvent], None] | None = None,
        on_probe: Callable[[ProbeReport], None] | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.engine = PolicyEngine(policies)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = LbMetrics(self.registry)
        check = config.check
        self.board = HealthBoard(config.zones, check.healthy_threshold, check.unhealthy_threshold, check.quorum)
        self.passive = PassiveTracker()
        self.targets: dict[str, Target] = {}
        self._seed = seed
        self._on_event = on_event
        self._on_probe = on_probe
        self._selector = FlowHashSelector() if config.selection == "flow-hash" else RoundRobinSelector()
        self.checkers: dict[str, NodeChecker] = {}
        self.proxies: dict[str, NodeProxy] = {}
        self.nodes: dict[str, str] = {}  # zone -> "host:port" of its listener
        self.transition_cost = config.capacity.transition_cost
        self.dns: DnsView | None = None
        self.plan: RoutingPlan | None = None
        self._evaluator: asyncio.Task[None] | None = None
        self._dirty = asyncio.Event()
        self._known_zone_modes: dict[str, ZoneMode] = {}
        self._admitted: set[str] = set()  # targets that have been in service at least once
        self._withheld_before: frozenset[tuple[str, str, WithholdReason]] = frozenset()

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def start(
        self,
        host: str = "127.0.0.1",
        ports: Mapping[str, int] | None = None,
        hosts: Mapping[str, str] | None = None,
        same_port: bool = False,
    ) -> dict[str, str]:
        """Open one listener per zone and start every checker; return zone -> listener address.

        `hosts` gives a zone's node its own address (e.g. 127.0.1.1, 127.0.1.2 ...). With `same_port`, every node
        listens on the port the first one got, so the load balancer's name can be served as plain A records,
        one address per zone, as a real NLB's is.
        """
        shared: int | None = None
        try:
            for i, zone in enumerate(self.config.zones):
                proxy = NodeProxy(
                    zone,
                    choose=self._chooser(zone),
                    on_outcome=self._on_connection,
                    connect_timeout_s_loop=self.clock.to_loop(self.config.connect_timeout_s),
                    idle_timeout_s_loop=(
                        None if self.config.idle_timeout_s is None else self.clock.to_loop(self.config.idle_timeout_s)
                    ),
                )
                node_host = (hosts or {}).get(zone, host)
                port = await proxy.start(node_host, shared if shared is not None else (ports or {}).get(zone, 0))
                if same_port:
                    shared = port
                self.proxies[zone] = proxy
                self.nodes[zone] = f"{node_host}:{port}"
                checker = NodeChecker(
                    zone, self.clock, self.config.check, self.config.capacity, self._on_report, seed=self._seed + i
                )
                self.checkers[zone] = checker
            self.dns = DnsView(self.nodes)
            for checker in self.checkers.values():
                for target in self.targets.values():
                    checker.add_target(target)
                checker.start()
            self._evaluate()
            self._evaluator = asyncio.create_task(self._evaluate_loop(), name="lb-evaluate")
        except BaseException:
            await self.stop()
            raise
        return dict(self.nodes)

    async def stop(self) -> None:
        evaluator, self._evaluator = self._evaluator, None
        await cancel_and_wait([evaluator])
        for checker in self.checkers.values():
            await checker.stop()
        for proxy in self.proxies.values():
            await proxy.stop()
        self.checkers.clear()
        self.proxies.clear()

    # -- targets -----------------------------------------------------------------------------------------

    def register(self, target: Target, in_service: bool = False) -> None:
        """Add a target to the target group. New targets start `initial`; `in_service=True` is for targets
        that were healthy before the simulation began."""
        if target.zone not in self.config.zones:
            raise ValueError(f"target {target.id} is in zone {target.zone!r}, not one of {self.config.zones}")
        self.targets[target.id] = target
        state = TargetState.HEALTHY if in_service else TargetState.INITIAL
        self.board.register(target.id, self.clock.now(), state)
        for checker in self.checkers.values():
            checker.add_target(target)
        self._dirty.set()

    def deregister(self, target_id: str) -> None:
        if target_id not in self.targets:
            raise KeyError(target_id)
        t = self.board.deregister(target_id, self.clock.now(), self.config.deregistration_delay_s)
        for checker in self.checkers.values():
            checker.remove_target(target_id)
        if t is not None:
            self._transition(t)
        self._dirty.set()

    def set_policy_param(self, policy: str, param: str, value: object) -> None:
        """Change a running policy's parameter (an operator action such as disabling DNS failover)."""
        matches = [p for p in self.engine.policies if p.name == policy]
        if not matches:
            names = ", ".join(p.name for p in self.engine.policies) or "none"
            raise ValueError(f"no policy {policy!r} in this load balancer (it has: {names})")
        for p in matches:
            p.set_param(param, value)
        self._evaluate()

    # -- views -------------------------------------------------------------------------------------------

    def serving(self) -> frozenset[str]:
        """Targets that can receive new connections: routable from a zone node that DNS publishes."""
        if self.plan is None or self.dns is None:
            return frozenset()
        out: set[str] = set()
        for zone in self.dns.zones:
            out.update(self.plan.routable.get(zone, ()))
        return frozenset(out)

    def snapshot(self) -> Snapshot:
        now = self.clock.now()
        views = tuple(
            TargetView(
                id=tid,
                zone=t.zone,
                state=self.board.state(tid),
                since=self.board.since(tid),
                ever_healthy=self.board.served(tid),
                passive=self.passive.stats(tid, now),
            )
            for tid, t in sorted(self.targets.items())
        )
        return Snapshot(now=now, zones=self.config.zones, targets=views, cross_zone=self.config.cross_zone)

    # -- callbacks from the shells -------------------------------------------------------------------------

    def _chooser(self, zone: str) -> Callable[[tuple[str, int, int]], Target | None]:
        def choose(flow: tuple[str, int, int]) -> Target | None:
            plan = self.plan
            if plan is None:
                return None
            tid = self._selector.pick(plan.routable.get(zone, ()), flow)
            return None if tid is None else self.targets.get(tid)

        return choose

    def _on_report(self, report: ProbeReport) -> None:
        m = self.metrics
        m.probes.labels(report.node, report.outcome.value).inc()
        m.probe_lateness.labels(report.node).observe(max(0.0, report.lateness_s))
        if report.late:
            m.probes_late.labels(report.node).inc()
        else:
            m.probe_duration.labels(report.node).observe(report.duration_s)
        if self._on_probe is not None:
            self._on_probe(report)
        t = self.board.record(report.node, report.target_id, report.outcome == ProbeOutcome.SUCCESS,
                              report.finished)
        if t is not None:
            self._transition(t)
            self._evaluate()

    def _on_connection(self, report: ConnectionReport) -> None:
        m = self.metrics
        m.connections.labels(report.zone, report.outcome.value).inc()
        m.bytes.labels("up").inc(report.bytes_up)
        m.bytes.labels("down").inc(report.bytes_down)
        if report.target_id is None:
            return
        if report.outcome in _PASSIVE_OK:
            self.passive.record(report.target_id, True, self.clock.now())
        elif report.outcome in _PASSIVE_FAIL:
            self.passive.record(report.target_id, False, self.clock.now())
            self._dirty.set()

    def _transition(self, t: Transition) -> None:
        self.metrics.transitions.labels(t.old.value, t.new.value).inc()
        self._emit(LbEvent(t.at, "transition", t.target, f"{t.old.value}->{t.new.value}"))
        # AWS: every change costs the health-check subsystem re-verification and DNS work on every node.
        if self.transition_cost > 0:
            for checker in self.checkers.values():
                checker.charge(self.transition_cost)

    def set_transition_cost(self, cost: float) -> None:
        """Change what each health transition costs every node's checker, from now on (an operator action:
        with automatic DNS failover switched off, a health change no longer triggers DNS updates)."""
        self.transition_cost = validated(CheckerCapacity, {"transition_cost": cost}).transition_cost

    # -- evaluation ----------------------------------------------------------------------------------------

    async def _evaluate_loop(self) -> None:
        interval = self.config.evaluate_interval_s
        while True:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancellation that races the
            # event, which made stop() hang.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.clock.to_loop(interval)):
                    await self._dirty.wait()
            self._dirty.clear()
            for t in self.board.tick(self.clock.now()):
                self._transition(t)
                if t.new == TargetState.UNUSED:
                    self.targets.pop(t.target, None)
                    self._admitted.discard(t.target)
                    self.board.forget(t.target)
                    self.passive.forget(t.target)
            self._evaluate()

    def _evaluate(self) -> None:
        if self.dns is None:
            return
        snap = self.snapshot()
        plan = self.engine.step(snap)
        self.plan = plan
        now = snap.now
        m = self.metrics
        m.sim_time.set(now)
        # A protection holds the same target back at every step; count each hold once, when it begins (a hold
        # whose reason changes, from the floor to the budget say, begins again under the new reason).
        for policy, subject, reason in sorted(plan.withheld_subjects - self._withheld_before):
            m.withheld.labels(policy, reason.value).inc()
            self._emit(LbEvent(now, "withheld", subject, f"{policy}/{reason.value}"))
        self._withheld_before = plan.withheld_subjects
        states = {t.id: t.state for t in snap.targets}
        leaving = {TargetState.DRAINING, TargetState.UNUSED}
        # A deregistered target leaves service by draining: that is not an ejection, and its live connections
        # keep running until the deregistration delay ends.
        ejected = [tid for tid in plan.ejected if states.get(tid) not in leaving]
        for tid in ejected:
            m.ejections.inc()
            self._emit(LbEvent(now, "ejected", tid))
        for tid in plan.restored:
            if tid in self._admitted:
                m.restorations.inc()
                self._emit(LbEvent(now, "restored", tid))
            else:
                self._admitted.add(tid)
                self._emit(LbEvent(now, "admitted", tid))
        removed, added = self.dns.update(plan.dns)
        for zone in removed:
            m.dns_failovers.labels(zone).inc()
            self._emit(LbEvent(now, "dns_removed", zone))
        for zone in added:
            self._emit(LbEvent(now, "dns_added", zone))
        self._export_gauges(snap, plan)
        if self.config.terminate_unhealthy_connections and ejected:
            still_routed = {tid for ids in plan.routable.values() for tid in ids}
            for tid in ejected:
                if tid not in still_routed:
                    for proxy in self.proxies.values():
                        proxy.close_target(tid)

    def _export_gauges(self, snap: Snapshot, plan: RoutingPlan) -> None:
        """Set every gauge from the plan just made (counters are bumped where the changes are seen)."""
        assert self.dns is not None
        m = self.metrics
        published = set(self.dns.zones)
        in_service = Counter(t.zone for t in snap.targets if t.id in plan.in_service)
        by_state = Counter((t.zone, t.state) for t in snap.targets)
        for zone in self.config.zones:
            m.zone_in_dns.labels(zone).set(1 if zone in published else 0)
            mode = plan.zone_mode[zone]
            for mo in ZoneMode:
                m.zone_mode.labels(zone, mo.value).set(1 if mo == mode else 0)
            if self._known_zone_modes.get(zone, ZoneMode.NORMAL) != mode:
                self._emit(LbEvent(snap.now, "mode", zone, mode.value))
            self._known_zone_modes[zone] = mode
            m.routable.labels(zone).set(len(plan.routable.get(zone, ())))
            m.in_service.labels(zone).set(in_service[zone])
            for state in TargetState:
                m.targets.labels(zone, state.value).set(by_state[(zone, state)])
        m.zones_in_dns.set(len(published))
        for zone, checker in self.checkers.items():
            m.checker_in_flight.labels(zone).set(checker.in_flight)
        for zone, proxy in self.proxies.items():
            m.active_connections.labels(zone).set(proxy.active)

    def _emit(self, event: LbEvent) -> None:
        if self._on_event is not None:
            self._on_event(event)

    @property
    def admitted(self) -> frozenset[str]:
        """Targets that have been in service at least once."""
        return frozenset(self._admitted)

