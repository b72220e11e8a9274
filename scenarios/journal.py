"""What a run records as it goes: `RunState` (tallies, events, rows) and the `Journal` components report to."""

from __future__ import annotations

import collections
import random
import tempfile
import weakref
from dataclasses import dataclass, field
from typing import IO, Any

from lb.balancer import LbEvent
from lb.checker import ProbeReport
from scenarios.outcomes import CapacityTally, EventTally, ModeTally, RecoveryTally, RequestTally, Sample
from scenarios.traffic import RequestResult
from worlds.base import Clock

# Lateness samples kept for the p99: a bounded reservoir, so a long run cannot grow memory without limit.
RESERVOIR = 20000
# Events kept in memory (and so in events.jsonl): far more than a scenario logs, but a run that never ends
# (`lbsim serve`) must not keep every health transition it ever saw. Later ones are counted, not kept.
MAX_EVENTS = 200_000


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
    lag_seen: int = 0
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


class Journal:
    """The callbacks the load balancer, checker and control plane report through, writing into one `RunState`.

    `clock` stamps control-plane events that carry no time of their own; `rng` picks which values the bounded
    reservoirs (probe lateness, loop lag) keep once they are full.
    """

    def __init__(self, state: RunState, clock: Clock, rng: random.Random) -> None:
        self.state = state
        self.clock = clock
        self.rng = rng
        self.transitions: collections.Counter[str] = collections.Counter()  # healthy <-> unhealthy

    def log(self, at: float, kind: str, subject: str, extra: dict[str, Any]) -> dict[str, Any]:
        """Record one event at sim time `at`; return its entry (the caller may add to it, e.g. `applied_at`)."""
        entry = {"t": round(at, 4), "kind": kind, "subject": subject, **extra}
        self.state.add_event(entry)
        return entry

    def on_lb_event(self, ev: LbEvent) -> None:
        self.log(ev.at, ev.kind, ev.subject, {"detail": ev.detail} if ev.detail else {})
        if ev.kind == "mode":
            self.state.modes.add(ev.at, ev.subject, ev.detail)
        if ev.kind == "transition" and ev.detail in ("healthy->unhealthy", "unhealthy->healthy"):
            self.transitions[ev.detail] += 1

    def on_cp_event(self, kind: str, subject: str, data: dict[str, Any]) -> None:
        extra = {k: v for k, v in data.items() if k != "at"}
        self.log(float(data.get("at", self.clock.now())), kind, subject, extra)

    def on_probe(self, report: ProbeReport) -> None:
        st = self.state
        self._reservoir(st.lateness, max(0.0, report.lateness_s), st.probes_seen)
        st.probes_seen += 1

    def on_loop_lag(self, lag_sim_s: float) -> None:
        st = self.state
        self._reservoir(st.loop_lag, lag_sim_s, st.lag_seen)
        st.lag_seen += 1

    def _reservoir(self, values: list[float], value: float, seen: int) -> None:
        """Keep a uniform sample of at most RESERVOIR values of a stream (`seen` before this one)."""
        if len(values) < RESERVOIR:
            values.append(value)
        else:
            j = self.rng.randrange(seen + 1)
            if j < RESERVOIR:
                values[j] = value
