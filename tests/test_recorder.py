"""The recorder: pure parsing, label, series and pivot helpers, and scrapes of real `/metrics` servers on loopback."""

from __future__ import annotations

import asyncio
import csv
import logging
import math
import socket
import sys
from pathlib import Path

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from support import LOOPS, open_sockets, run_on, wait_for

from lb.metrics import MetricsServer
from scenarios.recorder import (
    CSV_HEADER,
    Recorder,
    Row,
    Selector,
    canonical_labels,
    next_tick,
    parse_exposition,
    parse_labels,
    pivot,
    series,
)
from worlds.clock import ScaledClock

SPEED = 100.0  # sim seconds per wall second: a 10 s interval is 0.1 s of wall time
INTERVAL = 10.0
# A round starts when its timer fires; on a loaded 2-core machine that can be some tens of wall ms late.
LATE_S = 0.05 * SPEED


class Metrics:
    """A fresh registry with the two kinds of series the recorder must follow."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.level = Gauge("lbsim_test_level", "a gauge", registry=self.registry)
        self.events = Counter("lbsim_test_events", "a labelled counter", ["zone", "kind"], registry=self.registry)


def url(port: int) -> str:
    return f"http://127.0.0.1:{port}/metrics"


def free_port() -> int:
    """A loopback port nobody listens on: bound, then closed, so connecting is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def values(rec: Recorder, metric: str, **labels: str) -> list[tuple[float, float]]:
    return series(rec.rows(), metric, labels)


# -- pure core ---------------------------------------------------------------------------------------------------


def test_canonical_labels_sort_by_key_and_escape_values() -> None:
    assert canonical_labels({}) == ""
    assert canonical_labels({"zone": "a", "kind": "ok"}) == "kind=ok,zone=a"
    assert canonical_labels({"k": "a,b=c\\d"}) == "k=a\\,b\\=c\\\\d"
    assert parse_labels("k=a\\,b\\=c\\\\d,z=") == {"k": "a,b=c\\d", "z": ""}
    with pytest.raises(ValueError, match="without a value"):
        parse_labels("novalue")


@given(st.dictionaries(st.from_regex(r"[a-z_][a-z0-9_]{0,5}", fullmatch=True), st.text(max_size=8), max_size=4))
def test_parse_labels_inverts_canonical_labels(labels: dict[str, str]) -> None:
    assert parse_labels(canonical_labels(labels)) == labels


def test_next_tick_is_the_next_multiple_of_the_interval() -> None:
    assert next_tick(0.0, 10.0) == 10.0
    assert next_tick(9.99, 10.0) == 10.0
    assert next_tick(10.0, 10.0) == 20.0
    assert next_tick(10.004, 10.0) == 20.0
    # 0.3 / 0.1 is 2.9999999999999996 in floats: still on the tick, so the next one is 0.4, not 0.3 again.
    assert next_tick(0.3, 0.1) == pytest.approx(0.4)


def test_parse_exposition_keeps_full_sample_names_and_drops_created_companions() -> None:
    m = Metrics()
    m.events.labels(zone="a", kind="ok").inc(3)
    Histogram("lbsim_test_duration_seconds", "h", buckets=(0.1, 1.0), registry=m.registry).observe(0.5)
    # A gauge of its own whose name ends in _created is a metric, not a creation timestamp.
    Gauge("lbsim_test_boot_created", "g", registry=m.registry).set(7)
    text = generate_latest(m.registry).decode()
    assert "lbsim_test_events_created" in text  # the library does emit them; the recorder must drop them
    rows = parse_exposition(12.5, "lb", text)
    names = {r.metric for r in rows}
    assert "lbsim_test_events_total" in names
    assert {"lbsim_test_duration_seconds_bucket", "lbsim_test_duration_seconds_count",
            "lbsim_test_duration_seconds_sum"} <= names
    assert "lbsim_test_events_created" not in names and "lbsim_test_duration_seconds_created" not in names
    assert Row(12.5, "lb", "lbsim_test_boot_created", "", 7.0) in rows
    assert Row(12.5, "lb", "lbsim_test_events_total", "kind=ok,zone=a", 3.0) in rows
    assert Row(12.5, "lb", "lbsim_test_duration_seconds_bucket", "le=+Inf", 1.0) in rows
    with pytest.raises(ValueError):
        parse_exposition(0.0, "lb", "this is { not metrics")


HAND_ROWS: list[tuple[float, str, str, str, float]] = [
    (0.0, "lb", "probes_total", "result=ok,zone=a", 1.0),
    (0.0, "lb", "probes_total", "result=ok,zone=b", 2.0),
    (0.0, "lb", "probes_total", "result=timeout,zone=a", 5.0),
    (0.0, "backends", "can_serve", "zone=a", 3.0),
    (10.0, "backends", "can_serve", "zone=a", 2.0),
    (10.0, "backends", "can_serve", "zone=b", 4.0),
    (10.0, "lb", "can_serve", "zone=a", 100.0),  # same name from another component
    (20.0, "lb", "probes_total", "result=ok,zone=a", 4.0),
    (20.0, "lb", "probes_total", "result=ok,zone=b", 6.0),
]


def test_series_selects_by_label_subset_and_reduces_per_scrape_time() -> None:
    assert series(HAND_ROWS, "probes_total") == [(0.0, 8.0), (20.0, 10.0)]  # 10.0 had none: omitted
    assert series(HAND_ROWS, "probes_total", {"result": "ok"}) == [(0.0, 3.0), (20.0, 10.0)]
    assert series(HAND_ROWS, "probes_total", {"result": "ok", "zone": "b"}) == [(0.0, 2.0), (20.0, 6.0)]
    assert series(HAND_ROWS, "probes_total", reduce="max") == [(0.0, 5.0), (20.0, 6.0)]
    assert series(HAND_ROWS, "probes_total", reduce="min") == [(0.0, 1.0), (20.0, 4.0)]
    assert series(HAND_ROWS, "probes_total", {"zone": "c"}) == []
    assert series(HAND_ROWS, "can_serve", component="backends") == [(0.0, 3.0), (10.0, 6.0)]
    assert series(HAND_ROWS, "can_serve") == [(0.0, 3.0), (10.0, 106.0)]
    # Order of the input does not matter: the output is in time order.
    assert series(list(reversed(HAND_ROWS)), "probes_total", {"zone": "a"}) == [(0.0, 6.0), (20.0, 4.0)]
    with pytest.raises(ValueError, match="reduce"):
        series(HAND_ROWS, "probes_total", reduce="avg")  # type: ignore[arg-type]


def test_pivot_builds_one_row_per_scrape_time_with_defaults() -> None:
    columns = {
        "ok": Selector("probes_total", {"result": "ok"}),
        "worst_zone_probes": Selector("probes_total", reduce="max"),
        "can_serve": Selector("can_serve", component="backends", default=math.nan),
    }
    table = pivot(iter(HAND_ROWS), columns, times=[30.0])  # an iterator: one pass must do
    assert [r["t"] for r in table] == [0.0, 10.0, 20.0, 30.0]
    assert table[0] == {"t": 0.0, "ok": 3.0, "worst_zone_probes": 5.0, "can_serve": 3.0}
    assert table[1]["ok"] == 0.0 and table[1]["worst_zone_probes"] == 0.0 and table[1]["can_serve"] == 6.0
    assert table[2]["ok"] == 10.0 and math.isnan(table[2]["can_serve"])
    assert table[3]["ok"] == 0.0 and math.isnan(table[3]["can_serve"])  # a round with no rows at all
    with pytest.raises(ValueError, match="`t`"):
        pivot(HAND_ROWS, {"t": Selector("can_serve")})
    with pytest.raises(ValueError, match="reduce"):
        Selector("x", reduce="mean")  # type: ignore[arg-type]
    assert hash(Selector("x", {"a": "1"})) == hash(Selector("x", {"a": "1"}))


def test_constructor_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        Recorder(ScaledClock(SPEED), {}, interval_s=0)
    with pytest.raises(ValueError, match="timeout_s"):
        Recorder(ScaledClock(SPEED), {}, timeout_s=-1)


# -- against real /metrics servers ----------------------------------------------------------------------------


@pytest.mark.parametrize("loop_kind", list(LOOPS))
def test_rounds_come_every_interval_and_follow_the_changes(loop_kind: str, tmp_path: Path) -> None:
    async def body() -> None:
        sockets_before = open_sockets()
        m = Metrics()
        server = MetricsServer(m.registry)
        port = await server.start()
        clock = ScaledClock(SPEED)
        rec = Recorder(clock, {"lb": url(port)}, interval_s=INTERVAL, spool_dir=tmp_path)
        try:
            clock.restart()
            rec.start()
            assert rec.running
            levels = [1.0, 5.0, 2.5, 0.0]
            for i, level in enumerate(levels):
                m.level.set(level)
                m.events.labels(zone="a", kind="ok").inc()
                # The change lands right after round i-1 ends, a whole interval before round i starts.
                await wait_for(lambda i=i: len(rec.scrape_times) > i, within=INTERVAL / SPEED * 20)
            await rec.stop()
            assert not rec.running
            await rec.stop()  # idempotent
            # After stop, a final round still works (on a session of its own) and comes after the last tick.
            m.level.set(9.0)
            t_final = await rec.scrape_once()
        finally:
            await server.stop()
        assert open_sockets() == sockets_before

        times = rec.scrape_times[:-1]
        assert len(times) == len(levels)
        assert 0.0 <= times[0] < LATE_S  # the first round runs at start
        for k, t in enumerate(times[1:], start=1):  # then on every multiple of the interval, a little late
            assert k * INTERVAL <= t < k * INTERVAL + LATE_S, times
        assert t_final > times[-1]
        assert values(rec, "lbsim_test_level") == [*zip(times, levels, strict=True), (t_final, 9.0)]
        assert values(rec, "lbsim_test_events_total", zone="a")[:-1] == [(t, k + 1.0) for k, t in enumerate(times)]
        assert {r.component for r in rec.rows()} == {"lb"}
        assert rec.failures == {"lb": 0}

        rows_before = rec.row_count
        await rec.scrape_once()  # the server is gone now: a failure, no rows, no exception
        assert rec.failures == {"lb": 1} and rec.row_count == rows_before
        assert open_sockets() == sockets_before

        spool = rec.spool_path
        assert spool.exists() and spool.parent == tmp_path
        rec.close()
        assert not spool.exists()
        rec.close()  # idempotent
        with pytest.raises(RuntimeError, match="closed"):
            list(rec.rows())

    run_on(loop_kind, body)


@pytest.mark.parametrize("loop_kind", list(LOOPS))
def test_one_round_scrapes_every_component_and_failures_do_not_stop_the_others(
    loop_kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        lb, backends = Metrics(), Metrics()
        lb.level.set(3)
        backends.level.set(4)
        backends.events.labels(zone="a,b", kind="x=y\\z").inc(2)

        release = asyncio.Event()
        hung_writers: list[asyncio.StreamWriter] = []

        async def hang(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            hung_writers.append(w)
            await release.wait()  # accept, never answer: the scrape must time out

        async def garbage(_request: web.Request) -> web.Response:
            return web.Response(text="this is { not metrics\n")

        async def broken(_request: web.Request) -> web.Response:
            return web.Response(status=500, text="oops")

        servers = [MetricsServer(lb.registry), MetricsServer(backends.registry)]
        ports = [await s.start() for s in servers]
        hung = await asyncio.start_server(hang, "127.0.0.1", 0)
        app = web.Application()
        app.router.add_get("/garbage", garbage)
        app.router.add_get("/broken", broken)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        bad_port = int(runner.addresses[0][1])
        targets = {
            "lb": url(ports[0]),
            "refused": url(free_port()),
            "hung": f"http://127.0.0.1:{hung.sockets[0].getsockname()[1]}/metrics",
            "garbage": f"http://127.0.0.1:{bad_port}/garbage",
            "broken": f"http://127.0.0.1:{bad_port}/broken",
            "backends": url(ports[1]),
        }
        clock = ScaledClock(SPEED)
        timeout_s = 2.0  # 20 wall ms at this speed
        rec = Recorder(clock, targets, timeout_s=timeout_s)
        try:
            with caplog.at_level(logging.WARNING, logger="scenarios.recorder"):
                wall0 = asyncio.get_running_loop().time()
                t1 = await rec.scrape_once()
                # The hung target cost one timeout, not the sum of them: the targets are scraped concurrently.
                assert asyncio.get_running_loop().time() - wall0 < clock.to_loop(timeout_s) * 4 + 0.5
                lb.level.set(30)
                backends.level.set(40)
                t2 = await rec.scrape_once()
        finally:
            release.set()
            for w in hung_writers:
                w.close()
            hung.close()
            await hung.wait_closed()
            await runner.cleanup()
            for s in servers:
                await s.stop()
        assert rec.failures == {"lb": 0, "backends": 0, "refused": 2, "hung": 2, "garbage": 2, "broken": 2}
        warnings = [r.getMessage() for r in caplog.records if r.name == "scenarios.recorder"]
        for name in ("refused", "hung", "garbage", "broken"):  # logged once each, though each failed twice
            assert sum(f"scrape of {name} " in w for w in warnings) == 1, warnings
        assert len(warnings) == 4

        rows = list(rec.rows())
        assert {r.component for r in rows} == {"lb", "backends"}
        assert rec.scrape_times == [t1, t2] and t2 > t1
        assert series(rows, "lbsim_test_level", component="lb") == [(t1, 3.0), (t2, 30.0)]
        assert series(rows, "lbsim_test_level", component="backends") == [(t1, 4.0), (t2, 40.0)]
        assert series(rows, "lbsim_test_level") == [(t1, 7.0), (t2, 70.0)]  # both components in one round
        escaped = [r for r in rows if r.metric == "lbsim_test_events_total"]
        assert {r.labels for r in escaped} == {"kind=x\\=y\\\\z,zone=a\\,b"}
        assert parse_labels(escaped[0].labels) == {"zone": "a,b", "kind": "x=y\\z"}
        assert not any(r.metric.endswith("_created") for r in rows)
        rec.close()

    run_on(loop_kind, body)


def test_write_csv_round_trips_and_parquet_needs_pyarrow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body() -> None:
        m = Metrics()
        m.level.set(math.inf)
        m.events.labels(zone="a", kind="p,q").inc(0.1)
        server = MetricsServer(m.registry)
        port = await server.start()
        rec = Recorder(ScaledClock(SPEED), {"lb": url(port)})
        try:
            await rec.scrape_once()
            m.level.set(-1.25)
            await rec.scrape_once()
        finally:
            await server.stop()

        out = tmp_path / "timeseries.csv"
        assert rec.write_csv(out) == rec.row_count > 0
        with out.open(newline="") as f:
            reader = csv.reader(f)
            assert tuple(next(reader)) == CSV_HEADER
            back = [Row(float(t), c, n, lb, float(v)) for t, c, n, lb, v in reader]
        assert back == list(rec.rows())
        assert series(back, "lbsim_test_level") == [(rec.scrape_times[0], math.inf), (rec.scrape_times[1], -1.25)]
        assert series(back, "lbsim_test_events_total", {"kind": "p,q"})[0][1] == 0.1

        monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed
        assert rec.write_parquet(tmp_path / "timeseries.parquet") is False
        assert not (tmp_path / "timeseries.parquet").exists()
        rec.close()

    run_on("asyncio", body)


def test_write_parquet_round_trips_when_pyarrow_is_there(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    rec = Recorder(ScaledClock(SPEED), {})
    rec._spool.append([Row(0.0, "lb", "a_total", "zone=a", 1.0), Row(10.0, "lb", "a_total", "zone=a", 2.5)])
    try:
        assert rec.write_parquet(tmp_path / "ts.parquet") is True
        table = pq.read_table(tmp_path / "ts.parquet")
        assert table.column_names == list(CSV_HEADER)
        assert table.column("value").to_pylist() == [1.0, 2.5]
    finally:
        rec.close()
