"""Samples the running system: targets registered/routed/serving/able to serve, progress, and event-loop lag."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from scenarios.journal import Journal
from scenarios.outcomes import Sample
from scenarios.system import System


@dataclass(frozen=True)
class Progress:
    sim_time: float
    duration: float
    serving: int
    registered: int
    zones_in_dns: int
    requests: int
    failed: int


class Sampler:
    """Every `interval_s` sim seconds, one row of the samples (until `duration_s`) and a progress report."""

    def __init__(self, system: System, journal: Journal, duration_s: float, interval_s: float,
                 on_progress: Callable[[Progress], None] | None = None) -> None:
        self.system = system
        self.journal = journal
        self.duration_s = duration_s
        self.interval_s = interval_s
        self.on_progress = on_progress

    async def run(self) -> None:
        clock = self.system.clock
        next_t = clock.now()
        while True:
            self.sample()
            next_t += self.interval_s
            await clock.sleep_until(next_t)

    def sample(self) -> None:
        system, journal = self.system, self.journal
        lb = system.lb
        plan = lb.plan
        assert plan is not None  # set by lb.start, which assembly awaited
        registered = frozenset(t.id for t in lb.snapshot().registered())
        routed = frozenset(t for ids in plan.routable.values() for t in ids)
        can = frozenset(t for t in registered if system.fleet.can_serve(t))
        s = Sample(system.clock.now(), registered, routed, lb.serving(), can, lb.admitted)
        if s.t < self.duration_s:
            transitions = journal.transitions
            extra = {"zones_in_dns": float(len(lb.dns.zones) if lb.dns else 0),
                     "transitions_total": float(transitions.total()),
                     "transitions_down_total": float(transitions["healthy->unhealthy"]),
                     "transitions_up_total": float(transitions["unhealthy->healthy"])}
            if system.control is not None:
                extra.update(system.control.sample())
            journal.state.add_sample(s, extra)
        if self.on_progress is not None:
            req = journal.state.requests
            self.on_progress(Progress(s.t, self.duration_s, len(s.serving & registered), len(registered),
                                      len(lb.dns.zones) if lb.dns else 0, req.total, req.failed))


async def monitor_loop_lag(journal: Journal, period_loop_s: float = 0.02) -> None:
    """Measure how late the event loop wakes up, in sim seconds. Everything shares one loop, so when it lags,
    probes and requests time out for the simulator's sake, not the scenario's: run.json and the CLI say so."""
    loop = asyncio.get_running_loop()
    clock = journal.clock
    while True:
        before = loop.time()
        await asyncio.sleep(period_loop_s)
        lag = max(0.0, loop.time() - before - period_loop_s)
        journal.on_loop_lag(clock.to_sim(lag))
