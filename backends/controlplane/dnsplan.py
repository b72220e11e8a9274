"""The pure DNS planner / enactor / plan store core that reproduces the AWS 2025-10-20 empty-record race.

The AWS mechanism (the post-event summary, see docs/sources.md): a Planner periodically produces a new plan
generation (for each endpoint, a set of addresses with weights); three independent Enactors each take the newest plan,
check ONCE, before starting, that it is newer than the applied one, then apply it endpoint by endpoint; after
the last endpoint an Enactor runs a clean-up that deletes plans many generations older than the one it just
applied. Enactor A was delayed mid-way; B applied a much newer plan everywhere and cleaned up; A, its start-time
check long stale, wrote its old plan over an endpoint; B's next clean-up deleted that plan although it was
active, which emptied the endpoint's record; with the active plan gone, no Enactor would apply anything
until operators intervened.

Rules of this model:
1. `Planner.next(now)` returns generation n+1 of the plan, with the desired records at that moment.
2. `Enactor.start(now)` takes the store's newest plan and checks once that its generation is greater than the
   highest generation applied on any endpoint; it never re-checks per endpoint. The pass writes the endpoints in
   sorted order, or in an order shuffled by `start(now, order_rng)` (AWS gives no order, see `Enactor.start`).
3. `Enactor.apply_next(now)` writes the plan to the next endpoint. Time passes only between calls: a delayed
   Enactor is one the caller does not step. `ok=False` is a failed attempt (endpoint blocked, timeout); the
   same endpoint is retried on the next call. An Enactor whose plan was deleted meanwhile stops (it reads the
   plan from the store for each write; a modelling choice, AWS does not say).
4. After the last endpoint, `Enactor.cleanup(now)` deletes every plan more than `keep_generations` older than
   the one just applied. Deleting a plan that is active on an endpoint publishes an EMPTY record for it and
   puts the store in the inconsistent state.
5. Inconsistent state: while any endpoint's applied plan has been deleted, enactors refuse to start, write or
   clean up, until an operator `PlanStore.restore(now)` publishes the newest plan everywhere.
Protections, each a switch in `Protections` (commentators' fixes, not AWS's published ones):
(a) `cas`: every write is a compare-and-set on the endpoint's generation; a plan older than the applied one is
    skipped, so an endpoint's generation never goes backwards.
(b) `keep_active`: clean-up never deletes a plan that is active on any endpoint.
(c) `guard`: the store refuses to publish an empty record set, or one with fewer than `min_fraction` of the
    current record's addresses. When a deletion would empty a record, the record keeps its addresses, but the
    applied plan is still gone, so the store is still inconsistent: the guard saves the data plane, not the
    control plane.
Memory bounds, not part of the model: while nothing cleans up (inconsistent store, enactors paused or delayed)
the planner still adds a plan every interval, so the store keeps at most `max_plans`; past it the oldest plan
active on no endpoint is evicted silently (no "deleted" event, no emptied record), counted in `plans_evicted`.
`events` keeps the newest `max_events`; `events_total` counts every event ever logged.
No I/O and no clock reads: the caller passes `now`, so unit tests or a virtual-time engine can drive it.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated

from pydantic import Field

from simconfig import ConfigModel, Flag, Fraction

# An endpoint's record set: address -> weight.
Records = Mapping[str, int]

# Far above what clean-ups leave (keep_generations <= 1000 in scenarios, plus one active plan per endpoint), so
# the bound only bites when nothing cleans up for max_plans planner intervals.
DEFAULT_MAX_PLANS = 10_000
# Readers drain the log after every write or clean-up, so only a log nobody reads loses anything to this.
DEFAULT_MAX_EVENTS = 10_000


@dataclass(frozen=True, slots=True)
class Plan:
    """One plan generation: the record set for every endpoint."""

    generation: int
    created_at: float
    records: Mapping[str, Records]


class Protections(ConfigModel):
    """Which of the three protections are on; all off reproduces the AWS behaviour (the 2025-10-20 race)."""

    cas: Flag = False
    keep_active: Flag = False
    guard: Flag = False
    min_fraction: Annotated[Fraction, Field(ge=0, le=1)] = 0.5


class WriteOutcome(StrEnum):
    """What became of one attempt to write a plan to one endpoint."""

    APPLIED = "applied"
    SKIPPED_STALE = "skipped-stale"  # protection (a): the endpoint already has a newer generation
    REFUSED_GUARD = "refused-guard"  # protection (c): empty or sharply smaller record set
    REFUSED_INCONSISTENT = "refused-inconsistent"
    PLAN_GONE = "plan-gone"  # the plan was deleted while the enactor was working through it
    RETRY = "retry"  # the attempt failed; the same endpoint is tried again next step


class StartOutcome(StrEnum):
    STARTED = "started"
    NO_PLAN = "no-plan"
    NOT_NEWER = "not-newer"
    REFUSED_INCONSISTENT = "refused-inconsistent"


class EnactorState(StrEnum):
    IDLE = "idle"
    APPLYING = "applying"
    CLEANUP_PENDING = "cleanup-pending"


@dataclass(frozen=True, slots=True)
class Event:
    """Something the store did, for logs and metrics: kind is a WriteOutcome value, "deleted", "emptied",
    "guard-kept" (a deletion would have emptied the record) or "restored"."""

    at: float
    kind: str
    endpoint: str | None
    generation: int
    actor: str


def _check_records(records: Mapping[str, Records]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for endpoint, rs in records.items():
        for address, weight in rs.items():
            if weight < 0:
                raise ValueError(f"weight of {address} for endpoint {endpoint} must be >= 0, got {weight}")
        out[endpoint] = dict(rs)
    return out


class Planner:
    """Produces a new plan generation on every call, from the desired records at that moment."""

    def __init__(self, records: Mapping[str, Records], first_generation: int = 1) -> None:
        self._records = _check_records(records)
        self._next = first_generation

    def set_records(self, endpoint: str, records: Records) -> None:
        """Change what the next plans publish for one endpoint (capacity or health changed)."""
        self._records.update(_check_records({endpoint: records}))

    @property
    def generation(self) -> int:
        """The generation the last call produced (first_generation - 1 before any call)."""
        return self._next - 1

    def next(self, now: float) -> Plan:
        plan = Plan(self._next, now, {e: dict(rs) for e, rs in self._records.items()})
        self._next += 1
        return plan


class PlanStore:
    """The plans by generation, and the published records (Route 53) with the generation each endpoint has."""

    def __init__(
        self,
        protections: Protections | None = None,
        max_plans: int = DEFAULT_MAX_PLANS,
        max_events: int = DEFAULT_MAX_EVENTS,
    ) -> None:
        if max_plans < 1:
            raise ValueError(f"max_plans must be >= 1, got {max_plans}")
        if max_events < 1:
            raise ValueError(f"max_events must be >= 1, got {max_events}")
        self.protections = protections or Protections()
        self.max_plans = max_plans
        self.plans_evicted = 0
        self.plans: dict[int, Plan] = {}
        self.applied: dict[str, int] = {}  # endpoint -> generation of the plan it currently has
        self.published: dict[str, dict[str, int]] = {}  # endpoint -> records; absent = never published
        self.orphaned: set[str] = set()  # endpoints whose applied plan was deleted (the inconsistent state)
        self.events: collections.deque[Event] = collections.deque(maxlen=max_events)
        self.events_total = 0  # ever logged, including those the bounded log has since let go

    # -- reading

    @property
    def inconsistent(self) -> bool:
        return bool(self.orphaned)

    def newest(self) -> Plan | None:
        return self.plans[max(self.plans)] if self.plans else None

    def applied_generation(self) -> int | None:
        """The highest generation applied on any endpoint: what an enactor's one-time check compares with."""
        return max(self.applied.values(), default=None)

    def records(self, endpoint: str) -> dict[str, int] | None:
        """The published records of an endpoint: None if never published, {} if empty."""
        rs = self.published.get(endpoint)
        return None if rs is None else dict(rs)

    # -- writing

    def add(self, plan: Plan) -> None:
        if plan.generation in self.plans:
            raise ValueError(f"plan generation {plan.generation} already stored")
        self.plans[plan.generation] = plan
        if len(self.plans) > self.max_plans:
            # The new plan is active nowhere yet, so there is always a plan to evict.
            active = set(self.applied.values())
            del self.plans[min(g for g in self.plans if g not in active)]
            self.plans_evicted += 1

    def write(self, endpoint: str, generation: int, now: float, actor: str = "") -> WriteOutcome:
        """One enactor write of plan `generation` to `endpoint` (a Route 53 transaction)."""
        outcome = self._write(endpoint, generation)
        self._log(Event(now, outcome.value, endpoint, generation, actor))
        return outcome

    def _log(self, event: Event) -> None:
        self.events.append(event)
        self.events_total += 1

    def _write(self, endpoint: str, generation: int) -> WriteOutcome:
        if self.inconsistent:
            return WriteOutcome.REFUSED_INCONSISTENT
        plan = self.plans.get(generation)
        if plan is None:
            return WriteOutcome.PLAN_GONE
        current = self.applied.get(endpoint)
        if self.protections.cas and current is not None and generation < current:
            return WriteOutcome.SKIPPED_STALE
        new = dict(plan.records.get(endpoint, {}))
        if not self._guard_allows(endpoint, new):
            return WriteOutcome.REFUSED_GUARD
        self.published[endpoint] = new
        self.applied[endpoint] = generation
        return WriteOutcome.APPLIED

    def _guard_allows(self, endpoint: str, new: Mapping[str, int]) -> bool:
        if not self.protections.guard:
            return True
        if not new:
            return False
        old = self.published.get(endpoint)
        # Sharply smaller = fewer addresses than min_fraction of the current set: DNS's velocity limit.
        return old is None or len(new) >= self.protections.min_fraction * len(old)

    def delete_older_than(self, generation: int, now: float, actor: str = "") -> list[int]:
        """Delete plans with a generation below `generation`; return the deleted generations.

        A deleted plan that is active on an endpoint empties that endpoint's record (the AWS race), unless
        protection (b) keeps it or protection (c) refuses the empty record.
        """
        active = set(self.applied.values())
        deleted: list[int] = []
        for gen in sorted(g for g in self.plans if g < generation):
            if self.protections.keep_active and gen in active:
                continue
            del self.plans[gen]
            deleted.append(gen)
            self._log(Event(now, "deleted", None, gen, actor))
            for endpoint in sorted(e for e, g in self.applied.items() if g == gen):
                self.orphaned.add(endpoint)
                if self._guard_allows(endpoint, {}):
                    self.published[endpoint] = {}
                    self._log(Event(now, "emptied", endpoint, gen, actor))
                else:
                    self._log(Event(now, "guard-kept", endpoint, gen, actor))
        return deleted

    def restore(self, now: float, endpoints: Iterable[str] | None = None, actor: str = "operator") -> Plan | None:
        """Operator repair: publish the newest plan to every endpoint (or the given ones), bypassing the guard,
        and leave the inconsistent state. Returns the plan published, None if there is none."""
        plan = self.newest()
        if plan is None:
            return None
        targets = sorted(set(plan.records) | set(self.applied)) if endpoints is None else list(endpoints)
        for endpoint in targets:
            self.published[endpoint] = dict(plan.records.get(endpoint, {}))
            self.applied[endpoint] = plan.generation
            self._log(Event(now, "restored", endpoint, plan.generation, actor))
        self.orphaned.clear()
        return plan


@dataclass(slots=True)
class Enactor:
    """One enactor, as an explicit state machine the caller drives: start, apply_next per endpoint, cleanup."""

    name: str
    store: PlanStore
    keep_generations: int = 3
    state: EnactorState = EnactorState.IDLE
    plan: Plan | None = None
    pending: list[str] = field(default_factory=list)  # endpoints still to write, in order
    outcomes: dict[str, WriteOutcome] = field(default_factory=dict)  # endpoint -> last outcome of this pass

    def __post_init__(self) -> None:
        if self.keep_generations < 0:
            raise ValueError(f"keep_generations must be >= 0, got {self.keep_generations}")

    def start(self, now: float, order_rng: random.Random | None = None) -> StartOutcome:
        """Take the newest plan and make the ONE-TIME staleness check against the applied generation; the pass
        writes the endpoints in sorted order, or in an order drawn from `order_rng`."""
        self._require(EnactorState.IDLE)
        if self.store.inconsistent:
            return StartOutcome.REFUSED_INCONSISTENT
        plan = self.store.newest()
        if plan is None:
            return StartOutcome.NO_PLAN
        applied = self.store.applied_generation()
        if applied is not None and plan.generation <= applied:
            return StartOutcome.NOT_NEWER
        self.plan = plan
        # AWS's summary says only that an enactor applies a plan to the endpoints one after another, not in
        # which order. A fixed order spares the endpoint written last: every clean-up comes right after a
        # write of a newer plan to it, so a stale write never sits on it when a clean-up runs. Sorted keeps
        # the choreographed (forced) race reproducible; a drawn order exposes every endpoint to the race.
        self.pending = sorted(plan.records)
        if order_rng is not None:
            order_rng.shuffle(self.pending)
        self.outcomes = {}
        self.state = EnactorState.APPLYING if self.pending else EnactorState.CLEANUP_PENDING
        return StartOutcome.STARTED

    def apply_next(self, now: float, ok: bool = True) -> tuple[str, WriteOutcome]:
        """Write the plan to the next endpoint; `ok=False` is a failed attempt that will be retried."""
        self._require(EnactorState.APPLYING)
        assert self.plan is not None
        endpoint = self.pending[0]
        if not ok:
            return endpoint, WriteOutcome.RETRY
        outcome = self.store.write(endpoint, self.plan.generation, now, self.name)
        self.outcomes[endpoint] = outcome
        if outcome in (WriteOutcome.REFUSED_INCONSISTENT, WriteOutcome.PLAN_GONE):
            self._reset()  # nothing more this pass can succeed
            return endpoint, outcome
        self.pending.pop(0)
        if not self.pending:
            self.state = EnactorState.CLEANUP_PENDING
        return endpoint, outcome

    def cleanup(self, now: float) -> list[int]:
        """Delete plans more than keep_generations older than the one just applied; return their generations."""
        self._require(EnactorState.CLEANUP_PENDING)
        assert self.plan is not None
        generation = self.plan.generation
        self._reset()
        if self.store.inconsistent:
            return []
        return self.store.delete_older_than(generation - self.keep_generations, now, self.name)

    def run_to_end(self, now: float) -> list[int]:
        """Apply every remaining endpoint and clean up at one instant (an undelayed enactor)."""
        while self.state == EnactorState.APPLYING:
            self.apply_next(now)
        return self.cleanup(now) if self.state == EnactorState.CLEANUP_PENDING else []

    def _require(self, state: EnactorState) -> None:
        if self.state != state:
            raise RuntimeError(f"enactor {self.name} is {self.state}, not {state}")

    def _reset(self) -> None:
        self.state = EnactorState.IDLE
        self.plan = None
        self.pending = []
