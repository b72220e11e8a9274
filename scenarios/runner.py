"""Runs one scenario: real backends behind network paths, the NLB emulator, client traffic and the timeline."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import csv
import json
import math
import random
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml
from prometheus_client import CollectorRegistry

from backends.admin import AdminServer
from backends.controlplane.hostmanager import RecoveryQueue
from backends.fleet import Targets, UnknownTarget
from lb.aio import cancel_and_wait
from lb.balancer import BalancerConfig, LbEvent, LoadBalancer
from lb.checker import CheckConfig, ProbeReport
from lb.metrics import MetricsServer
from lb.policies import POLICY_TYPES, PolicyError, make_policy, parse_policy_spec, split_top
from lb.policy import Policy
from lb.targets import Target
from scenarios.controlplane import LEASE_STORE_NAME, ControlPlane
from scenarios.outcomes import (
    CapacityTally,
    EventTally,
    ModeTally,
    RecoveryTally,
    RequestTally,
    Sample,
    percentile,
)
from scenarios.ports import LOOPBACK, ListenError, connect_host, url_host
from scenarios.recorder import Recorder, Selector, pivot
from scenarios.schema import Event, HostManagerSpec, Scenario, ScenarioError
from scenarios.stages import StageRules, detect_stages
from scenarios.traffic import DnsCache, RequestResult, TrafficGenerator
from scenarios.truth import RunCollector
from worlds.clock import ScaledClock

# Lateness samples kept for the p99: a bounded reservoir, so a long run cannot grow memory without limit.
_LATENESS_RESERVOIR = 20000
# Events kept in memory (and so in events.jsonl): far more than a scenario logs, but a run that never ends
# (`lbsim serve`) must not keep every health transition it ever saw. Later ones are counted, not kept.
MAX_EVENTS = 200_000


SCENARIO_POLICY = "scenario"


def expand_policy_entries(
    entries: list[str | dict[str, Any]], scenario_entries: list[str | dict[str, Any]]
) -> list[str | dict[str, Any]]:
    """Replace the term `scenario` in string entries by the scenario's own policy list, so that
    `--policy scenario+velocity` means "the scenario's configuration with velocity control added"."""
    out: list[str | dict[str, Any]] = []
    for entry in entries:
        if not isinstance(entry, str):
            out.append(entry)
            continue
        rest: list[str] = []
        for term in (t.strip() for t in split_top(entry, "+")):
            if term == SCENARIO_POLICY:
                if rest:
                    out.append("+".join(rest))
                    rest = []
                out.extend(scenario_entries)
            else:
                rest.append(term)
        if rest:
            out.append("+".join(rest))
    return out


# What the stage detector reads, as Prometheus series (scenarios/stages.py names the columns).
_STAGE_SELECTORS: dict[str, Selector] = {
    "cp_record": Selector("lbsim_dns_record_addresses", {"endpoint": LEASE_STORE_NAME}, default=float("nan")),
    "dns_inconsistent": Selector("lbsim_dns_inconsistent", default=float("nan")),
    "hosts_leased": Selector("lbsim_host_leases", {"state": "leased"}, default=float("nan")),
    "recovery_depth": Selector("lbsim_host_recovery_queue_depth", default=float("nan")),
    "recovery_goodput_total": Selector("lbsim_host_recovery_goodput_total", default=float("nan")),
    "recovery_timeouts_total": Selector("lbsim_host_recovery_timeouts_total", default=float("nan")),
    "net_backlog": Selector("lbsim_netmanager_backlog", default=float("nan")),
    "zones_in_dns": Selector("lbsim_zones_in_dns", default=float("nan")),
    "false_out": Selector("lbsim_truth_targets", {"set": "false_out"}, default=0.0),
    "_down": Selector("lbsim_health_transitions_total", {"from_state": "healthy", "to_state": "unhealthy"}),
    "_up": Selector("lbsim_health_transitions_total", {"from_state": "unhealthy", "to_state": "healthy"}),
}


def stage_columns(recorder: Recorder, zones: Sequence[str]) -> list[dict[str, float]]:
    """The recorded series pivoted into the stage detector's columns; columns a run does not have are left out
    (a run without a control plane has no `cp_record`)."""
    selectors = dict(_STAGE_SELECTORS)
    for zone in zones:
        selectors[f"zone_in_dns:{zone}"] = Selector("lbsim_zone_in_dns", {"zone": zone}, default=float("nan"))
        # The fleet exports a zone only while it has targets: none there is none that could serve.
        selectors[f"can_serve:{zone}"] = Selector("lbsim_targets_can_serve", {"zone": zone})
    rows = pivot(recorder.rows(), selectors, times=recorder.scrape_times)
    present = {k for row in rows for k, v in row.items() if v == v}  # NaN marks "never scraped"
    out: list[dict[str, float]] = []
    previous: dict[str, float] = {}
    for row in rows:
        # A scrape that failed leaves a hole; the value before it stands, as a Prometheus graph would draw it.
        row = {k: previous.get(k, v) if v != v else v for k, v in row.items()}
        previous = row
        r = {k: v for k, v in row.items() if k in present and not k.startswith("_")}
        r["transitions_total"] = row["_down"] + row["_up"]
        r["transitions_down_total"], r["transitions_up_total"] = row["_down"], row["_up"]
        out.append(r)
    return out


def full_queue_depth(hm: HostManagerSpec) -> float:
    """The recovery queue's depth from which it is full: no item started there finishes before its timeout (the
    host manager's rule 6, without store latency), or its configured admission limit or hard cap if lower."""
    queue = RecoveryQueue(hm.workers, hm.item_timeout_s, hm.base_service_s, hm.per_depth_s)
    limit = min(queue.collapse_depth(), hm.max_depth or math.inf, hm.hard_cap)
    return max(1.0, limit)


def build_policies(entries: list[str | dict[str, Any]], source: str) -> list[Policy]:
    """Turn a scenario's or the CLI's policy entries into policy objects; errors name where they came from."""
    out: list[Policy] = []
    for i, entry in enumerate(entries):
        try:
            if isinstance(entry, str):
                out.extend(parse_policy_spec(entry))
            else:
                params = dict(entry)
                name = params.pop("name", None)
                if not isinstance(name, str):
                    raise PolicyError("a policy given as a mapping needs a `name`")
                out.append(make_policy(name, params))
        except PolicyError as e:
            raise ScenarioError(f"{source}: policy[{i}]: {e}") from None
    return out


def policy_label(entries: list[str | dict[str, Any]]) -> str:
    parts = []
    for e in entries:
        parts.append(e if isinstance(e, str) else str(e.get("name", "?")))
    return "+".join(parts) or "naive"


@dataclass
class RunState:
    """Everything recorded during a run; what the run directory and summary are made of.

    Memory stays bounded by `max_events` events and one small row per sample: requests are tallied as they come
    and spooled to a temporary file, and capacity is added up sample by sample. Events past `max_events` are
    counted in `events_dropped` and not kept, but still go into the event metrics (`event_tally`).
    """

    capacity: CapacityTally = field(default_factory=CapacityTally)
    recovery: RecoveryTally = field(default_factory=RecoveryTally)
    modes: ModeTally = field(default_factory=ModeTally)
    requests: RequestTally = field(default_factory=RequestTally)
    timeseries: list[dict[str, float]] = field(default_factory=list)
    # Spooled to disk rather than held in memory; closed (and so deleted) once the run directory is written.
    request_log: IO[str] = field(default_factory=lambda: tempfile.TemporaryFile("w+", newline=""))  # noqa: SIM115
    events: list[dict[str, Any]] = field(default_factory=list)  # the first max_events; add with add_event
    max_events: int = MAX_EVENTS
    events_dropped: int = 0
    event_tally: EventTally = field(default_factory=EventTally)
    lateness: list[float] = field(default_factory=list)
    loop_lag: list[float] = field(default_factory=list)  # sim seconds
    probes_seen: int = 0
    ports: dict[str, Any] = field(default_factory=dict)
    client_outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    stage_rows: list[dict[str, float]] | None = None  # from the recorder, once the run has ended
    last_row: dict[str, float] = field(default_factory=dict)
    # False keeps only tallies and the latest row (no per-request or per-sample rows), for a run that never ends.
    keep_rows: bool = True

    def __post_init__(self) -> None:
        if self.max_events < 1:
            self.request_log.close()
            raise ValueError(f"max_events must be >= 1, got {self.max_events}")
        # A run that is never written (a test, an embedding program) still closes its spool when it goes away.
        weakref.finalize(self, self.request_log.close)

    def add_event(self, entry: dict[str, Any]) -> None:
        """Tally every event; keep the first `max_events` (the start of the story, with the timeline's first
        events, is what events.jsonl is read for) and count the rest."""
        self.event_tally.add(entry["kind"], entry["subject"], entry.get("detail", ""))
        if len(self.events) < self.max_events:
            self.events.append(entry)
        else:
            self.events_dropped += 1

    def add_request(self, r: RequestResult) -> None:
        self.requests.add(r.started, r.latency_s, r.ok)
        self.client_outcomes[r.error or "ok"] += 1
        if self.keep_rows:
            self.request_log.write(f"{r.started:.4f},{r.latency_s:.5f},{int(r.ok)},{r.error}\n")

    def add_sample(self, s: Sample, extra: dict[str, float]) -> None:
        self.capacity.add(s)
        self.recovery.add(s)
        false_out = len((s.can_serve & s.admitted & s.registered) - s.routed)
        row: dict[str, float] = {
            "t": round(s.t, 3), "registered": len(s.registered), "routed": len(s.routed), "serving": len(s.serving),
            "can_serve": len(s.can_serve), "false_out": false_out, "missed_in": len(s.serving - s.can_serve),
        }
        row.update(extra)
        if self.keep_rows:
            self.timeseries.append(row)
        self.last_row = row


@dataclass(frozen=True)
class Progress:
    sim_time: float
    duration: float
    serving: int
    registered: int
    zones_in_dns: int
    requests: int
    failed: int


class ScenarioRun:
    """One run of one scenario with one policy list and one seed."""

    def __init__(
        self,
        scenario: Scenario,
        policy_entries: list[str | dict[str, Any]] | None = None,
        *,
        source: str = "scenario",
        speed: float | None = None,
        seed: int | None = None,
        metrics_port: int = 0,
        admin_port: int = 0,
        on_progress: Callable[[Progress], None] | None = None,
        on_started: Callable[[dict[str, Any]], None] | None = None,
        ports: Mapping[str, int] | None = None,
        record: bool = True,
        bind: str = LOOPBACK,
    ) -> None:
        """`ports` fixes listeners that are otherwise ephemeral: "dns" (the control plane's DNS server) and
        "node" (the zone nodes: one shared port with a control plane, node, node+1, ... without). `record=False`
        runs no recorder and keeps no per-request or per-sample rows, so a run that never ends stays bounded.
        `bind` (an IP literal) is where /metrics and, without a control plane, the zone nodes listen; with one the
        nodes keep their 127.0.1.N addresses (the name resolves to them), and the backends, their admin API and
        the control plane stay on loopback whatever `bind` is.

        A listener that cannot bind raises `ListenError` naming it ("metrics", "admin")."""
        self.scenario = scenario
        self.policy_entries = expand_policy_entries(list(policy_entries), list(scenario.policy)) \
            if policy_entries else list(scenario.policy)
        # Named as the user asked for it ("scenario+velocity"), not as expanded.
        self.policy_name = policy_label(list(policy_entries) if policy_entries else self.policy_entries)
        self.policies = build_policies(self.policy_entries, source)
        names = {p.name for p in self.policies}
        for i, ev in enumerate(scenario.timeline):
            # An operator switch of a policy this run does not have (the scenario's failover switch in a run
            # with --policy naive) has nothing to switch and is skipped; a name no policy has is a mistake.
            if ev.set_policy is not None and ev.set_policy.policy not in names | set(POLICY_TYPES):
                raise ScenarioError(
                    f"{source}: timeline[{i}].set_policy.policy = {ev.set_policy.policy!r} is not among this run's "
                    f"policies ({', '.join(sorted(names)) or 'none'}) nor a known policy"
                )
        self.source = source
        self.speed = speed if speed is not None else scenario.speed
        self.seed = seed if seed is not None else scenario.seed
        self.metrics_port = metrics_port
        self.admin_port = admin_port
        self.on_progress = on_progress
        self.on_started = on_started
        self.ports = dict(ports or {})
        self.record = record
        self.bind = bind
        self.state = RunState(keep_rows=record)
        self.complete = False
        self.last_applied: dict[str, Any] = {}  # the log entry of the latest applied event (see apply)
        self.started_wall = 0.0
        self.end_sim = 0.0
        self._rng = random.Random(self.seed)
        self._next_index: dict[str, int] = {}
        self._lag_seen = 0
        self._retiring: set[asyncio.Task[None]] = set()
        self.lb: LoadBalancer | None = None
        self.fleet: Targets | None = None
        self.control: ControlPlane | None = None
        self.recorder: Recorder | None = None
        self._transitions: collections.Counter[str] = collections.Counter()  # healthy <-> unhealthy

    # -- the run -----------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> dict[str, Any]:
        """Run to the scenario's end or until `stop` is set; always release everything and return a summary."""
        sc = self.scenario
        clock = ScaledClock(self.speed)
        self.clock = clock
        self.started_wall = time.monotonic()
        stop = stop or asyncio.Event()
        lb_registry = CollectorRegistry()
        self.fleet = Targets(
            clock=clock, seed=self.seed, capacity_per_s=sc.backend_capacity_per_s,
            flap_can_serve_below=sc.ground_truth.flap_can_serve_below,
        )
        self.lb = LoadBalancer(self._balancer_config(), clock, self.policies, lb_registry, seed=self.seed,
                               on_event=self._on_lb_event, on_probe=self._on_probe)
        cp_registry = CollectorRegistry()
        run_registry = CollectorRegistry()
        run_registry.register(RunCollector(self._latest_row, self.state.client_outcomes))
        metrics = MetricsServer(lb_registry, self.fleet.registry, cp_registry, run_registry)
        recorder: Recorder | None = None
        admin = AdminServer(self.fleet, port=self.admin_port)
        traffic: TrafficGenerator | None = None
        tasks: list[asyncio.Task[None]] = []
        try:
            for zone in sc.zones:
                for _ in range(sc.targets_per_zone):
                    await self._add_target(zone, None, in_service=sc.start_in_service)
            clock.restart()  # setting up many targets takes wall time the scenario must not lose
            fixed = self.ports.get("node", 0)
            if sc.control_plane is None:
                nodes = await self.lb.start(host=self.bind,
                                            ports={z: fixed + i for i, z in enumerate(sc.zones)} if fixed else None)
            else:
                # Each zone's node on its own address and all on one port: the name is served as A records.
                hosts = {z: f"127.0.1.{i + 1}" for i, z in enumerate(sc.zones)}
                nodes = await self.lb.start(hosts=hosts, same_port=True, ports={sc.zones[0]: fixed})
            self.state.ports["nodes"] = nodes
            if sc.control_plane is not None:
                self.control = ControlPlane(
                    sc, clock, self.fleet, cp_registry, lb_addresses=lambda: list(self._resolve()),
                    on_launched=self._on_launched, on_terminated=self._on_terminated, on_event=self._on_cp_event,
                    dns_port=self.ports.get("dns", 0), seed=self.seed,
                )
                await self.control.start([(t.id, t.zone) for t in self.lb.targets.values()])
                assert self.control.dns is not None
                self.state.ports["dns"] = self.control.dns.port
            # Checked free before the run (check_free), a port can still be taken meanwhile: say which one it was.
            try:
                self.state.ports["metrics"] = await metrics.start(self.bind, self.metrics_port)
            except OSError as e:
                raise ListenError("metrics", e) from e
            try:
                self.state.ports["admin"] = await admin.start()
            except OSError as e:
                raise ListenError("admin", e) from e
            # Everything the report's time series holds is what a Prometheus server would have scraped.
            # A scrape gets at least half a wall second: at a high speed half an interval is too short a
            # time for a busy loop to answer, and a missed scrape is a hole in the series.
            if self.record:
                scrape_host = url_host(connect_host(self.bind))
                recorder = self.recorder = Recorder(
                    clock, {"lbsim": f"http://{scrape_host}:{self.state.ports['metrics']}/metrics"},
                    sc.record_interval_s, timeout_s=max(sc.record_interval_s / 2, clock.to_sim(0.5)),
                )
                weakref.finalize(self, recorder.close)
                recorder.start()
            if self.on_started is not None:
                self.on_started(dict(self.state.ports))
            cache = DnsCache(self._resolve, sc.traffic.dns_ttl_s)
            control = self.control
            node_port = int(next(iter(nodes.values())).rpartition(":")[2])

            async def lookup(now: float) -> tuple[str, ...]:
                if control is not None:
                    return tuple(await control.lookup_lb(node_port))
                return cache.lookup(now)

            traffic = TrafficGenerator(
                clock, lookup, sc.traffic.rate_per_s, sc.traffic.path, sc.traffic.timeout_s,
                sc.traffic.max_outstanding, self.seed, self.state.add_request,
            )
            traffic.start(until=sc.duration_s)
            timeline = asyncio.create_task(self._timeline(), name="timeline")
            tasks.append(timeline)
            tasks.append(asyncio.create_task(self._sampler(), name="sampler"))
            tasks.append(asyncio.create_task(self._lag_monitor(), name="loop-lag"))
            done = asyncio.create_task(clock.sleep_until(sc.duration_s))
            stopped = asyncio.create_task(stop.wait())
            waiting = {done, stopped, timeline}
            while not (done.done() or stopped.done()):
                finished, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if timeline in finished:
                    waiting.discard(timeline)
                    if timeline.exception() is not None:
                        raise timeline.exception()  # type: ignore[misc]
            if done.done() and not stopped.done():
                # Requests still in flight at the end are part of the run: wait for their verdicts (each is
                # bounded by its timeout), or a failing end would look better than it was.
                drain = asyncio.create_task(traffic.wait())
                await asyncio.wait({drain, stopped}, return_when=asyncio.FIRST_COMPLETED)
                await cancel_and_wait([drain])
            await cancel_and_wait([done, stopped])
            self.complete = not stop.is_set()
        finally:
            self.end_sim = min(clock.now(), sc.duration_s)
            await cancel_and_wait(tasks)
            if recorder is not None:
                await recorder.stop()
                await recorder.scrape_once()  # the final state, before anything is torn down
                self.state.stage_rows = stage_columns(recorder, sc.zones)
            if self._retiring:
                await asyncio.gather(*self._retiring, return_exceptions=True)
            if traffic is not None:
                await traffic.stop()
            if self.control is not None:
                await self.control.close()
            await self.lb.stop()
            await metrics.stop()
            await admin.stop()
            await self.fleet.close()
        return self.summary()

    def _balancer_config(self) -> BalancerConfig:
        sc = self.scenario
        check = CheckConfig.from_settings(sc.health_check)
        return BalancerConfig.from_settings(sc.load_balancer, zones=tuple(sc.zones), check=check, capacity=sc.checker)

    def _resolve(self) -> tuple[str, ...]:
        assert self.lb is not None and self.lb.dns is not None
        return self.lb.dns.addresses()

    async def _add_target(self, zone: str, ev: Event | None, in_service: bool = False) -> str:
        assert self.fleet is not None and self.lb is not None
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

    def _select(self, ev: Event) -> list[str]:
        assert self.lb is not None and self.fleet is not None
        # Targets whose backend is gone (deregistered and drained, terminated) cannot be acted on any more.
        fleet = self.fleet
        ids = sorted(t for t in self.lb.targets if t in fleet)
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

    async def apply(self, ev: Event) -> list[str]:
        """Carry out one timeline event now; return the targets it touched.

        Its log entry's `applied_at` says when each change had taken effect (sim s): by target for an event that
        changes targets, else by the event's action."""
        assert self.fleet is not None and self.lb is not None
        touched: list[str] = []
        # Logged before it takes effect, so its consequences follow it in events.jsonl.
        entry = self._log(self.clock.now(), "timeline", ev.action,
                          {"at": ev.at, "note": ev.note,
                           "spec": ev.model_dump(exclude_none=True, by_alias=True, exclude={"at", "note"})})
        self.last_applied = entry  # what serve's admin API answers with, even once events.jsonl stops keeping
        applied: dict[str, float] = {}
        if ev.register_ is not None:
            assert ev.zone is not None
            # One after another, so that targets register in the same order in every run. A new instance's
            # start (a backend and a path to open) is not a change of a running target.
            for _ in range(ev.register_.count):
                tid = await self._add_target(ev.zone, ev)
                touched.append(tid)
                applied[tid] = self._applied_now()
        elif ev.checker is not None:
            self.lb.set_transition_cost(ev.checker.transition_cost)
            applied[ev.action] = self._applied_now()
        elif ev.control is not None:
            if self.control is None:  # the schema refuses this; a caller building events by hand may not
                raise ScenarioError(f"{self.source}: event at {ev.at:g} needs a control plane")
            entry.update(await self.control.apply(ev.control))
            applied[ev.action] = self._applied_now()
        elif ev.set_policy is not None:
            sp = ev.set_policy
            if sp.policy not in {p.name for p in self.policies}:
                entry["skipped"] = f"no {sp.policy} policy in this run"
                return touched
            try:
                self.lb.set_policy_param(sp.policy, sp.param, sp.value)
            except (ValueError, PolicyError) as e:
                raise ScenarioError(f"{self.source}: event at {ev.at:g}: {e}") from None
            applied[ev.action] = self._applied_now()
        else:
            touched = self._select(ev)
            applied = await self._change_targets(ev, touched)
        entry["targets"] = touched
        entry["applied_at"] = applied
        return touched

    async def _change_targets(self, ev: Event, tids: list[str]) -> dict[str, float]:
        """Make a path, backend or deregister event's change to every target together; return when each one had
        taken effect (sim s).

        The changes start in one loop iteration, in `tids` order, and none waits on wall time (a path's change
        is complete before `NetPath.set_state` first yields): applied one after another, each later target
        would be changed as late as the earlier targets' changes took, which grows with the speed."""
        fleet, lb = self.fleet, self.lb
        assert fleet is not None and lb is not None
        applied: dict[str, float] = {}

        async def change(tid: str) -> None:
            if ev.path is not None:
                await fleet.set_path(tid, ev.path.state, cut_existing=ev.path.cut_existing, **ev.path.params())
            elif ev.backend is not None:
                await fleet.set_backend(tid, ev.backend.mode, **ev.backend.params())
            elif ev.deregister:
                lb.deregister(tid)
            applied[tid] = self._applied_now()

        await asyncio.gather(*(change(tid) for tid in tids))
        return {tid: applied[tid] for tid in tids}

    def _applied_now(self) -> float:
        return round(self.clock.now(), 4)

    async def _timeline(self) -> None:
        for ev in sorted(self.scenario.timeline, key=lambda e: e.at):
            await self.clock.sleep_until(ev.at)
            await self.apply(ev)

    async def _sampler(self) -> None:
        interval = self.scenario.sample_interval_s
        next_t = self.clock.now()
        while True:
            self._sample()
            next_t += interval
            await self.clock.sleep_until(next_t)

    async def _lag_monitor(self) -> None:
        """Measure how late the event loop wakes up. Everything shares one loop, so when it lags, probes and
        requests time out for the simulator's sake, not the scenario's: the summary and CLI say so."""
        period_wall = 0.02
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(period_wall)
            lag = max(0.0, loop.time() - before - period_wall)
            self._reservoir(self.state.loop_lag, self.clock.to_sim(lag), self._lag_seen)
            self._lag_seen += 1

    def _sample(self) -> None:
        assert self.lb is not None and self.fleet is not None and self.lb.plan is not None
        lb = self.lb
        plan = lb.plan
        assert plan is not None
        registered = frozenset(t.id for t in lb.snapshot().registered())
        routed = frozenset(t for ids in plan.routable.values() for t in ids)
        can = frozenset(t for t in registered if self.fleet.can_serve(t))
        s = Sample(self.clock.now(), registered, routed, lb.serving(), can, lb.admitted)
        if s.t < self.scenario.duration_s:
            extra = {"zones_in_dns": float(len(lb.dns.zones) if lb.dns else 0),
                     "transitions_total": float(self._transitions.total()),
                     "transitions_down_total": float(self._transitions["healthy->unhealthy"]),
                     "transitions_up_total": float(self._transitions["unhealthy->healthy"])}
            if self.control is not None:
                extra.update(self.control.sample())
            self.state.add_sample(s, extra)
        if self.on_progress is not None:
            req = self.state.requests
            self.on_progress(Progress(s.t, self.scenario.duration_s, len(s.serving & registered), len(registered),
                                      len(lb.dns.zones) if lb.dns else 0, req.total, req.failed))

    # -- recording ---------------------------------------------------------------------------------------

    def _on_lb_event(self, ev: LbEvent) -> None:
        self._log(ev.at, ev.kind, ev.subject, {"detail": ev.detail} if ev.detail else {})
        if ev.kind == "mode":
            self.state.modes.add(ev.at, ev.subject, ev.detail)
        if ev.kind == "transition" and ev.detail in ("healthy->unhealthy", "unhealthy->healthy"):
            self._transitions[ev.detail] += 1
        if ev.kind == "transition" and ev.detail.endswith("->unused") and self.fleet is not None:
            # The load balancer has forgotten the target; release its backend and network path too, so a run
            # with churn does not hold every socket it ever opened.
            task = asyncio.create_task(self._retire(ev.subject), name=f"retire-{ev.subject}")
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def _retire(self, tid: str) -> None:
        assert self.fleet is not None
        with contextlib.suppress(UnknownTarget):  # a terminated instance's backend is already gone
            await self.fleet.remove(tid)

    def _on_launched(self, tid: str, zone: str, host: str, port: int) -> None:
        assert self.lb is not None
        self.lb.register(Target(tid, zone, host, port), in_service=False)
        self._log(self.clock.now(), "registered", tid, {"zone": zone})

    def _on_terminated(self, tid: str) -> None:
        assert self.lb is not None
        if tid in self.lb.targets:
            self.lb.deregister(tid)

    def _on_cp_event(self, kind: str, subject: str, data: dict[str, Any]) -> None:
        extra = {k: v for k, v in data.items() if k != "at"}
        self._log(float(data.get("at", self.clock.now())), kind, subject, extra)

    def _latest_row(self) -> dict[str, float]:
        return self.state.last_row

    def _on_probe(self, report: ProbeReport) -> None:
        st = self.state
        self._reservoir(st.lateness, max(0.0, report.lateness_s), st.probes_seen)
        st.probes_seen += 1

    def _reservoir(self, values: list[float], value: float, seen: int) -> None:
        """Keep a uniform sample of at most _LATENESS_RESERVOIR values of a stream (`seen` before this one)."""
        if len(values) < _LATENESS_RESERVOIR:
            values.append(value)
        else:
            j = self._rng.randrange(seen + 1)
            if j < _LATENESS_RESERVOIR:
                values[j] = value

    def _log(self, at: float, kind: str, subject: str, extra: dict[str, Any]) -> dict[str, Any]:
        entry = {"t": round(at, 4), "kind": kind, "subject": subject, **extra}
        self.state.add_event(entry)
        return entry

    # -- results -----------------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        st = self.state
        out: dict[str, Any] = {
            "scenario": self.scenario.name,
            "policy": self.policy_name,
            "policies": [p.describe() for p in self.policies],
            "seed": self.seed,
            "speed": self.speed,
            "duration_s": round(self.end_sim, 3),
            "complete": self.complete,
        }
        out.update(st.requests.result())
        out.update(st.capacity.result(self.end_sim))
        out.update(st.event_tally.result())  # every event, kept or dropped
        out["withheld_by_reason"] = st.event_tally.withheld_by_reason()
        out["events_dropped"] = st.events_dropped
        out.update(st.recovery.result())
        out.update(st.modes.result(self.end_sim))
        out["checker_lateness_p99_s"] = percentile(st.lateness, 99)
        out["probes_total"] = st.probes_seen
        out["loop_lag_p99_s"] = percentile(st.loop_lag, 99)
        out["fidelity_ok"] = self.fidelity_ok(out["loop_lag_p99_s"])
        # From the recorded (scraped) series; a run that ended before its recorder ran has only its samples.
        rows = st.stage_rows if st.stage_rows else st.timeseries
        out["stages"] = [g.to_json() for g in detect_stages(rows, self.stage_rules(), self.end_sim)]
        return out

    def stage_rules(self) -> StageRules:
        sc = self.scenario
        cp = sc.control_plane
        return StageRules(
            zones=len(sc.zones),
            hosts=cp.host_manager.hosts if cp is not None else 0,
            # Items timing out for three item timeouts: every item in flight timed out at least once meanwhile.
            collapse_window_s=3 * cp.host_manager.item_timeout_s if cp is not None else 30.0,
            full_depth=full_queue_depth(cp.host_manager) if cp is not None else 1.0,
            # An item times out one item timeout after it starts; the scrapes see it up to an interval later.
            timeout_window_s=(cp.host_manager.item_timeout_s if cp is not None else 10.0) + 2 * sc.record_interval_s,
            # Three health transitions within five check intervals is more than one failure explains; the
            # window spans at least two of the recorder's scrapes, which is what it is measured on.
            flap_window_s=max(5 * sc.health_check.interval_s, 2 * sc.record_interval_s),
        )

    def fidelity_ok(self, lag_p99_s: float | None) -> bool:
        """A run is faithful while the loop's lag stays under a tenth of the shortest timeout it models."""
        sc = self.scenario
        return lag_p99_s is None or lag_p99_s < 0.1 * min(sc.health_check.timeout_s, sc.traffic.timeout_s)

    def write(self, out_dir: Path, summary: dict[str, Any]) -> None:
        """Write the run directory: resolved scenario, summary, events, and the sampled time series."""
        out_dir.mkdir(parents=True, exist_ok=True)
        resolved = self.scenario.model_dump(mode="json", by_alias=True)
        resolved.update({"policy": self.policy_entries, "speed": self.speed, "seed": self.seed})
        (out_dir / "scenario.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        with (out_dir / "events.jsonl").open("w") as f:
            for e in self.state.events:
                f.write(json.dumps(e) + "\n")
        with (out_dir / "samples.csv").open("w", newline="") as f:
            rows = self.state.timeseries
            w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["t"])
            w.writeheader()
            w.writerows(rows)
        if self.recorder is not None:
            self.recorder.write_csv(out_dir / "timeseries.csv")
            self.recorder.write_parquet(out_dir / "timeseries.parquet")  # only where pyarrow is installed
        log = self.state.request_log
        log.flush()
        log.seek(0)
        with (out_dir / "requests.csv").open("w", newline="") as f:
            f.write("started,latency_s,ok,error\n")
            shutil.copyfileobj(log, f)
        log.seek(0, 2)  # back to the end, should the run be written again

