"""Passive health: what the data path saw of each target, turned into `PassiveStats` for the policies.

The proxy calls `record(target, ok, now)` when a real connection to a target ends (ok = it was served) and
puts `stats(target)` into each `TargetView` of the next snapshot. Pure: no clock and no I/O; the caller
passes `now`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from lb.policy import PassiveStats

# How many success times each target keeps. The `passive` policy needs its `min_successes` most recent
# ones, so this bounds the `min_successes` it can use; memory stays bounded however busy a target is.
DEFAULT_KEEP_SUCCESS_TIMES = 32
# With `now`, success times older than this are left out of the stats: no policy window is that long, and a
# target that stopped getting traffic should not look busy in a snapshot.
DEFAULT_HORIZON_S = 600.0


@dataclass(slots=True)
class _Record:
    consecutive_failures: int = 0
    successes: int = 0
    failures: int = 0
    last_success_at: float | None = None
    last_failure_at: float | None = None
    success_times: deque[float] = field(default_factory=deque)


class PassiveTracker:
    """Counts data-path outcomes per target: consecutive failures, totals, last times, recent successes."""

    def __init__(
        self, keep_success_times: int = DEFAULT_KEEP_SUCCESS_TIMES, horizon_s: float = DEFAULT_HORIZON_S
    ) -> None:
        if keep_success_times < 0:
            raise ValueError(f"keep_success_times must be >= 0, got {keep_success_times}")
        if horizon_s <= 0:
            raise ValueError(f"horizon_s must be > 0, got {horizon_s}")
        self.keep_success_times = keep_success_times
        self.horizon_s = horizon_s
        self._records: dict[str, _Record] = {}

    def record(self, target_id: str, ok: bool, now: float) -> None:
        """Note the outcome of one real connection to `target_id` that ended at sim time `now`."""
        r = self._records.get(target_id)
        if r is None:
            r = self._records[target_id] = _Record(success_times=deque(maxlen=self.keep_success_times))
        if ok:
            r.successes += 1
            r.consecutive_failures = 0
            # max(): outcomes of overlapping connections may be reported slightly out of order.
            r.last_success_at = now if r.last_success_at is None else max(r.last_success_at, now)
            if self.keep_success_times:
                r.success_times.append(now)
        else:
            r.failures += 1
            r.consecutive_failures += 1
            r.last_failure_at = now if r.last_failure_at is None else max(r.last_failure_at, now)

    def stats(self, target_id: str, now: float | None = None) -> PassiveStats:
        """The target's stats; all zero for a target that has seen no traffic. With `now`, success times older
        than `horizon_s` are dropped for good (they can only get older)."""
        r = self._records.get(target_id)
        if r is None:
            return PassiveStats()
        if now is not None:
            while r.success_times and r.success_times[0] < now - self.horizon_s:
                r.success_times.popleft()
        return PassiveStats(
            consecutive_failures=r.consecutive_failures,
            successes=r.successes,
            failures=r.failures,
            last_success_at=r.last_success_at,
            last_failure_at=r.last_failure_at,
            recent_success_times=tuple(
                sorted(at for at in r.success_times if now is None or at >= now - self.horizon_s)
            ),
        )

    def snapshot(self, now: float | None = None) -> dict[str, PassiveStats]:
        """Stats of every target seen so far."""
        return {tid: self.stats(tid, now) for tid in self._records}

    def forget(self, target_id: str) -> None:
        """Drop a deregistered target, so a new target reusing the id starts clean."""
        self._records.pop(target_id, None)

    def reset(self) -> None:
        self._records.clear()
