"""The health-check subsystem of one zone node: probes scheduled with jitter under finite capacity.

Two layers, so the interesting behaviour can be tested without sockets or sleeping:

* `ProbeSchedule` is pure: it is told `now` (sim seconds) and answers which probes start now, plus when to
  ask again. It owns the per-target due times, the jitter, the in-flight limit, the start-rate token bucket
  and the rule that turns a probe which could only start after its own timeout into an immediate, "late"
  timeout. That last rule is the mechanism of the October 2025 AWS event (docs/sources.md#aws-summary): a
  saturated health-check subsystem delays checks, delayed checks count as failures, failures cause
  transitions, and transitions cost the subsystem more work (`charge`).
* `NodeChecker` is the asyncio shell: one scheduler task per node sleeps until the schedule's next wakeup,
  starts every probe that is due (each a bare future from `lb.probes.start_probe`), and reports each verdict
  as a `ProbeReport`.

Their configuration, `CheckConfig` (the target group's `CheckSettings` and how a probe reaches a target) and
`CheckerCapacity`, are pydantic models holding their own rules; a scenario's `health_check` and `checker` are them.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import logging
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal, NamedTuple

from pydantic import AfterValidator, BeforeValidator, Field, PlainSerializer

from lb.health import (
    AWS_DEFAULT_HEALTHY_THRESHOLD,
    AWS_DEFAULT_INTERVAL_S,
    AWS_DEFAULT_SUCCESS_CODES,
    AWS_DEFAULT_TIMEOUT_HTTP_S,
    AWS_DEFAULT_UNHEALTHY_THRESHOLD,
    AWS_THRESHOLD_RANGE,
    THRESHOLD_RANGE,
    format_success_codes,
    parse_success_codes,
)
from lb.probes import Prober, check_host_header, check_path
from lb.targets import ProbeOutcome, Target
from simconfig import ConfigModel, Fraction, Number, Seconds, UnlimitedRate, Whole, validated
from worlds.base import Clock

log = logging.getLogger(__name__)

# Float slack for "is it time yet" comparisons. Wakeups are computed as sums (due + timeout, refill time);
# without it, a scheduler woken exactly at such a time could see 0.9999999 tokens or a lateness a hair
# under the timeout and go back to sleep for 0 s, forever.
_EPS: Final = 1e-9

# The scheduler's wall-clock wake-ups are rounded up to this grid. Measured at a steady 1,000 HTTP probes/s
# (1,000 targets, interval 1 s, one core): waking at every probe's own due time costs 150-175 us of CPU per probe
# on asyncio and 210-220 us on uvloop (an event-loop pass and an epoll_wait per wake-up); on a 5 ms grid the due
# probes start in batches and the cost falls to 100-140 us (HAProxy: 54-69 us), for at most 5 ms of wall time
# of added lateness (p50 2.5 ms). The grid is absolute (multiples of loop.time()), so the checkers of all nodes
# in one process wake together. 0 disables it.
DEFAULT_WAKE_GRID_S_LOOP: Final = 0.005

ProbeFn = Callable[[str, int, float], Awaitable[ProbeOutcome]]
"""(host, port, timeout in loop seconds) -> verdict. Must not raise except for cancellation."""


def _threshold(v: int) -> int:
    lo, hi = THRESHOLD_RANGE
    if not lo <= v <= hi:
        alo, ahi = AWS_THRESHOLD_RANGE
        raise ValueError(f"must be from {lo} to {hi} (AWS allows {alo}-{ahi}; 1 is allowed here, with a note)")
    return v


def _matcher(v: Any) -> Any:
    return parse_success_codes(v) if isinstance(v, str) else v


# Consecutive checks that make a verdict. The range is checked by `_threshold`, for a message that mentions AWS's;
# it is declared for the JSON Schema.
Threshold = Annotated[
    Whole,
    AfterValidator(_threshold),
    Field(json_schema_extra={"minimum": THRESHOLD_RANGE[0], "maximum": THRESHOLD_RANGE[1]}),
]
# The status codes that pass an HTTP check: a set, or given and written as AWS's matcher ("200-399", "200,302").
SuccessCodes = Annotated[
    frozenset[Annotated[int, Field(ge=100, le=599)]],
    Field(min_length=1),
    BeforeValidator(_matcher, json_schema_input_type=str),
    PlainSerializer(format_success_codes, return_type=str, when_used="json"),
]
# What each health transition costs a checker, in probe starts (see CheckerCapacity).
TransitionCost = Annotated[Number, Field(ge=0)]


class CheckSettings(ConfigModel):
    """A target group's health check as its owner sets it, in sim seconds: what a probe asks, how often, and how
    many answers make a verdict (AWS's defaults for HTTP, docs/sources.md#nlb-health). `quorum`: how many zone
    nodes must agree on a verdict (None: a strict majority)."""

    protocol: Literal["http", "tcp"] = "http"
    path: Annotated[str, AfterValidator(check_path)] = "/health"
    interval_s: Annotated[Seconds, Field(gt=0)] = AWS_DEFAULT_INTERVAL_S
    timeout_s: Annotated[Seconds, Field(gt=0)] = AWS_DEFAULT_TIMEOUT_HTTP_S
    healthy_threshold: Threshold = AWS_DEFAULT_HEALTHY_THRESHOLD
    unhealthy_threshold: Threshold = AWS_DEFAULT_UNHEALTHY_THRESHOLD
    success_codes: SuccessCodes = Field(
        default=parse_success_codes(AWS_DEFAULT_SUCCESS_CODES), json_schema_extra={"default": AWS_DEFAULT_SUCCESS_CODES}
    )
    jitter: Annotated[Fraction, Field(ge=0, lt=1)] = 0.1  # each interval is stretched by U[1 - jitter, 1 + jitter]
    quorum: Annotated[Whole, Field(ge=1)] | None = None


class CheckConfig(CheckSettings):
    """A node checker's configuration: the target group's health check and how a probe reaches a target."""

    port: Annotated[Whole, Field(ge=1, le=65535)] | None = None  # None: the target's traffic port
    host_header: Annotated[str, AfterValidator(check_host_header)] = "lbsim"

    def prober(self) -> Prober:
        return Prober(self.protocol, self.path, self.host_header, self.success_codes)


class CheckerCapacity(ConfigModel):
    """How much probing one node's checker can do: concurrent probes and probe starts per sim second.

    `burst` is the token bucket's depth (default: one second's worth, at least 1). `transition_cost` is
    what the balancer `charge`s per health transition, in probe starts (AWS re-verification and DNS work).
    `max_per_second` may be infinite (`math.inf`, `.inf` in YAML) for "no rate limit".
    """

    max_in_flight: Annotated[Whole, Field(ge=1)] = 1000
    max_per_second: UnlimitedRate = 1000.0
    burst: Annotated[Number, Field(ge=1)] | None = None  # in probe starts
    transition_cost: TransitionCost = 0.0

    @property
    def effective_burst(self) -> float:
        return max(1.0, self.max_per_second) if self.burst is None else self.burst


class DueProbe(NamedTuple):
    """A probe the schedule lets start now. `late`: it is already past its timeout, so it is not sent but
    counts as a timeout at once; it took a start token but no in-flight slot."""

    target_id: str
    due: float
    late: bool


class ProbeSchedule:
    """Pure probe scheduling for one checker node: due times, jitter and capacity; sim seconds throughout.

    Rules:
    1. A new target's first probe is due uniformly in [now, now + interval), so targets added together spread.
    2. When a probe starts, its target's next one is planned from the *scheduled* due:
       next = due + interval * (1 + U(-jitter, +jitter)). A checker that falls behind stays behind (lateness
       grows) instead of queueing missed probes: each target has exactly one planned probe.
    3. A target never has two probes in flight: a probe that falls due while the previous one still runs
       waits for it (and grows late).
    4. A probe starts only with a token from the start-rate bucket (rate `max_per_second`, depth `burst`) and,
       unless late, a free in-flight slot (at most `max_in_flight`). `charge(units)` takes tokens (possibly
       into debt), which delays every later probe.
    5. Lateness = start - due. A probe whose lateness reaches its timeout is not sent: it becomes a `late`
       timeout at once, taking a token but no slot. (Lateness equal to the timeout already leaves no time
       for the probe, so ">=" is the boundary.)
    Due probes start in order of due time, so the most overdue one is always served first.
    """

    def __init__(
        self,
        interval_s: float,
        timeout_s: float,
        jitter: float = 0.0,
        max_in_flight: int = 1000,
        max_per_second: float = 1000.0,
        burst: float | None = None,
        rng: random.Random | None = None,
    ) -> None:
        # The configs' rules, for values handed to the core directly.
        validated(CheckSettings, {"interval_s": interval_s, "timeout_s": timeout_s, "jitter": jitter})
        capacity = validated(
            CheckerCapacity, {"max_in_flight": max_in_flight, "max_per_second": max_per_second, "burst": burst}
        )
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.jitter = jitter
        self.max_in_flight = max_in_flight
        self.rate = max_per_second
        self.burst = capacity.effective_burst
        self._rng = rng if rng is not None else random.Random(0)
        self._tokens = self.burst
        self._refilled_at: float | None = None  # the bucket starts full at the first time it is asked
        self._heap: list[tuple[float, int, str]] = []  # (due, seq, target); seq breaks ties deterministically
        self._seq = 0
        self._entry: dict[str, int] = {}  # target -> seq of its one live planned probe (older heap rows are stale)
        self._waiting: dict[str, tuple[float, int]] = {}  # due probes held back by rule 3
        self._running: set[str] = set()

    @classmethod
    def from_config(cls, config: CheckConfig, capacity: CheckerCapacity, rng: random.Random) -> ProbeSchedule:
        return cls(
            config.interval_s,
            config.timeout_s,
            config.jitter,
            capacity.max_in_flight,
            capacity.max_per_second,
            capacity.burst,
            rng,
        )

    # -- targets -------------------------------------------------------------------------------------------

    def add(self, target_id: str, now: float) -> float:
        """Start scheduling a target; return its first due time. Adding a known target changes nothing."""
        if target_id in self._entry:
            return self.due_of(target_id)
        due = now + self._rng.random() * self.interval_s
        self._push(target_id, due)
        return due

    def remove(self, target_id: str) -> None:
        """Stop scheduling a target. Its running probe (if any) still holds a slot until `finish`."""
        self._entry.pop(target_id, None)
        self._waiting.pop(target_id, None)

    def __contains__(self, target_id: object) -> bool:
        return target_id in self._entry

    def __len__(self) -> int:
        return len(self._entry)

    def due_of(self, target_id: str) -> float:
        """When the target's planned probe is (or was) due."""
        seq = self._entry[target_id]
        waiting = self._waiting.get(target_id)
        if waiting is not None:
            return waiting[0]
        return next(due for due, s, t in self._heap if s == seq and t == target_id)

    # -- capacity ------------------------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._running)

    def is_running(self, target_id: str) -> bool:
        return target_id in self._running

    def tokens(self, now: float) -> float:
        """Start tokens available at `now` (negative while a `charge` is being paid off)."""
        self._refill(now)
        return self._tokens

    def charge(self, units: float, now: float) -> None:
        """Spend `units` probe starts on other work; the bucket may go into debt, delaying later probes."""
        if not (math.isfinite(units) and units >= 0):
            raise ValueError(f"charge units must be a finite number >= 0, got {units}")
        self._refill(now)
        self._tokens -= units

    def finish(self, target_id: str) -> bool:
        """A started (non-late) probe ended. Return True if that lets a waiting probe start, so an
        event-driven caller knows it should look again before its planned wakeup."""
        if target_id not in self._running:
            return False
        freed_slot = len(self._running) >= self.max_in_flight
        self._running.discard(target_id)
        waiting = self._waiting.pop(target_id, None)
        if waiting is not None and self._entry.get(target_id) == waiting[1]:
            heapq.heappush(self._heap, (waiting[0], waiting[1], target_id))
            return True
        return freed_slot and bool(self._heap)

    # -- scheduling ----------------------------------------------------------------------------------------

    def pop_due(self, now: float, lookahead: float = 0.0) -> list[DueProbe]:
        """Every probe that may start at `now`, most overdue first; each is marked running (unless late).

        `lookahead` also releases probes due up to that much later (they start early by at most that); tokens
        and lateness are still judged at `now`."""
        self._refill(now)
        out: list[DueProbe] = []
        heap = self._heap
        while heap:
            due, seq, target = heap[0]
            if due > now + lookahead:
                break
            if self._entry.get(target) != seq:
                heapq.heappop(heap)  # stale: the target was removed (or re-added) since this was planned
                continue
            if target in self._running:
                heapq.heappop(heap)
                self._waiting[target] = (due, seq)  # rule 3: wait for the target's own running probe
                continue
            if self._tokens < 1 - _EPS:
                break
            late = now - due >= self.timeout_s - _EPS
            if not late and len(self._running) >= self.max_in_flight:
                break  # every later entry is due later, so none of them is late either
            heapq.heappop(heap)
            self._tokens -= 1
            self._push(target, due + self.interval_s * (1 + self._rng.uniform(-self.jitter, self.jitter)))
            if not late:
                self._running.add(target)
            out.append(DueProbe(target, due, late))
        return out

    def next_wakeup(self, now: float) -> float | None:
        """The earliest sim time at which `pop_due` could return something, assuming no probe finishes
        before then (a finish that frees capacity is signalled by `finish` instead). None: nothing planned."""
        heap = self._heap
        while heap and self._entry.get(heap[0][2]) != heap[0][1]:
            heapq.heappop(heap)
        if not heap:
            return None
        due = heap[0][0]
        at = due
        tokens = self._peek_tokens(now)
        if tokens < 1 - _EPS:
            at = max(at, now + (1 - tokens) / self.rate)
        if len(self._running) >= self.max_in_flight and heap[0][2] not in self._running:
            at = max(at, due + self.timeout_s)  # no slot: the head can only start as a late timeout
        return at

    # -- internals -----------------------------------------------------------------------------------------

    def _push(self, target_id: str, due: float) -> None:
        self._seq += 1
        self._entry[target_id] = self._seq
        heapq.heappush(self._heap, (due, self._seq, target_id))

    def _peek_tokens(self, now: float) -> float:
        if math.isinf(self.rate):
            return self.burst  # any debt is repaid, and the bucket refilled, in no time
        if self._refilled_at is None:
            return self._tokens
        elapsed = now - self._refilled_at
        if elapsed <= 0:
            return self._tokens
        return min(self.burst, self._tokens + elapsed * self.rate)

    def _refill(self, now: float) -> None:
        self._tokens = self._peek_tokens(now)
        if self._refilled_at is None or now > self._refilled_at:
            self._refilled_at = now


@dataclass(frozen=True, slots=True)
class ProbeReport:
    """One probe's verdict as one node saw it; all times in sim seconds."""

    node: str
    target_id: str
    outcome: ProbeOutcome
    due: float
    started: float
    finished: float
    lateness_s: float  # started - due
    duration_s: float  # finished - started; 0 for a late probe
    late: bool  # never sent: it could only have started after its timeout


class NodeChecker:
    """One zone node's checker: probes every added target on its schedule and reports each verdict.

    One scheduler task sleeps until the schedule's next wakeup (rounded up to `wake_grid_s_loop`, see
    DEFAULT_WAKE_GRID_S_LOOP) and starts all due probes in one batch. Each probe is a bare future from
    `lb.probes.start_probe` (a task only for a scripted `prober`), finished by a done callback. The scheduler
    is woken early when a target is added or a finished probe frees capacity that a due probe waits for.
    Config times are sim seconds; probes get the timeout in loop seconds (`clock.to_loop`), and reports carry
    sim seconds. `on_report` is called from the event loop and must not block; an exception it raises is
    logged and does not stop the checker.
    """

    def __init__(
        self,
        node: str,
        clock: Clock,
        config: CheckConfig,
        capacity: CheckerCapacity,
        on_report: Callable[[ProbeReport], None],
        seed: int = 0,
        *,
        prober: ProbeFn | None = None,
        wake_grid_s_loop: float = DEFAULT_WAKE_GRID_S_LOOP,
    ) -> None:
        if not (math.isfinite(wake_grid_s_loop) and wake_grid_s_loop >= 0):
            raise ValueError(f"wake_grid_s_loop must be a finite number >= 0, got {wake_grid_s_loop}")
        self.node = node
        self.config = config
        self.capacity = capacity
        self._clock = clock
        self._on_report = on_report
        self._schedule = ProbeSchedule.from_config(config, capacity, random.Random(seed))
        # The built-in prober starts a probe as a bare future (no task: see lb.probes); a scripted one runs
        # as a task, which is a future too.
        self._start_probe: Callable[[str, int, float], asyncio.Future[ProbeOutcome]]
        if prober is None:
            self._start_probe = config.prober().start
        else:
            scripted = prober
            self._start_probe = lambda host, port, timeout: asyncio.ensure_future(scripted(host, port, timeout))
        self._timeout_loop = clock.to_loop(config.timeout_s)
        # Never let the grid take more than 5% of a probe's timeout: at high speeds a few wall milliseconds are
        # a lot of sim time, and grid lateness alone must not push probes towards late timeouts.
        self._grid = min(wake_grid_s_loop, self._timeout_loop / 20)
        self._targets: dict[str, Target] = {}
        self._probing: dict[str, asyncio.Future[ProbeOutcome]] = {}  # target -> its probe in flight
        self._pending: set[asyncio.Future[ProbeOutcome]] = set()  # every probe not yet done, removed targets' too
        self._scheduler: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None
        self._kicked = False
        # A world's clock converts sim to loop time exactly, so the scheduler can sleep on a loop timer
        # that a wake-up simply pre-empts. Other clocks (ManualClock) need their own sleep() raced.
        self._loop_timers = clock.loop_timers

    # -- public API ----------------------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return self._schedule.in_flight

    @property
    def schedule(self) -> ProbeSchedule:
        """The pure schedule (read it, don't drive it: the scheduler task does)."""
        return self._schedule

    @property
    def running(self) -> bool:
        return self._scheduler is not None and not self._scheduler.done()

    def add_target(self, target: Target) -> None:
        """Start checking a target (its first probe is due within one interval). Re-adding is a no-op."""
        if target.id in self._targets:
            return
        self._targets[target.id] = target
        self._schedule.add(target.id, self._clock.now())
        self._kick()

    def remove_target(self, target_id: str) -> None:
        """Stop checking a target; a probe of it in flight is cancelled and not reported."""
        if self._targets.pop(target_id, None) is None:
            return
        self._schedule.remove(target_id)
        probe = self._probing.pop(target_id, None)
        if probe is not None:
            probe.cancel()

    def charge(self, units: float) -> None:
        """Spend `units` probe starts of capacity on other work (see `ProbeSchedule.charge`)."""
        self._schedule.charge(units, self._clock.now())

    def start(self) -> None:
        """Start the scheduler task; needs a running event loop."""
        if self.running:
            raise RuntimeError(f"checker {self.node} is already running")
        self._scheduler = asyncio.get_running_loop().create_task(self._run(), name=f"checker-{self.node}")
        self._scheduler.add_done_callback(self._scheduler_done)

    def _scheduler_done(self, task: asyncio.Task[None]) -> None:
        # The loop never returns on its own; if it died of a bug, say so loudly: no probes run any more.
        if not task.cancelled() and task.exception() is not None:
            log.error("checker %s: scheduler died; no more probes", self.node, exc_info=task.exception())

    async def stop(self) -> None:
        """Cancel the scheduler and every probe and wait for all of them: no task outlives this call."""
        tasks: list[asyncio.Future[Any]] = list(self._pending)
        if self._scheduler is not None:
            tasks.append(self._scheduler)
            self._scheduler = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- scheduler -----------------------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        clock, schedule = self._clock, self._schedule
        # Wake-ups are batched on a wall-clock grid (cheap: one timer per tick, not per probe). Rounding a wake-up
        # *up* to the grid would start every probe up to one tick late; instead we wake a tick ahead and start
        # what falls due within it, so a healthy checker starts probes at most one tick early, never late, and
        # only saturation shows up as lateness.
        lookahead = self.lookahead_s
        while True:
            now = clock.now()
            due = schedule.pop_due(now, lookahead)
            for item in due:
                target = self._targets.get(item.target_id)
                if target is None:  # removed by a report callback earlier in this batch
                    schedule.finish(item.target_id)
                elif item.late:
                    lateness = now - item.due
                    timeout = ProbeOutcome.TIMEOUT
                    self._report(ProbeReport(self.node, target.id, timeout, item.due, now, now, lateness, 0.0, True))
                else:
                    self._launch(target, item.due, now)
            if self._kicked:  # a report callback added a target or freed capacity: look again
                self._kicked = False
                continue
            wakeup = schedule.next_wakeup(now)
            if wakeup is None:
                await self._sleep(loop, None)
                continue
            delay = wakeup - lookahead - clock.now()
            if not due and delay <= 0:
                # Woken a lookahead early, and nothing could start yet (no token, or no free slot until the head
                # is late): wait for the wake-up itself. Under a clock that moves only while everyone waits (the
                # simulated world's), looking again at once would find the same instant forever.
                delay = wakeup - clock.now()
            await self._sleep(loop, delay)

    @property
    def lookahead_s(self) -> float:
        """How early (sim seconds) a probe may start: one wake-up grid tick, or 0 without a grid."""
        return self._clock.to_sim(self._grid) if self._loop_timers and self._grid > 0 else 0.0

    async def _sleep(self, loop: asyncio.AbstractEventLoop, sim_seconds: float | None) -> None:
        """Sleep `sim_seconds` (None: until kicked), returning early when `_kick` is called."""
        fut: asyncio.Future[None] = loop.create_future()
        self._wake = fut
        timer: asyncio.TimerHandle | None = None
        sleeper: asyncio.Task[None] | None = None
        if sim_seconds is not None:
            if self._loop_timers:
                at = loop.time() + max(0.0, self._clock.to_loop(sim_seconds))
                if self._grid > 0:
                    at = math.ceil(at / self._grid) * self._grid
                timer = loop.call_at(at, _resolve, fut)
            else:
                sleeper = loop.create_task(self._clock.sleep(sim_seconds))
                sleeper.add_done_callback(lambda _: _resolve(fut))
        try:
            await fut
        finally:
            self._wake = None
            if timer is not None:
                timer.cancel()
            if sleeper is not None and not sleeper.done():
                sleeper.cancel()
                await asyncio.gather(sleeper, return_exceptions=True)

    def _kick(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)
        else:
            self._kicked = True

    def _launch(self, target: Target, due: float, started: float) -> None:
        port = self.config.port if self.config.port is not None else target.port
        try:
            probe = self._start_probe(target.host, port, self._timeout_loop)
        except Exception:
            # Only a broken scripted prober gets here; the scheduler must survive it.
            log.exception("checker %s: could not start a probe of %s", self.node, target.id)
            if self._schedule.finish(target.id):
                self._kick()
            return
        self._probing[target.id] = probe
        self._pending.add(probe)
        probe.add_done_callback(functools.partial(self._probe_done, target.id, due, started))

    def _probe_done(self, target_id: str, due: float, started: float, probe: asyncio.Future[ProbeOutcome]) -> None:
        # All bookkeeping lives here, in the done callback, so it runs however the probe ended (a task
        # cancelled before its first step never runs its body's `finally`).
        finished = self._clock.now()
        self._pending.discard(probe)
        if self._probing.get(target_id) is probe:
            del self._probing[target_id]
        if self._schedule.finish(target_id):
            self._kick()
        if probe.cancelled():
            return  # stopped, or the target was removed: no verdict
        exc = probe.exception()
        if exc is not None:
            log.error("checker %s: probe of %s raised; no verdict", self.node, target_id, exc_info=exc)
            return
        lateness, duration = started - due, finished - started
        report = ProbeReport(self.node, target_id, probe.result(), due, started, finished, lateness, duration, False)
        self._report(report)

    def _report(self, report: ProbeReport) -> None:
        try:
            self._on_report(report)
        except Exception:
            log.exception("checker %s: on_report failed for %s", self.node, report)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
