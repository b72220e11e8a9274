"""Scrapes every component's `/metrics` over HTTP at a sim interval and keeps what Prometheus would have seen.

Rules:
1. One asyncio task scrapes every target concurrently, first at `start()`, then at every multiple of `interval_s`
   of sim time. A round that overruns a tick skips it (as Prometheus does) rather than run two rounds at once.
2. Each body is parsed with `prometheus_client`'s own text parser into tidy rows
   `(t, component, metric, labels, value)`: `t` is the sim time the round started, in ms, and strictly
   increasing from round to round (a round that would share the previous round's ms is moved 1 ms later, so
   two rounds never merge into one scrape time); `metric` the sample's full name (`lbsim_probes_total`,
   `..._bucket`); `labels` the canonical `k1=v1,k2=v2` sorted by key, with `\\`, `,` and `=` in values
   escaped by a backslash.
3. `_created` companions of counters, histograms and summaries (creation timestamps, wall-clock noise) are
   dropped; a gauge whose own name merely ends in `_created` is kept.
4. A component's scrape fails as a whole (refused, timed out after `timeout_s` sim seconds, status other than
   200, unparsable text): none of its rows for that round are kept, the failure is counted per component and
   logged once per component, and the rest of the round goes on. Nothing a target does raises out of the task.
5. Rows go to a spool file (CSV) as each round ends, so memory stays bounded whatever the run's length: only
   the scrape times and counts are held. `rows()` reads them back; `series` and `pivot` are pure helpers over
   any iterable of rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import importlib
import io
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from worlds.base import Clock
from worlds.net import http_connector

log = logging.getLogger(__name__)

CSV_HEADER = ("t", "component", "metric", "labels", "value")
Reduce = Literal["sum", "max", "min"]
_REDUCERS = ("sum", "max", "min")
# Families whose `<name>_created` sibling is prometheus_client's creation timestamp, not a metric of ours.
_HAS_CREATED = frozenset({"counter", "histogram", "summary", "gaugehistogram"})
# Two rounds closer than this would share a scrape time once rounded to ms.
_T_STEP = 0.001
_PARQUET_BATCH = 65536


def _session() -> aiohttp.ClientSession:
    """A client session on the running loop's network, without a cookie jar (aiohttp's reads the wall clock)."""
    return aiohttp.ClientSession(connector=http_connector(), cookie_jar=aiohttp.DummyCookieJar())


class Row(NamedTuple):
    t: float
    component: str
    metric: str
    labels: str
    value: float


# What the pure helpers accept: a `Row` or any tuple of the same shape (hand-made rows in tests).
RowLike = tuple[float, str, str, str, float]


# -- pure core -------------------------------------------------------------------------------------------------


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=")


def canonical_labels(labels: Mapping[str, str]) -> str:
    """`k1=v1,k2=v2`, sorted by key; label names are Prometheus identifiers, so only values need escaping."""
    return ",".join(f"{k}={_escape(labels[k])}" for k in sorted(labels))


def parse_labels(text: str) -> dict[str, str]:
    """The inverse of `canonical_labels`."""
    out: dict[str, str] = {}
    if not text:
        return out
    key: str | None = None
    buf: list[str] = []
    chars = iter(text)
    for ch in chars:
        if ch == "\\":
            buf.append(next(chars, ""))
        elif ch == "=" and key is None:
            key, buf = "".join(buf), []
        elif ch == ",":
            if key is None:
                raise ValueError(f"label without a value in {text!r}")
            out[key], key, buf = "".join(buf), None, []
        else:
            buf.append(ch)
    if key is None:
        raise ValueError(f"label without a value in {text!r}")
    out[key] = "".join(buf)
    return out


def next_tick(now: float, interval_s: float) -> float:
    """The first multiple of `interval_s` after `now` (a `now` a rounding error short of a tick counts as on it,
    so a round woken at 0.3 does not wake again at 0.30000000000000004)."""
    return (math.floor(now / interval_s + 1e-9) + 1) * interval_s


def parse_exposition(t: float, component: str, text: str) -> list[Row]:
    """Rows of one scraped body (rule 2 and 3). Raises ValueError (or whatever the parser raises) on bad text."""
    families = list(text_string_to_metric_families(text))
    created = {f"{f.name}_created" for f in families if f.type in _HAS_CREATED}
    rows: list[Row] = []
    for family in families:
        for s in family.samples:
            if s.name in created:
                continue
            rows.append(Row(t, component, s.name, canonical_labels(s.labels), float(s.value)))
    return rows


def _combine(reduce: Reduce, old: float | None, value: float) -> float:
    if old is None:
        return value
    if reduce == "sum":
        return old + value
    return max(old, value) if reduce == "max" else min(old, value)


def _check_reduce(reduce: str) -> None:
    if reduce not in _REDUCERS:
        raise ValueError(f"reduce must be one of {', '.join(_REDUCERS)}, got {reduce!r}")


def _subset(want: Mapping[str, str], labels: str, cache: dict[str, dict[str, str]]) -> bool:
    if not want:
        return True
    have = cache.get(labels)
    if have is None:
        have = cache[labels] = parse_labels(labels)
    return all(have.get(k) == v for k, v in want.items())


def series(
    rows: Iterable[RowLike],
    metric: str,
    labels: Mapping[str, str] | None = None,
    component: str | None = None,
    reduce: Reduce = "sum",
) -> list[tuple[float, float]]:
    """`(t, value)` in time order for the samples named `metric` whose labels include `labels` (and from
    `component` if given), reduced across every other label value and component per scrape time. Scrape times
    with no matching sample are left out."""
    _check_reduce(reduce)
    want = dict(labels or {})
    cache: dict[str, dict[str, str]] = {}
    acc: dict[float, float] = {}
    for t, comp, name, lbl, value in rows:
        if name != metric or (component is not None and comp != component) or not _subset(want, lbl, cache):
            continue
        acc[t] = _combine(reduce, acc.get(t), value)
    return sorted(acc.items())


@dataclass(frozen=True, slots=True)
class Selector:
    """One column of `pivot`: the samples it sums (or max/min), and its value in a scrape with none of them.

    The default is 0 (right for counters whose label values appear only once something happened); a gauge whose
    absence must not read as zero wants `default=math.nan`.
    """

    metric: str
    # Not hashed: a dict is not hashable, and leaving it out keeps equal selectors' hashes equal.
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    component: str | None = None
    reduce: Reduce = "sum"
    default: float = 0.0

    def __post_init__(self) -> None:
        _check_reduce(self.reduce)


def pivot(
    rows: Iterable[RowLike], columns: Mapping[str, Selector], times: Iterable[float] = ()
) -> list[dict[str, float]]:
    """One dict per scrape time, in time order, with `t` and one key per column. The scrape times are those of
    the rows plus `times` (a round where every target failed leaves no row; pass `Recorder.scrape_times` to keep
    it as a row of defaults). One pass over `rows`, so a spool read back from disk is fine."""
    if "t" in columns:
        raise ValueError("`t` is the scrape time; name the column something else")
    by_metric: dict[str, list[tuple[str, Selector]]] = {}
    for name, sel in columns.items():
        by_metric.setdefault(sel.metric, []).append((name, sel))
    cache: dict[str, dict[str, str]] = {}
    seen: set[float] = set(times)
    acc: dict[float, dict[str, float]] = {}
    for t, comp, metric, lbl, value in rows:
        seen.add(t)
        for name, sel in by_metric.get(metric, ()):
            if (sel.component is not None and comp != sel.component) or not _subset(sel.labels, lbl, cache):
                continue
            cell = acc.setdefault(t, {})
            cell[name] = _combine(sel.reduce, cell.get(name), value)
    out: list[dict[str, float]] = []
    for t in sorted(seen):
        cell = acc.get(t, {})
        row = {"t": t}
        row.update({name: cell.get(name, sel.default) for name, sel in columns.items()})
        out.append(row)
    return out


# -- the spool ---------------------------------------------------------------------------------------------------


class _Spool:
    """CSV lines in a temporary file, appended one round at a time; counts kept so readers see whole rounds."""

    def __init__(self, directory: str | Path | None) -> None:
        fd, name = tempfile.mkstemp(prefix="lbsim-recorder-", suffix=".csv", dir=directory)
        self.path = Path(name)
        self._fh: io.BufferedWriter | None = os.fdopen(fd, "wb")
        self.rows = 0
        self.bytes = 0

    @property
    def closed(self) -> bool:
        return self._fh is None

    def append(self, rows: list[Row]) -> None:
        if self._fh is None or not rows:
            return
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        # repr round-trips a float exactly (inf and nan included), so reading back gives the scraped value.
        w.writerows((repr(r.t), r.component, r.metric, r.labels, repr(r.value)) for r in rows)
        data = buf.getvalue().encode()
        self._fh.write(data)
        # Flushed per round so a reader opening the file by name sees every row counted so far.
        self._fh.flush()
        self.rows += len(rows)
        self.bytes += len(data)

    def read(self) -> Iterator[Row]:
        if self._fh is None:
            raise RuntimeError("the recorder is closed")
        count = self.rows  # rows appended while a reader iterates are not its concern
        if count == 0:
            return
        with self.path.open(encoding="utf-8", newline="") as f:
            for i, (t, component, metric, labels, value) in enumerate(csv.reader(f)):
                if i >= count:
                    break
                yield Row(float(t), component, metric, labels, float(value))

    def copy_to(self, out: io.BufferedWriter) -> None:
        if self._fh is None:
            raise RuntimeError("the recorder is closed")
        remaining = self.bytes
        with self.path.open("rb") as f:
            while remaining > 0:
                chunk = f.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                out.write(chunk)
                remaining -= len(chunk)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self.path.unlink(missing_ok=True)


# -- the asyncio shell -----------------------------------------------------------------------------------------


class Recorder:
    """Scrapes `targets` (component name -> `/metrics` URL on loopback) every `interval_s` sim seconds.

    `timeout_s` (sim seconds, default half the interval) bounds each scrape; the HTTP client gets it as wall time
    through the clock. Rows are spooled under `spool_dir` (the system's temporary directory by default).
    Life cycle: `start()`, then `stop()` (idempotent; the rows stay readable), then `close()` to delete the spool.
    """

    def __init__(
        self,
        clock: Clock,
        targets: Mapping[str, str],
        interval_s: float = 10.0,
        timeout_s: float | None = None,
        spool_dir: str | Path | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.clock = clock
        self.targets = dict(targets)
        self.interval_s = interval_s
        self.timeout_s = timeout_s if timeout_s is not None else interval_s / 2
        self.failures: dict[str, int] = {name: 0 for name in self.targets}
        # One entry per finished round, however many targets: the in-memory index of the spool.
        self.scrape_times: list[float] = []
        self._last_t = -math.inf
        self._spool = _Spool(spool_dir)
        self._logged: set[str] = set()
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def spool_path(self) -> Path:
        return self._spool.path

    @property
    def row_count(self) -> int:
        return self._spool.rows

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    # -- life cycle

    def start(self) -> None:
        """Launch the scrape task; its first round runs at once. Call from a running loop."""
        if self._task is not None:
            raise RuntimeError("the recorder is already started")
        if self._spool.closed:
            raise RuntimeError("the recorder is closed")
        self._session = _session()
        self._task = asyncio.get_running_loop().create_task(self._run(self._session), name="lbsim-recorder")

    async def stop(self) -> None:
        """Cancel and await the scrape task and close its HTTP session. Idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                # Our own cancellation of the task is expected; the caller's must still propagate.
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    await self._close_session()
                    raise
        await self._close_session()

    def close(self) -> None:
        """Delete the spool (after `stop()`; rows of a round still running are then dropped). Idempotent."""
        self._spool.close()

    async def aclose(self) -> None:
        await self.stop()
        self.close()

    async def _close_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # -- scraping

    async def scrape_once(self) -> float:
        """Scrape every target now (also when not started: a final round after `stop()`); returns the round's t."""
        if self._session is not None and not self._session.closed:
            return await self._round(self._session)
        async with _session() as session:
            return await self._round(session)

    async def _run(self, session: aiohttp.ClientSession) -> None:
        while True:  # ends when stop() cancels it
            await self._round(session)
            await self.clock.sleep_until(next_tick(self.clock.now(), self.interval_s))

    async def _round(self, session: aiohttp.ClientSession) -> float:
        # Claimed before the first await, so a concurrent scrape_once gets a later t.
        t = max(round(self.clock.now(), 3), round(self._last_t + _T_STEP, 3))
        self._last_t = t
        timeout = aiohttp.ClientTimeout(total=self.clock.to_loop(self.timeout_s))
        names = list(self.targets)
        bodies = await asyncio.gather(*(self._fetch(session, name, timeout) for name in names))
        rows: list[Row] = []
        for name, body in zip(names, bodies, strict=True):
            if body is None:
                continue
            try:
                rows.extend(parse_exposition(t, name, body))
            except Exception as e:  # the parser's errors are not one documented type; a bad body is a failure
                self._fail(name, f"unparsable metrics: {e!r}")
        self._spool.append(rows)
        self.scrape_times.append(t)
        return t

    async def _fetch(self, session: aiohttp.ClientSession, name: str, limit: aiohttp.ClientTimeout) -> str | None:
        url = self.targets[name]
        try:
            async with session.get(url, timeout=limit) as resp:
                if resp.status != 200:
                    self._fail(name, f"HTTP {resp.status}")
                    return None
                return await resp.text(encoding="utf-8")
        except Exception as e:  # refused, timed out, reset, bad encoding, a session closed under us: all failures
            self._fail(name, repr(e) if str(e) else type(e).__name__)
            return None

    def _fail(self, name: str, why: str) -> None:
        self.failures[name] = self.failures.get(name, 0) + 1
        if name not in self._logged:
            self._logged.add(name)
            log.warning("scrape of %s (%s) failed: %s; further failures of it are only counted",
                        name, self.targets[name], why)

    # -- reading back

    def rows(self) -> Iterator[Row]:
        """Every row recorded so far, in the order rounds finished, read back from the spool."""
        return self._spool.read()

    def write_csv(self, path: str | Path) -> int:
        """Write `t,component,metric,labels,value` with a header; returns the number of rows."""
        count = self._spool.rows
        with Path(path).open("wb") as out:
            out.write((",".join(CSV_HEADER) + "\n").encode())
            self._spool.copy_to(out)
        return count

    def write_parquet(self, path: str | Path) -> bool:
        """Write the rows as Parquet if pyarrow is importable (False, and nothing written, if not)."""
        try:
            pa: Any = importlib.import_module("pyarrow")
            pq: Any = importlib.import_module("pyarrow.parquet")
        except ImportError:
            return False
        schema = pa.schema([
            ("t", pa.float64()), ("component", pa.string()), ("metric", pa.string()), ("labels", pa.string()),
            ("value", pa.float64()),
        ])
        target = Path(path)
        try:
            with pq.ParquetWriter(str(target), schema) as writer:
                batch: list[Row] = []
                for row in self.rows():
                    batch.append(row)
                    if len(batch) >= _PARQUET_BATCH:
                        writer.write_table(_table(pa, schema, batch))
                        batch = []
                writer.write_table(_table(pa, schema, batch))
        except BaseException:
            with contextlib.suppress(OSError):
                target.unlink()
            raise
        return True


def _table(pa: Any, schema: Any, rows: list[Row]) -> Any:
    columns = list(zip(*rows, strict=True)) if rows else [(), (), (), (), ()]
    return pa.Table.from_arrays([pa.array(list(c), type=f.type) for c, f in zip(columns, schema, strict=True)],
                                schema=schema)


__all__ = [
    "CSV_HEADER",
    "Recorder",
    "Reduce",
    "Row",
    "RowLike",
    "Selector",
    "canonical_labels",
    "next_tick",
    "parse_exposition",
    "parse_labels",
    "pivot",
    "series",
]
