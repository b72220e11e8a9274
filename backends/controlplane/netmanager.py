"""The network manager: a FIFO propagation queue of finite throughput that opens a new instance's network path.

The AWS mechanism (docs/sources.md#aws-summary): after launches resumed at 05:28, Network Manager had
to push network configuration for every instance launched and terminated during the event; propagation
latency rose and new instances ran for hours without network connectivity, while NLB already health-checked
them, so their checks alternated between failing and passing.

Rules of this model:
1. An item (`instance_id`, kind launch | terminate, `enqueued_at`) is served in FIFO order at `rate_per_s`
   items per sim-second. Credit accrues only while the queue is non-empty and carries its fraction from one
   `advance` to the next; an item entering an empty queue starts the clock afresh, so an idle period earns
   nothing and no burst is larger than the elapsed busy time allows (a deterministic single server).
2. Admission control (AWS remediation 4): with `max_depth` set, an item arriving while `depth >= max_depth` is
   rejected, not queued. None = no admission control, as on 2025-10-20. Separately, `hard_cap` is a safety
   bound on memory, not part of the model: an item arriving while `depth >= hard_cap` is dropped (counted in
   `dropped`, not `rejected`) and the caller sees it refused, as with admission control. Its default is far
   above any backlog a scenario builds, so it never shapes a run.
3. A processed item's propagation delay is `now - enqueued_at`, with `now` the `advance` that served it.
4. A processed launch with `partial_s > 0` opens a partial window until `now + partial_s`: the path is
   `flap` (some connections lost, so health checks alternate) and only then `open`. With `partial_s == 0` the
   path opens at once. Terminate items consume throughput and change no path; enqueuing one ends that
   instance's partial window (nothing is applied to it any more).
5. A rate change credits the time elapsed so far at the old rate (`set_rate(r, now)`); rate 0 stalls the queue.
The shell `NetworkManager` ticks the queue every `tick_s` and turns its decisions into path changes through an
`apply` callback; it never touches a socket itself.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Self

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import Field, model_validator

from backends.netpath import PathConfig
from simconfig import ConfigModel, Fraction, MaxDepth, PerSecond, Seconds, Whole, validated
from worlds.base import Clock

log = logging.getLogger(__name__)

# Float slack for the credit: a rate like 3/s ticked every 0.1 s sums to 2.9999999, which must count as 3.
_EPS = 1e-9

# The backlog's hard cap by default: hours of backlog at any rate a scenario uses, and a few MB of items.
DEFAULT_HARD_CAP = 100_000

# Propagation delays in sim seconds: from one tick on a healthy queue to the five-hour backlog of 2025-10-20.
DELAY_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 21600)


class ItemKind(StrEnum):
    LAUNCH = "launch"
    TERMINATE = "terminate"


@dataclass(frozen=True, slots=True)
class Item:
    """One network-configuration change waiting to propagate."""

    instance_id: str
    kind: ItemKind
    enqueued_at: float


@dataclass(frozen=True, slots=True)
class Processed:
    """An item the queue served at `at`; `partial_until` is set for a launch that opens partially first."""

    item: Item
    at: float
    partial_until: float | None = None

    @property
    def delay(self) -> float:
        return self.at - self.item.enqueued_at


def _check(**values: object) -> None:
    """The settings' rules (NetworkManagerSettings) for values handed to the core directly, not by a config;
    ValueError names the field."""
    validated(NetworkManagerSettings, values)


class PropagationQueue:
    """The pure core: FIFO, rate, admission and partial windows, driven by the caller's `now`."""

    def __init__(
        self,
        rate_per_s: float,
        max_depth: int | None = None,
        partial_s: float = 0.0,
        hard_cap: int = DEFAULT_HARD_CAP,
    ) -> None:
        _check(rate_per_s=rate_per_s, max_depth=max_depth, partial_s=partial_s, hard_cap=hard_cap)
        self._rate = float(rate_per_s)
        self._max_depth = max_depth
        self.hard_cap = hard_cap
        self.partial_s = float(partial_s)
        self._items: collections.deque[Item] = collections.deque()
        self._credit = 0.0
        self._last: float | None = None  # when credit was last brought up to date
        self._partial: dict[str, float] = {}  # instance id -> end of its partial window
        self.processed: collections.Counter[ItemKind] = collections.Counter()
        self.rejected = 0  # by admission control (rule 2)
        self.dropped = 0  # by the hard cap

    @property
    def rate_per_s(self) -> float:
        return self._rate

    @property
    def max_depth(self) -> int | None:
        return self._max_depth

    @property
    def depth(self) -> int:
        return len(self._items)

    def items(self) -> list[Item]:
        """The waiting items, head first."""
        return list(self._items)

    def enqueue(self, item: Item, now: float) -> bool:
        """Queue an item; False if admission control rejected it (rule 2) or the hard cap dropped it."""
        if self._max_depth is not None and len(self._items) >= self._max_depth:
            self.rejected += 1
            return False
        # After admission control, so the modelled mitigation is what a run reports whenever it applies.
        if len(self._items) >= self.hard_cap:
            self.dropped += 1
            return False
        if not self._items:
            # Rule 1: the server was idle, so its clock starts now and earlier idle time earns nothing.
            self._credit = 0.0
            self._last = now
        self._items.append(item)
        if item.kind is ItemKind.TERMINATE:
            self._partial.pop(item.instance_id, None)
        return True

    def advance(self, now: float) -> list[Processed]:
        """Serve every item the busy time up to `now` pays for, head first."""
        self._accrue(now)
        served = min(len(self._items), math.floor(self._credit + _EPS))
        out: list[Processed] = []
        for _ in range(served):
            item = self._items.popleft()
            self.processed[item.kind] += 1
            until = None
            if item.kind is ItemKind.LAUNCH and self.partial_s > 0:
                until = now + self.partial_s
                self._partial[item.instance_id] = until
            out.append(Processed(item, now, until))
        self._credit = max(0.0, self._credit - served) if self._items else 0.0
        return out

    def set_rate(self, rate_per_s: float, now: float | None = None) -> None:
        """Change the rate; with `now`, the busy time up to `now` is credited at the old rate first (rule 5)."""
        _check(rate_per_s=rate_per_s)
        rate = float(rate_per_s)
        if now is not None:
            self._accrue(now)
        self._rate = rate

    def set_max_depth(self, max_depth: int | None) -> None:
        """Change admission control; items already queued stay (they were admitted)."""
        _check(max_depth=max_depth)
        self._max_depth = max_depth

    def partial_until(self, instance_id: str) -> float | None:
        """End of the instance's partial window, None if it has none open."""
        return self._partial.get(instance_id)

    def partial_due(self, now: float) -> list[str]:
        """Close and return the partial windows that have ended by `now`, earliest first."""
        due = sorted((until, iid) for iid, until in self._partial.items() if until <= now + _EPS)
        for _, iid in due:
            del self._partial[iid]
        return [iid for _, iid in due]

    def _accrue(self, now: float) -> None:
        if not self._items:
            self._credit = 0.0
            self._last = now
            return
        last = now if self._last is None else self._last
        self._credit += max(0.0, now - last) * self._rate
        self._last = max(last, now)


# (instance id, path state, path parameters): e.g. ("a-i3", "flap", {"loss": 0.4}) or ("a-i3", "open", {}).
Apply = Callable[[str, str, dict[str, float]], Awaitable[None]]


# Also the rule of `set_rate`, which operators use at run time; 0: nothing propagates (a stalled manager).
PropagationRate = Annotated[PerSecond, Field(ge=0)]


class NetworkManagerSettings(ConfigModel):
    """The network manager's tunables (a scenario's `control_plane.network_manager`), in sim seconds."""

    rate_per_s: PropagationRate = 2.0
    max_depth: MaxDepth | None = None
    partial_s: Annotated[Seconds, Field(ge=0)] = 0.0
    partial_loss: Annotated[Fraction, Field(ge=0, le=1)] = 0.4  # a partial window's `flap` loss; >= 0.5: no serving
    # 0: partial paths lose each connection with probability partial_loss; > 0: they are up or down for whole
    # slots of this many sim seconds, the same pattern in every run of a seed at every speed (NetPath `period_s`).
    partial_period_s: Annotated[Seconds, Field(ge=0)] = 0.0
    # A memory bound on the backlog, not the modelled admission control (`max_depth`): beyond it new items are
    # dropped and counted (lbsim_netmanager_dropped_total).
    hard_cap: Annotated[Whole, Field(ge=1)] = DEFAULT_HARD_CAP

    def partial_flap(self) -> dict[str, float]:
        """The `flap` parameters a path gets during its partial window."""
        if self.partial_period_s != 0:  # 0, the default, is per-connection loss: the path's default too
            return {"loss": self.partial_loss, "period_s": self.partial_period_s}
        return {"loss": self.partial_loss}

    @model_validator(mode="after")
    def _flap_fits_a_path(self) -> Self:
        # The path's own rules, so a bad flap fails here rather than mid-run when a partial window opens.
        try:
            PathConfig.parse("flap", self.partial_flap())
        except ValueError as exc:
            raise ValueError(f"partial_loss / partial_period_s: {exc}") from None
        return self


class NetworkManagerConfig(NetworkManagerSettings):
    """The settings, and how the shell ticks and reports."""

    tick_s: Annotated[Seconds, Field(gt=0)] = 0.25
    backlog_threshold: Annotated[Whole, Field(ge=1)] = 1  # depth at which a backlog "starts"; it "clears" at 0


@dataclass(frozen=True, slots=True)
class NetEvent:
    """kind: "backlog-started" (depth reached the threshold) or "backlog-cleared" (the queue emptied)."""

    at: float
    kind: str
    depth: int


class NetworkManager:
    """The asyncio shell: ticks a `PropagationQueue` and applies its decisions to the instances' paths.

    `apply` may also be installed later with `set_apply` (the instance fleet does so, since it needs the
    manager before it can offer the callback). A failing `apply` is logged and the queue goes on.
    """

    def __init__(
        self,
        clock: Clock,
        config: NetworkManagerConfig | None = None,
        registry: CollectorRegistry | None = None,
        apply: Apply | None = None,
        *,
        on_event: Callable[[NetEvent], None] | None = None,
    ) -> None:
        self.config = config or NetworkManagerConfig()
        self._clock = clock
        self._apply = apply
        self.on_event = on_event
        self.queue = PropagationQueue(
            self.config.rate_per_s, self.config.max_depth, self.config.partial_s, self.config.hard_cap
        )
        self.backlogged = False
        self.events: collections.deque[NetEvent] = collections.deque(maxlen=1000)
        self._task: asyncio.Task[None] | None = None
        self.registry = registry if registry is not None else CollectorRegistry()
        self.registry.register(_NetCollector(self))
        self._delay = Histogram(
            "lbsim_netmanager_propagation_delay_seconds",
            "Time from a network-configuration item's submission to its propagation (launch and terminate)",
            buckets=DELAY_BUCKETS,
            registry=self.registry,
        )

    def set_apply(self, apply: Apply) -> None:
        self._apply = apply

    # -- submitting

    def submit_launch(self, instance_id: str) -> bool:
        """Queue a new instance's network configuration; False if admission control or the hard cap refused it."""
        return self._submit(instance_id, ItemKind.LAUNCH)

    def submit_terminate(self, instance_id: str) -> bool:
        """Queue a terminated instance's clean-up; it consumes throughput but changes no path."""
        return self._submit(instance_id, ItemKind.TERMINATE)

    def set_rate(self, rate_per_s: float) -> None:
        self.queue.set_rate(rate_per_s, self._clock.now())

    def set_admission(self, max_depth: int | None) -> None:
        self.queue.set_max_depth(max_depth)

    @property
    def depth(self) -> int:
        return self.queue.depth

    # -- lifecycle

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("network manager already started")
        if self._apply is None:
            raise RuntimeError("network manager has no apply callback (pass one or call set_apply)")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="netmanager")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise asyncio.CancelledError

    async def __aenter__(self) -> NetworkManager:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the loop

    async def _run(self) -> None:
        tick = self.config.tick_s
        due = self._clock.now()
        while True:  # ends when close() cancels it
            await self.step()
            # Absolute ticks so applies that take time do not stretch the period; a late tick skips ahead.
            due = max(due + tick, self._clock.now())
            await self._clock.sleep_until(due)

    async def step(self) -> None:
        """One tick: serve what is due, apply it, close ended partial windows. The loop calls it every tick_s."""
        now = self._clock.now()
        for p in self.queue.advance(now):
            self._delay.observe(p.delay)
            if p.item.kind is ItemKind.LAUNCH:
                if p.partial_until is None:
                    await self._call(p.item.instance_id, "open", {})
                else:
                    await self._call(p.item.instance_id, "flap", self.config.partial_flap())
        for instance_id in self.queue.partial_due(self._clock.now()):
            await self._call(instance_id, "open", {})
        self._check_backlog(self._clock.now())

    async def _call(self, instance_id: str, state: str, params: dict[str, float]) -> None:
        if self._apply is None:
            return
        try:
            await self._apply(instance_id, state, params)
        except Exception:
            log.exception("network manager: applying %s to %s failed", state, instance_id)

    def _submit(self, instance_id: str, kind: ItemKind) -> bool:
        now = self._clock.now()
        dropped = self.queue.dropped
        ok = self.queue.enqueue(Item(instance_id, kind, now), now)
        if dropped == 0 and self.queue.dropped:
            log.warning("network manager: backlog at its hard cap (%d items); dropping new items", self.queue.hard_cap)
        self._check_backlog(now)
        return ok

    def _check_backlog(self, now: float) -> None:
        depth = self.queue.depth
        if not self.backlogged and depth >= self.config.backlog_threshold:
            self.backlogged = True
            self._emit(NetEvent(now, "backlog-started", depth))
        elif self.backlogged and depth == 0:
            self.backlogged = False
            self._emit(NetEvent(now, "backlog-cleared", depth))

    def _emit(self, event: NetEvent) -> None:
        self.events.append(event)
        if self.on_event is not None:
            self.on_event(event)


class _NetCollector(Collector):
    """Reads the queue when scraped."""

    def __init__(self, manager: NetworkManager) -> None:
        self._manager = manager

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        return self._families(fill=True)

    def _families(self, fill: bool = False) -> Iterator[Metric]:
        backlog = GaugeMetricFamily("lbsim_netmanager_backlog", "Network-configuration items waiting to propagate")
        rate = GaugeMetricFamily("lbsim_netmanager_rate_per_second", "Propagation throughput, items per sim-second")
        processed = CounterMetricFamily(
            "lbsim_netmanager_processed", "Network-configuration items propagated, by kind", labels=["kind"]
        )
        rejected = CounterMetricFamily(
            "lbsim_netmanager_rejected", "Network-configuration items rejected by queue-depth admission control"
        )
        dropped = CounterMetricFamily(
            "lbsim_netmanager_dropped",
            "Network-configuration items dropped at the backlog's hard cap (a memory bound, not admission control)",
        )
        if fill:
            q = self._manager.queue
            backlog.add_metric([], q.depth)
            rate.add_metric([], q.rate_per_s)
            for kind in ItemKind:
                processed.add_metric([kind.value], q.processed[kind])
            rejected.add_metric([], q.rejected)
            dropped.add_metric([], q.dropped)
        yield from (backlog, rate, processed, rejected, dropped)
