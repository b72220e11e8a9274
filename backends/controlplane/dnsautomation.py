"""The DNS automation's timing rules as a pure, clock-driven core: planner ticks, enactor passes and the race modes.

`dnsplan` holds what a planner, an enactor and the plan store do; this module holds WHEN they do it. The
asyncio shell (`dnsservice.py`) and the race benchmark (`bench/dns_race.py`) drive the same `DnsAutomation`:
`next_due()` says when the next transition is due, `advance(now)` runs every transition due by `now`, each at
its own due time, so a virtual clock and the real one run the same sequence. No I/O, no clock reads, and no
global randomness: the caller injects a seeded `random.Random`.

Timing rules (all durations in sim seconds):
1. At construction generation 1 is planned and written to every endpoint (actor "init").
2. `plan`: the planner adds a plan every `planner_interval_s` on a fixed grid from `t0`; paused, it skips the
   tick; a driver that fell behind skips the ticks it missed instead of planning in a burst.
3. `pick_up`: each enactor polls every `enactor_poll_s` on its own grid, offset by (i + 1/2) / n of a poll, so
   they never all start at once. It takes the newest plan with the one-time staleness check (dnsplan rule 2);
   after a pass it looks again at once. A pass writes the endpoints in sorted order in the forced mode and in
   an order drawn from the injected random in the emergent mode (rule 6).
4. `begin_write`: a write to one endpoint takes `apply_time_s` plus an extra delay: an injected one
   (`delay_enactor`) or, in the emergent mode, one drawn from `RaceConfig` (a hung transaction).
   `finish_write`: the write lands; the store reads the plan then (dnsplan rule 3). An injected failure
   (`fail_writes`) is a failed attempt, retried after `retry_s` (`retry`).
5. `cleanup`: after its last endpoint an enactor deletes plans more than `keep_generations` older.
6. The race modes (`RaceConfig.mode`):
   - forced (for teaching): a delayed write, once its delay has passed, is held (`hold`) and lands at the next
     moment another enactor finishes a pass, just before that enactor's clean-up, or alone after
     `hold_bound_s` (`hold_expired`). If the clean-up deleted its plan meanwhile, landing re-creates it (the
     transaction holds the record data), so the clean-up deletes it again. A delay of at least
     (keep_generations + 1) x planner_interval_s on an enactor that applies plans empties the record by
     construction, whatever the moment; a delay just over keep_generations intervals may leave only a stale
     record, which the next pass repairs.
   - emergent: every write is delayed with probability `delay_probability` by an exponential delay of mean
     `delay_mean_s`, capped at `delay_max_s`, and lands when its delay is over, nothing held (an injected
     delay too). Each pass draws the order of its endpoints (AWS publishes none; a fixed order would spare
     the endpoint written last, which every clean-up follows a fresh write to). Whether the record is emptied
     comes out of the mechanism: a stale write must land after a newer plan reached its endpoint and before
     its own plan is cleaned up, and some later clean-up must delete that plan while active.
7. `restore`, `pause` and `resume` abandon every pass in progress (held and in-flight writes included): a
   stopped enactor loses its in-memory plan, and a repair must not be undone by a stale write.
Notices (name, fields with "at") go to `notify`: delay-injected, fail-injected, delay-drawn, delayed-write-landed,
emptied, guard-kept, refused-inconsistent (once until the next restore), restored, paused, resumed.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any

from pydantic import AfterValidator, Field

from backends.controlplane.dnsplan import (
    Enactor,
    EnactorState,
    Plan,
    Planner,
    PlanStore,
    Protections,
    Records,
    StartOutcome,
    WriteOutcome,
)
from simconfig import ConfigModel, Fraction, Seconds, Whole

Notify = Callable[[str, dict[str, Any]], None]


class RaceMode(StrEnum):
    FORCED = "forced"
    EMERGENT = "emergent"


class RaceConfig(ConfigModel):
    """How enactor writes are delayed: forced (injected delays, choreographed landing) or emergent (drawn)."""

    mode: RaceMode = RaceMode.FORCED
    delay_probability: Annotated[Fraction, Field(ge=0, le=1)] = 0.05  # emergent: the chance that one write hangs
    delay_mean_s: Annotated[Seconds, Field(gt=0)] = 15.0  # emergent: mean of a hung write's exponential extra time
    delay_max_s: Annotated[Seconds, Field(ge=0)] = 120.0  # emergent: no write hangs longer than this

    def draw_delay(self, rng: random.Random) -> float:
        """The extra time of one write in the emergent mode (0.0 in the forced mode, without drawing)."""
        if self.mode != RaceMode.EMERGENT or rng.random() >= self.delay_probability:
            return 0.0
        return min(rng.expovariate(1.0 / self.delay_mean_s), self.delay_max_s)


def _distinct(names: tuple[str, ...]) -> tuple[str, ...]:
    if len(set(names)) != len(names):
        raise ValueError(f"enactor names must be distinct, got {list(names)}")
    return names


# One per zone, as AWS runs one per AZ.
EnactorNames = Annotated[tuple[str, ...], Field(min_length=1), AfterValidator(_distinct)]


class DnsTiming(ConfigModel):
    """The planner's and the enactors' timing, the protections and the race, in sim seconds (a scenario's
    `control_plane.dns` adds the records' TTL: `dnsservice.DnsSettings`)."""

    planner_interval_s: Annotated[Seconds, Field(gt=0)] = 5.0
    apply_time_s: Annotated[Seconds, Field(ge=0)] = 0.5  # per endpoint write
    retry_s: Annotated[Seconds, Field(gt=0)] = 1.0  # wait after a failed attempt
    enactor_poll_s: Annotated[Seconds, Field(gt=0)] = 1.0  # how often an idle enactor looks for a newer plan
    keep_generations: Annotated[Whole, Field(ge=0, le=1000)] = 3
    protections: Protections = Protections()
    race: RaceConfig = RaceConfig()


class AutomationConfig(DnsTiming):
    """Timing and policy of the planner and the enactors, and the enactors' names."""

    enactors: EnactorNames = ("a", "b", "c")


class Phase(StrEnum):
    POLLING = "polling"  # idle, next poll at `due`
    WRITING = "writing"  # a write in flight, landing at `due`
    RETRY_WAIT = "retry-wait"  # after a failed attempt, trying again at `due`
    HELD = "held"  # forced mode: a delayed write waiting for another enactor's clean-up, alone at `due`
    STOPPED = "stopped"  # paused
    BUSY = "busy"  # a held write just landed, its pass about to go on (within one transition)


@dataclass(slots=True)
class _Delay:
    delay_s: float
    writes: int
    endpoint: str | None  # wait for the first write to this endpoint before counting writes

    def take(self, endpoint: str) -> float:
        if self.endpoint is not None:
            if endpoint != self.endpoint:
                return 0.0
            self.endpoint = None
        self.writes -= 1
        return self.delay_s


@dataclass(slots=True)
class Write:
    """One write in flight: the endpoint, the plan it was started with and its extra delay."""

    endpoint: str
    plan: Plan
    extra_s: float
    fail: bool
    drawn: bool  # the delay was drawn (emergent), not injected


@dataclass(slots=True)
class Slot:
    """One enactor and the timing state around it."""

    name: str
    offset_s: float  # poll grid offset
    enactor: Enactor
    phase: Phase = Phase.POLLING
    due: float = math.inf
    seq: int = 0  # tie-break among transitions due at the same time: the earlier scheduled runs first
    write: Write | None = None
    delay: _Delay | None = None
    failures: int = 0

    def take_delay(self, endpoint: str) -> float:
        if self.delay is None:
            return 0.0
        extra = self.delay.take(endpoint)
        if self.delay.writes <= 0:
            self.delay = None
        return extra

    def take_failure(self) -> bool:
        if self.failures <= 0:
            return False
        self.failures -= 1
        return True


class DnsAutomation:
    """Planner + enactors + plan store, stepped by the caller's clock: `next_due()`, then `advance(now)`."""

    def __init__(
        self,
        config: AutomationConfig,
        endpoints: Mapping[str, Records],
        t0: float,
        rng: random.Random | None = None,
        notify: Notify | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one endpoint is needed")
        if config.race.mode == RaceMode.EMERGENT and rng is None:
            raise ValueError("the emergent race mode draws its delays from an injected seeded random.Random")
        self.config = config
        self.rng = rng
        self.notify = notify
        self.endpoints = tuple(sorted(endpoints))
        self.planner = Planner(endpoints)
        self.store = PlanStore(config.protections)
        first = self.planner.next(t0)
        self.store.add(first)
        for endpoint in self.endpoints:
            self.store.write(endpoint, first.generation, t0, actor="init")
        self.t0 = t0
        self.paused = False
        self._seq = itertools.count()
        self._late_now = t0  # the `now` of the current advance: grid schedules skip what the driver missed
        self.plan_due = t0 + config.planner_interval_s
        self._plan_seq = next(self._seq)
        n = len(config.enactors)
        self.slots = {
            name: Slot(name, (i + 0.5) / n * config.enactor_poll_s, self._new_enactor(name))
            for i, name in enumerate(config.enactors)
        }
        self._slot_list = list(self.slots.values())
        for slot in self._slot_list:
            self._schedule(slot, Phase.POLLING, t0 + slot.offset_s)
        # Forced mode: the longest a ripe delayed write waits for another enactor's clean-up: the next plan,
        # the poll that picks it up and a whole pass, with one retry to spare.
        self.hold_bound_s = (
            config.planner_interval_s
            + config.enactor_poll_s
            + (len(self.endpoints) + 1) * config.apply_time_s
            + config.retry_s
        )
        self.writes: dict[tuple[str, WriteOutcome], int] = {
            (name, outcome): 0 for name in config.enactors for outcome in WriteOutcome
        }
        self.plans_deleted = 0
        self.records_emptied = 0
        self.first_emptied_at: float | None = None
        self._refusal_noted = False
        self._seen_events = self.store.events_total

    # -- driving

    def next_due(self) -> float:
        """When the next transition is due (the planner always has one)."""
        due = self.plan_due
        for slot in self._slot_list:
            if slot.due < due:
                due = slot.due
        return due

    def advance(self, now: float) -> None:
        """Run every transition due by `now`, in order of due time (then of scheduling), each at its due time."""
        self._late_now = max(self._late_now, now)
        slots = self._slot_list
        while True:
            slot = slots[0]
            for other in slots[1:]:  # the earliest due, then the earliest scheduled (a hot loop: no key tuples)
                if other.due < slot.due or (other.due == slot.due and other.seq < slot.seq):
                    slot = other
            if self.plan_due <= now and (self.plan_due, self._plan_seq) < (slot.due, slot.seq):
                self.plan(self.plan_due)
            elif slot.due <= now:
                self._fire(slot)
            else:
                return

    def run_until(self, end: float) -> None:
        """Drive the automation on a virtual clock: every transition due by `end`, at once (tests, benchmarks)."""
        while (due := self.next_due()) <= end:
            self.advance(due)
        self._late_now = max(self._late_now, end)

    def _fire(self, slot: Slot) -> None:
        t = slot.due
        match slot.phase:
            case Phase.POLLING:
                self.pick_up(slot.name, t)
            case Phase.WRITING:
                self.finish_write(slot.name, t)
            case Phase.RETRY_WAIT:
                self.retry(slot.name, t)
            case Phase.HELD:
                self.hold_expired(slot.name, t)
            case Phase.STOPPED | Phase.BUSY:  # pragma: no cover - due at infinity
                raise AssertionError(f"enactor {slot.name} has nothing due")

    # -- the named transitions

    def plan(self, now: float) -> Plan | None:
        """Planner tick (rule 2): a new plan unless paused; the next tick on the grid after the driver's now."""
        interval = self.config.planner_interval_s
        behind = self._late_now - now
        self.plan_due = now + interval * max(1, math.floor(behind / interval) + 1)
        self._plan_seq = next(self._seq)
        if self.paused:
            return None
        plan = self.planner.next(now)
        self.store.add(plan)
        self._drain_events()
        return plan

    def pick_up(self, name: str, now: float) -> StartOutcome:
        """An enactor polls (rule 3): start a pass with the newest plan, or wait for the next poll."""
        slot = self._slot(name)
        emergent = self.config.race.mode == RaceMode.EMERGENT
        outcome = slot.enactor.start(now, self.rng if emergent else None)
        if outcome == StartOutcome.STARTED:
            self._continue(slot, now)
            return outcome
        if outcome == StartOutcome.REFUSED_INCONSISTENT:
            self._note_refusal(name, "start", now)
        self._schedule(slot, Phase.POLLING, self._next_poll(slot, max(now, self._late_now)))
        return outcome

    def begin_write(self, name: str, now: float) -> Write:
        """Start the write of the next endpoint (rule 4): apply_time_s plus an injected or drawn delay."""
        slot = self._slot(name)
        enactor = slot.enactor
        if enactor.state != EnactorState.APPLYING or enactor.plan is None:
            raise RuntimeError(f"enactor {name} has no write to begin")
        endpoint = enactor.pending[0]
        extra = slot.take_delay(endpoint)
        drawn = False
        if extra == 0.0 and self.rng is not None:
            extra = self.config.race.draw_delay(self.rng)
            drawn = extra > 0.0
        write = Write(endpoint, enactor.plan, extra, slot.take_failure(), drawn)
        slot.write = write
        if drawn:
            self._emit("delay-drawn", now, enactor=name, endpoint=endpoint, generation=write.plan.generation,
                       delay_s=extra)
        self._schedule(slot, Phase.WRITING, now + self.config.apply_time_s + extra)
        return write

    def finish_write(self, name: str, now: float) -> WriteOutcome | None:
        """The write's time is up: a failed attempt waits retry_s; a forced-mode delayed write is held; any
        other write lands. Returns the landed outcome, None if it did not land."""
        slot = self._slot(name)
        write = slot.write
        assert write is not None
        if write.fail:
            slot.enactor.apply_next(now, ok=False)
            self.writes[name, WriteOutcome.RETRY] += 1
            self._schedule(slot, Phase.RETRY_WAIT, now + self.config.retry_s)
            return None
        if write.extra_s > 0 and self.config.race.mode == RaceMode.FORCED:
            self.hold(name, now)
            return None
        outcome = self._land(slot, now, recreate=False, by=None)
        self._continue(slot, now)
        return outcome

    def retry(self, name: str, now: float) -> Write:
        """After a failed attempt, begin the same endpoint's write again."""
        return self.begin_write(name, now)

    def hold(self, name: str, now: float) -> None:
        """Forced mode: a delayed write, its delay over, waits for another enactor's clean-up (rule 6)."""
        self._schedule(self._slot(name), Phase.HELD, now + self.hold_bound_s)

    def hold_expired(self, name: str, now: float) -> WriteOutcome:
        """Forced mode: no other enactor finished a pass within hold_bound_s; the held write lands alone."""
        slot = self._slot(name)
        outcome = self._land(slot, now, recreate=True, by=None)
        self._continue(slot, now)
        return outcome

    def cleanup(self, name: str, now: float) -> list[int]:
        """An enactor's pass is written (rule 5): in forced mode the held writes of the others land first, then
        its clean-up deletes old plans, then the others' passes go on and this one looks for a newer plan."""
        slot = self._slot(name)
        landed = [s for s in self.slots.values() if s is not slot and s.phase == Phase.HELD]
        for other in landed:
            self._land(other, now, recreate=True, by=name)
        deleted = slot.enactor.cleanup(now)
        self._drain_events()
        for other in landed:
            self._continue(other, now)
        self.pick_up(name, now)
        return deleted

    # -- operator / scenario actions

    def delay_enactor(
        self, name: str, delay_s: float, now: float, writes: int = 1, endpoint: str | None = None
    ) -> None:
        """The next `writes` write attempts of an enactor each take `delay_s` longer; with `endpoint`, counting
        starts at its next write to that endpoint. Replaces a delay not used up yet."""
        slot = self._slot(name)
        if delay_s < 0 or writes < 1:
            raise ValueError(f"need delay_s >= 0 and writes >= 1, got {delay_s} and {writes}")
        if endpoint is not None and endpoint not in self.endpoints:
            raise KeyError(f"no endpoint {endpoint!r}; have {list(self.endpoints)}")
        slot.delay = _Delay(delay_s, writes, endpoint)
        self._emit("delay-injected", now, enactor=name, delay_s=delay_s, writes=writes, endpoint=endpoint)

    def fail_writes(self, name: str, count: int, now: float) -> None:
        """The next `count` write attempts of an enactor fail, each retried after retry_s."""
        slot = self._slot(name)
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        slot.failures = count
        self._emit("fail-injected", now, enactor=name, count=count)

    def restore(self, now: float) -> Plan | None:
        """Operator repair: the newest plan everywhere, the inconsistent state left, every pass dropped."""
        plan = self.store.restore(now)
        self._abandon_passes(now)
        self._refusal_noted = False
        self._drain_events()
        self._emit("restored", now, generation=None if plan is None else plan.generation)
        return plan

    def pause(self, now: float) -> None:
        """Disable the automation: the planner skips its ticks, the enactors stop and lose their passes."""
        if self.paused:
            return
        self.paused = True
        for slot in self.slots.values():
            self._reset_slot(slot)
            self._schedule(slot, Phase.STOPPED, math.inf)
        self._emit("paused", now)

    def resume(self, now: float) -> None:
        if not self.paused:
            return
        self.paused = False
        self._abandon_passes(now)
        self._emit("resumed", now)

    # -- internals

    def _continue(self, slot: Slot, now: float) -> None:
        """Go on with a pass: the next write, the clean-up, or (a pass that stopped) look again at once."""
        match slot.enactor.state:
            case EnactorState.APPLYING:
                self.begin_write(slot.name, now)
            case EnactorState.CLEANUP_PENDING:
                self.cleanup(slot.name, now)
            case EnactorState.IDLE:
                self.pick_up(slot.name, now)

    def _land(self, slot: Slot, now: float, recreate: bool, by: str | None) -> WriteOutcome:
        write = slot.write
        assert write is not None and slot.enactor.state == EnactorState.APPLYING
        slot.write = None
        self._schedule(slot, Phase.BUSY, math.inf)
        # Forced mode: the hung transaction holds the record data, so a plan cleaned up meanwhile comes back.
        recreated = recreate and not self.store.inconsistent and write.plan.generation not in self.store.plans
        if recreated:
            self.store.add(write.plan)
        _endpoint, outcome = slot.enactor.apply_next(now)
        self.writes[slot.name, outcome] += 1
        self._drain_events()
        if outcome == WriteOutcome.REFUSED_INCONSISTENT:
            self._note_refusal(slot.name, "write", now)
        if write.extra_s > 0:
            self._emit(
                "delayed-write-landed", now, enactor=slot.name, endpoint=write.endpoint,
                generation=write.plan.generation, outcome=outcome.value, recreated=recreated,
                before_cleanup_of=by, delay_s=write.extra_s, drawn=write.drawn,
            )
        return outcome

    def _schedule(self, slot: Slot, phase: Phase, due: float) -> None:
        slot.phase, slot.due, slot.seq = phase, due, next(self._seq)

    def _reset_slot(self, slot: Slot) -> None:
        slot.enactor = self._new_enactor(slot.name)
        slot.write = None

    def _abandon_passes(self, now: float) -> None:
        for slot in self.slots.values():
            self._reset_slot(slot)
            if not self.paused:
                self._schedule(slot, Phase.POLLING, self._next_poll(slot, now))

    def _next_poll(self, slot: Slot, after: float) -> float:
        """The first point of the slot's poll grid strictly after `after`, so its phase never drifts."""
        poll = self.config.enactor_poll_s
        k = math.floor((after - self.t0 - slot.offset_s) / poll) + 1
        while self.t0 + slot.offset_s + k * poll <= after:  # rounding can land k one grid point short
            k += 1
        return self.t0 + slot.offset_s + k * poll

    def _new_enactor(self, name: str) -> Enactor:
        return Enactor(name, self.store, keep_generations=self.config.keep_generations)

    def _drain_events(self) -> None:
        """Count the store's new events and report the notable ones."""
        events = self.store.events
        # The store's log is bounded, so count from its running total rather than index into it.
        fresh = min(self.store.events_total - self._seen_events, len(events))
        for event in itertools.islice(events, len(events) - fresh, None):
            if event.kind == "deleted":
                self.plans_deleted += 1
            elif event.kind in ("emptied", "guard-kept"):
                if event.kind == "emptied":
                    self.records_emptied += 1
                    if self.first_emptied_at is None:
                        self.first_emptied_at = event.at
                self._emit(event.kind, event.at, by=event.actor, endpoint=event.endpoint,
                           generation=event.generation)
        self._seen_events = self.store.events_total

    def _note_refusal(self, enactor: str, step: str, now: float) -> None:
        if not self._refusal_noted:
            self._refusal_noted = True
            self._emit("refused-inconsistent", now, enactor=enactor, step=step, generation=self.planner.generation)

    def _emit(self, kind: str, now: float, **fields: Any) -> None:
        if self.notify is not None:
            self.notify(kind, {"at": now, **fields})

    def _slot(self, name: str) -> Slot:
        slot = self.slots.get(name)
        if slot is None:
            raise KeyError(f"no enactor {name!r}; have {sorted(self.slots)}")
        return slot
