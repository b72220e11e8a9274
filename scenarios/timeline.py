"""The timeline: plays a scenario's events at their sim times and applies each one to the running system."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import Any

from lb.policies import PolicyError
from scenarios.journal import Journal
from scenarios.schema import Event, ScenarioError
from scenarios.system import System
from worlds.base import Clock


def in_order(events: Iterable[Event]) -> list[Event]:
    """Events by time; events at the same time in the order the scenario lists them."""
    return sorted(events, key=lambda e: e.at)


async def play(events: Iterable[Event], clock: Clock, apply: Callable[[Event], Awaitable[object]]) -> None:
    """Apply each event once `clock` reaches its time, one after another (an event's changes are complete
    before the next one starts)."""
    for ev in in_order(events):
        await clock.sleep_until(ev.at)
        await apply(ev)


class Timeline:
    """Applies events to one system and logs each in the journal (`kind: timeline`, its `targets` and
    `applied_at`); `last_applied` is the latest one's entry."""

    def __init__(self, system: System, journal: Journal, policy_names: Collection[str], source: str) -> None:
        self.system = system
        self.journal = journal
        self.policy_names = frozenset(policy_names)
        self.source = source
        self.last_applied: dict[str, Any] = {}

    async def play(self, events: Iterable[Event]) -> None:
        await play(events, self.system.clock, self.apply)

    async def apply(self, ev: Event) -> list[str]:
        """Carry out one timeline event now; return the targets it touched.

        Its log entry's `applied_at` says when each change had taken effect (sim s): by target for an event that
        changes targets, else by the event's action."""
        system = self.system
        touched: list[str] = []
        # Logged before it takes effect, so its consequences follow it in events.jsonl.
        entry = self.journal.log(system.clock.now(), "timeline", ev.action,
                                 {"at": ev.at, "note": ev.note,
                                  "spec": ev.model_dump(exclude_none=True, by_alias=True, exclude={"at", "note"})})
        self.last_applied = entry  # what serve's admin API answers with, even once events.jsonl stops keeping
        applied: dict[str, float] = {}
        if ev.register_ is not None:
            assert ev.zone is not None
            # One after another, so that targets register in the same order in every run. A new instance's
            # start (a backend and a path to open) is not a change of a running target.
            for _ in range(ev.register_.count):
                tid = await system.registrar.add(ev.zone, ev)
                touched.append(tid)
                applied[tid] = self._applied_now()
        elif ev.checker is not None:
            system.lb.set_transition_cost(ev.checker.transition_cost)
            applied[ev.action] = self._applied_now()
        elif ev.control is not None:
            if system.control is None:  # the schema refuses this; a caller building events by hand may not
                raise ScenarioError(f"{self.source}: event at {ev.at:g} needs a control plane")
            entry.update(await system.control.apply(ev.control))
            applied[ev.action] = self._applied_now()
        elif ev.set_policy is not None:
            sp = ev.set_policy
            if sp.policy not in self.policy_names:
                entry["skipped"] = f"no {sp.policy} policy in this run"
                return touched
            try:
                system.lb.set_policy_param(sp.policy, sp.param, sp.value)
            except (ValueError, PolicyError) as e:
                raise ScenarioError(f"{self.source}: event at {ev.at:g}: {e}") from None
            applied[ev.action] = self._applied_now()
        else:
            touched = system.registrar.select(ev)
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
        fleet, lb = self.system.fleet, self.system.lb
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
        return round(self.system.clock.now(), 4)
