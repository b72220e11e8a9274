"""Runs one scenario in a world: assembles the system, plays the timeline, samples, and writes the results."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lb.aio import cancel_and_wait
from lb.policies import POLICY_TYPES, PolicyError, make_policy, parse_policy_spec, split_top
from lb.policy import Policy
from scenarios import results
from scenarios.journal import Journal, RunState
from scenarios.ports import LOOPBACK
from scenarios.sampler import Progress, Sampler, monitor_loop_lag
from scenarios.schema import Event, Scenario, ScenarioError
from scenarios.system import Listeners, System, assemble, world_speed
from scenarios.timeline import Timeline
from scenarios.writer import write_run_dir
from worlds.base import World
from worlds.real import RealWorld, Stopwatch

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


class ScenarioRun:
    """One run of one scenario with one policy list, in one world (its clock, network and seed)."""

    def __init__(
        self,
        scenario: Scenario,
        policy_entries: list[str | dict[str, Any]] | None = None,
        *,
        world: World | None = None,
        source: str = "scenario",
        metrics_port: int = 0,
        admin_port: int = 0,
        on_progress: Callable[[Progress], None] | None = None,
        on_started: Callable[[dict[str, Any]], None] | None = None,
        ports: Mapping[str, int] | None = None,
        record: bool = True,
        bind: str = LOOPBACK,
    ) -> None:
        """`world` gives the clock, network and seed (default: the real world at the scenario's speed and seed).
        `ports` and `bind` are as `scenarios.system.Listeners` describes. `record=False` runs no recorder and
        keeps no per-request or per-sample rows, so a run that never ends stays bounded.

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
        self.world: World = world if world is not None else RealWorld(speed=scenario.speed, seed=scenario.seed)
        if not isinstance(self.world.seed, int):
            raise ScenarioError(f"{source}: a run needs an integer seed, got {self.world.seed!r}")
        self.seed: int = self.world.seed
        self.speed = world_speed(self.world)
        self.clock = self.world.clock
        self.source = source
        self.listeners = Listeners(metrics_port, admin_port, dict(ports or {}), bind)
        self.bind = bind
        self.on_progress = on_progress
        self.on_started = on_started
        self.record = record
        self.state = RunState(keep_rows=record)
        self.journal = Journal(self.state, self.clock, self.world.rng("scenario-run"))
        self.complete = False
        self.end_sim = 0.0
        self._watch: Stopwatch | None = None  # wall time of the run, for run.json
        # Set once the system is up (serve's admin API answers 503 until then).
        self.system: System | None = None
        self.timeline: Timeline | None = None

    @property
    def last_applied(self) -> dict[str, Any]:
        """The log entry of the latest applied timeline event (see `Timeline.apply`)."""
        return self.timeline.last_applied if self.timeline is not None else {}

    async def apply(self, ev: Event) -> list[str]:
        """Carry out one event now (serve's admin API); the run must be up."""
        if self.timeline is None:
            raise ScenarioError(f"{self.source}: the run is still starting")
        return await self.timeline.apply(ev)

    async def run(self, stop: asyncio.Event | None = None) -> dict[str, Any]:
        """Run to the scenario's end or until `stop` is set; always release everything and return a summary."""
        sc = self.scenario
        clock = self.clock
        stop = stop or asyncio.Event()
        self._watch = Stopwatch()
        system: System | None = None
        tasks: list[asyncio.Task[None]] = []
        try:
            system = self.system = await assemble(self.world, sc, self.policies, self.journal, seed=self.seed,
                                                  source=self.source, listeners=self.listeners, record=self.record)
            timeline = self.timeline = Timeline(system, self.journal, {p.name for p in self.policies}, self.source)
            if system.recorder is not None:
                system.recorder.start()
            if self.on_started is not None:
                self.on_started(dict(self.state.ports))
            system.traffic.start(until=sc.duration_s)
            sampler = Sampler(system, self.journal, sc.duration_s, sc.sample_interval_s, self.on_progress)
            playing = asyncio.create_task(timeline.play(sc.timeline), name="timeline")
            tasks.append(playing)
            tasks.append(asyncio.create_task(sampler.run(), name="sampler"))
            if self.world.name == "real":  # a simulated loop never lags: nothing to measure
                tasks.append(asyncio.create_task(monitor_loop_lag(self.journal), name="loop-lag"))
            await self._until_end(playing, stop, system)
            self.complete = not stop.is_set()
        finally:
            self.end_sim = min(clock.now(), sc.duration_s)
            await cancel_and_wait(tasks)
            if system is not None:
                if system.recorder is not None:
                    await system.recorder.stop()
                    await system.recorder.scrape_once()  # the final state, before anything is torn down
                    self.state.stage_rows = results.stage_columns(system.recorder, sc.zones)
                await system.close()
        return self.summary()

    async def _until_end(self, playing: asyncio.Task[None], stop: asyncio.Event, system: System) -> None:
        """Wait for the scenario's end (then for the requests in flight) or `stop`; a failing event ends it."""
        done = asyncio.create_task(self.clock.sleep_until(self.scenario.duration_s))
        stopped = asyncio.create_task(stop.wait())
        try:
            waiting: set[asyncio.Task[Any]] = {done, stopped, playing}
            while not (done.done() or stopped.done()):
                finished, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if playing in finished:
                    waiting.discard(playing)
                    if playing.exception() is not None:
                        raise playing.exception()  # type: ignore[misc]
            if done.done() and not stopped.done():
                # Requests still in flight at the end are part of the run: wait for their verdicts (each is
                # bounded by its timeout), or a failing end would look better than it was.
                drain = asyncio.create_task(system.traffic.wait())
                await asyncio.wait({drain, stopped}, return_when=asyncio.FIRST_COMPLETED)
                await cancel_and_wait([drain])
        finally:
            await cancel_and_wait([done, stopped])

    # -- results -----------------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """summary.json: a function of the scenario, policies and seed (and, in the real world, of how it ran)."""
        return results.summary(self.scenario, self.state, policy=self.policy_name, policies=self.policies,
                               seed=self.seed, speed=self.speed, world=self.world.name, end_sim=self.end_sim,
                               complete=self.complete)

    def run_info(self) -> dict[str, Any]:
        """run.json: this machine's figures (the event loop's lag and whether the run kept up)."""
        wall_s = self._watch.elapsed() if self._watch is not None else 0.0
        return results.run_info(self.scenario, self.state, world=self.world.name, wall_s=wall_s)

    def write(self, out_dir: Path, summary: dict[str, Any]) -> None:
        """Write the run directory: resolved scenario, summary, run figures, events, and the sampled series."""
        resolved = self.scenario.model_dump(mode="json", by_alias=True)
        resolved.update({"policy": self.policy_entries, "speed": self.speed or self.scenario.speed, "seed": self.seed})
        write_run_dir(out_dir, resolved=resolved, summary=summary, run_info=self.run_info(), state=self.state,
                      recorder=self.system.recorder if self.system is not None else None)
