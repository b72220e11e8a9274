"""`lbsim compare` and `lbsim report`: the pure aggregation, sentences and series; the child-process runner with
stand-in children; and the commands end to end as a user runs them, on a tiny scenario.

Wall-time limits (seconds), from what the processes do:
* START_S: interpreter start and imports of a child run take ~0.6-1 s here; 5 s (5x) for a loaded machine.
* EXIT_S: a run's own clean stop is bounded by ~8 s (tests/test_cli.py EXIT_LIMIT_S), rounded up to 10 s.
* A tiny run is DURATION / SPEED = 0.5 s of sim; each compare adds its own start and the plot (~2 s).
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from support import LBSIM, LOOPS, run_on

from lb.policies import POLICY_TYPES, PolicyError, parse_policy_spec
from scenarios.compare import (
    CompareRunner,
    Job,
    JobResult,
    PolicyChoice,
    RunRecord,
    aggregate,
    compare_document,
    difference,
    entries_to_spec,
    resolve_policy,
    slugs,
    versus_lines,
    write_compare_csv,
)
from scenarios.report import RunData, compare_table, mean_series, plot, success_rate

pytestmark = pytest.mark.timeout(60)

START_S = 5.0
EXIT_S = 10.0
PNG = b"\x89PNG\r\n\x1a\n"


DURATION, SPEED = 10.0, 20.0
SCENARIO = """\
name: tiny-compare
description: Zone a's network dies at t=3 and stays dead.
seed: 7
speed: 20
duration_s: {duration}
zones: [a, b]
targets_per_zone: 2
health_check:
  interval_s: 1
  timeout_s: 0.5
  healthy_threshold: 2
  unhealthy_threshold: 2
policy: [aws]
traffic:
  rate_per_s: 20
  timeout_s: 1
  dns_ttl_s: 1
timeline:
  - {{at: 3, zone: a, path: {{state: blackhole, cut_existing: true}}, note: zone a dies}}
"""


def scenario_file(tmp_path: Path, duration: float = DURATION) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(SCENARIO.format(duration=f"{duration:g}"))
    return p


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    e["COLUMNS"] = "200"  # the table unfolded, so a test can find a policy's name on one line
    return e


def lbsim(*args: str, timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`lbsim ARGS` in its own session; asserts that nothing it started is still running once it has exited."""
    proc = subprocess.Popen([*LBSIM, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                            cwd=cwd, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert session_processes(proc.pid) == [], f"lbsim {args[0]} left processes behind"
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def session_processes(sid: int) -> list[int]:
    """Live (not zombie) processes of session `sid`: compare leads its own session, its children stay in it."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(d))
    return out


def has_sockets(pid: int, at_least: int = 3) -> bool:
    """Whether `pid` has opened servers: more sockets than an event loop's own self-pipe pair."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    count = 0
    for fd in fds:
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            continue
    return count >= at_least


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# -- policies as the user gives them ---------------------------------------------------------------------


def test_entries_to_spec_round_trips_through_the_spec_parser() -> None:
    spec = entries_to_spec(["fail-open", {"name": "velocity", "window_s": 60.5, "max_removed_percent": 20},
                            {"name": "min-healthy", "actions": ["dns-failover"], "min_percent": None},
                            {"name": "dns-failover", "enabled": False}])
    assert spec == ("fail-open+velocity(window_s=60.5,max_removed_percent=20)"
                    "+min-healthy(actions=[dns-failover],min_percent=off)+dns-failover(enabled=false)")
    policies = {p.name: p for p in parse_policy_spec(spec)}
    assert policies["velocity"].window_s == 60.5
    assert policies["min-healthy"].actions == frozenset({"dns-failover"})
    assert policies["min-healthy"].min_percent is None
    assert policies["dns-failover"].enabled is False


@pytest.mark.parametrize("entries", [[], [{"window_s": 1}], [{"name": "velocity", "window_s": "1,2"}], [3]])
def test_entries_to_spec_refuses_what_a_spec_cannot_say(entries: list[Any]) -> None:
    with pytest.raises(PolicyError):
        entries_to_spec(entries)


def test_resolve_policy_reads_a_yaml_file_as_a_list_or_one_mapping(tmp_path: Path) -> None:
    (tmp_path / "slow-eject.yaml").write_text("- aws\n- {name: velocity, window_s: 30}\n")
    (tmp_path / "one.yml").write_text("name: panic\nthreshold_percent: 30\n")
    assert resolve_policy(str(tmp_path / "slow-eject.yaml"), allow_import=False) == \
        PolicyChoice("slow-eject", "aws+velocity(window_s=30)")
    assert resolve_policy(str(tmp_path / "one.yml"), allow_import=False) == \
        PolicyChoice("one", "panic(threshold_percent=30)")
    assert resolve_policy("scenario+velocity", allow_import=False) == \
        PolicyChoice("scenario+velocity", "scenario+velocity")
    with pytest.raises(PolicyError, match="no such policy file"):
        resolve_policy(str(tmp_path / "missing.yaml"), allow_import=False)


USER_POLICY = '''\
from lb.policies import Naive


class Stubborn(Naive):
    """Never ejects anything (a user's own policy, for the tests)."""

    name = "stubborn"

    def on_targets(self, snap, d):
        d.in_service.update(t.id for t in snap.registered())
'''


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A user policy module in the working directory; the registry, sys.path and sys.modules restored after."""
    (tmp_path / "my_policies.py").write_text(USER_POLICY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield tmp_path
    POLICY_TYPES.pop("stubborn", None)
    sys.modules.pop("my_policies", None)


def test_resolve_policy_imports_a_class_only_when_allowed(user_module: Path) -> None:
    with pytest.raises(PolicyError, match="--allow-import"):
        resolve_policy("my_policies:Stubborn", allow_import=False)
    assert "stubborn" not in POLICY_TYPES and "my_policies" not in sys.modules  # nothing imported
    choice = resolve_policy("my_policies:Stubborn", allow_import=True)
    assert choice == PolicyChoice("stubborn", "stubborn", ("my_policies:Stubborn",))
    assert POLICY_TYPES["stubborn"].__name__ == "Stubborn"
    with pytest.raises(PolicyError, match="not a subclass"):
        resolve_policy("my_policies:Naive2", allow_import=True)


def test_slugs_are_distinct_and_safe() -> None:
    s = slugs(["naive", "velocity(window_s=60)", "velocity[window_s=60]", "+++"])
    assert s["naive"] == "naive"
    assert s["velocity(window_s=60)"] == "velocity-window_s-60"
    assert s["velocity[window_s=60]"] == "velocity-window_s-60-2"
    assert s["+++"] == "policy"
    assert all(c.isalnum() or c in "._-" for v in s.values() for c in v)


# -- aggregation and sentences -----------------------------------------------------------------------------


def test_aggregate_takes_numbers_and_booleans_and_skips_the_rest() -> None:
    runs = [
        {"scenario": "x", "seed": 1, "availability": 0.9, "flaps": 2, "complete": True, "latency_p99_s": None,
         "stages": [{"name": "a"}], "policies": ["naive"], "withheld_by_reason": {"budget": 3, "floor": 0}},
        {"scenario": "x", "seed": 2, "availability": 0.7, "flaps": 4, "complete": False, "latency_p99_s": 0.5,
         "stages": [], "policies": ["naive"], "withheld_by_reason": {"budget": 1, "floor": 0}},
    ]
    agg = aggregate(runs)
    assert set(agg) == {"availability", "flaps", "complete", "latency_p99_s", "withheld_by_reason.budget",
                        "withheld_by_reason.floor"}
    assert agg["withheld_by_reason.budget"] == {"mean": 2.0, "min": 1.0, "max": 3.0}
    assert agg["availability"] == pytest.approx({"mean": 0.8, "min": 0.7, "max": 0.9})
    assert agg["flaps"] == {"mean": 3.0, "min": 2.0, "max": 4.0}
    assert agg["complete"] == {"mean": 0.5, "min": 0.0, "max": 1.0}
    assert agg["latency_p99_s"] == {"mean": 0.5, "min": 0.5, "max": 0.5}  # None left out, not taken as 0
    assert aggregate([]) == {}


def test_compare_document_has_every_policy_in_order_and_the_runs() -> None:
    runs = [RunRecord("naive", 1, "runs/naive-seed1", {"availability": 0.5}),
            RunRecord("naive", 2, "runs/naive-seed2", {"availability": 0.7})]
    doc = compare_document("s", [1, 2], False, ["naive", "fail-open"], runs, "sim")
    assert doc == {
        "scenario": "s", "world": "sim", "seeds": [1, 2], "complete": False,
        "policies": {"naive": {"availability": {"mean": pytest.approx(0.6), "min": 0.5, "max": 0.7}},
                     "fail-open": {}},
        "runs": [{"policy": "naive", "seed": 1, "dir": "runs/naive-seed1"},
                 {"policy": "naive", "seed": 2, "dir": "runs/naive-seed2"}],
    }


def _agg(v: float) -> dict[str, float]:
    return {"mean": v, "min": v, "max": v}


def test_versus_lines_say_the_differences_in_plain_words() -> None:
    doc = {"policies": {
        "naive": {"availability": _agg(0.95), "capacity_lost_target_seconds": _agg(2000.0),
                  "false_ejection_target_seconds": _agg(600.0), "flaps": _agg(0.0), "dns_failovers": _agg(2.0)},
        "scenario+velocity": {"availability": _agg(0.958), "capacity_lost_target_seconds": _agg(766.0),
                              "false_ejection_target_seconds": _agg(300.0), "flaps": _agg(3.0),
                              "dns_failovers": _agg(2.0)},
        "same": {"availability": _agg(0.95)},
        "none": {},
    }}
    lines = versus_lines(doc)
    assert lines[0] == ("scenario+velocity vs naive: availability +0.8 points, capacity lost -1234 target-s (-62%), "
                        "false ejections -300 target-s (-50%), flaps +3.0")
    assert lines[1] == "same vs naive: no difference in these metrics"
    assert lines[2] == "none vs naive: no results to compare"
    assert versus_lines({"policies": {"naive": {}}}) == []


def test_difference_formats_points_units_and_skips_equal_values() -> None:
    assert difference("availability", "availability", "points", 0.99, 0.9899) == "availability -0.01 points"
    assert difference("flaps", "flaps", "", 0.0, 2.0) == "flaps +2.0"  # no percentage of zero
    assert difference("flaps", "flaps", "", 2.0, 2.0) is None


def test_compare_csv_has_one_row_per_policy_and_metric(tmp_path: Path) -> None:
    doc = {"policies": {"a": {"availability": {"mean": 0.5, "min": 0.4, "max": 0.6}, "flaps": _agg(1.0)},
                        "b": {"availability": _agg(1.0)}}}
    write_compare_csv(doc, tmp_path / "c.csv")
    rows = list(csv.reader((tmp_path / "c.csv").open()))
    assert rows == [["policy", "metric", "mean", "min", "max"], ["a", "availability", "0.5", "0.4", "0.6"],
                    ["a", "flaps", "1.0", "1.0", "1.0"], ["b", "availability", "1.0", "1.0", "1.0"]]


def test_compare_table_shows_ranges_only_with_several_seeds() -> None:
    doc: dict[str, Any] = {"scenario": "s", "seeds": [1, 2], "complete": False, "policies": {
        "naive": {"availability": {"mean": 0.9, "min": 0.85, "max": 0.95}, "flaps": _agg(2.0)}, "panic": {}}}
    console = Console(width=200, record=True)
    console.print(compare_table(doc))
    text = console.export_text()
    assert "0.9000" in text and "[0.8500\u20130.9500]" in text and "INCOMPLETE" in text
    assert "panic" in text
    doc["seeds"] = [1]
    console = Console(width=200, record=True)
    console.print(compare_table(doc))
    assert "[0.8500" not in console.export_text()


# -- series and plot -------------------------------------------------------------------------------------


def test_success_rate_buckets_by_start_and_smooths_as_a_ratio_of_sums() -> None:
    reqs = [(0.1, True), (0.5, False), (1.2, True), (1.3, True), (1.9, True), (3.5, False), (9.0, True),
            (-1.0, False), (4.0, True)]  # the last two are outside [0, 4)
    t, rate = success_rate(reqs, duration_s=4, bucket_s=1, smooth_s=1)
    assert t == [1.0, 2.0, 3.0, 4.0]  # each value is of the window that ends there
    assert rate == [0.5, 1.0, None, 0.0]  # an empty bucket is a gap, not 0 or 1
    _, smooth = success_rate(reqs, duration_s=4, bucket_s=1, smooth_s=2)
    # Trailing windows of two buckets: bucket 1 pools buckets 0 and 1 -> 4 ok of 5, bucket 2 only has bucket 1's.
    assert smooth == [0.5, pytest.approx(0.8), 1.0, 0.0]
    _, coarse = success_rate(reqs, duration_s=4, bucket_s=2, smooth_s=2)
    assert coarse == [pytest.approx(0.8), 0.0]


def test_mean_series_holds_each_runs_last_sample() -> None:
    a = ([0.0, 1.0, 2.0, 3.0], [4.0, 4.0, 2.0, 2.0])
    b = ([0.05, 1.5, 2.5], [4.0, 0.0, 4.0])
    t, m = mean_series([a, b])
    assert t == [0.0, 1.0, 2.0, 3.0]
    # b at 0.0 is before its first sample: its first value; at 2.0 it holds 0.0 (from 1.5); at 3.0 it holds 4.0.
    assert m == [4.0, 4.0, 1.0, 3.0]
    assert mean_series([]) == ([], [])


def test_plot_writes_a_png_with_events_and_stages(tmp_path: Path) -> None:
    run = RunData(tmp_path, {"duration_s": 10.0, "stages": [{"name": "outage", "start_s": 3, "end_s": 8}]},
                  times=[0.0, 5.0], routed=[4.0, 2.0], requests=[(0.5, True), (6.0, False)],
                  timeline=[(3.0, "zone a dies")])
    out = plot({"naive": [run], "empty": []}, tmp_path / "p" / "x.png", "title")
    assert out.read_bytes().startswith(PNG)


# -- the runner, with stand-in children ------------------------------------------------------------------

# A stand-in for `lbsim run`: writes its pid (and a grandchild's) to DIR/ready, then on SIGINT writes an
# incomplete summary and exits 130 like lbsim; with IGNORE it ignores SIGINT and must be killed. Every wait is
# bounded (30 s), so a stand-in that nobody stops still ends.
CHILD = textwrap.dedent("""\
    import json, os, pathlib, signal, subprocess, sys, time
    d = pathlib.Path(sys.argv[1]); mode = sys.argv[2]
    if mode == "fail":
        for i in range(2000):
            print(f"line {i} of a long traceback", file=sys.stderr)
        sys.exit(3)
    if mode == "ok":
        (d / "summary.json").write_text(json.dumps({"availability": 1.0, "complete": True}))
        sys.exit(0)
    if mode == "killed":  # as the OOM killer or a kill -9 would end a run
        print("about to be killed", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    def stop(*_):
        (d / "summary.json").write_text(json.dumps({"availability": 0.5, "complete": False}))
        sys.exit(130)
    signal.signal(signal.SIGINT, signal.SIG_IGN if mode == "ignore" else stop)
    grandchild = subprocess.Popen(["sleep", "30"])
    (d / "ready").write_text(f"{os.getpid()} {grandchild.pid}")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(0.01)
""")


def stand_in(mode_of: dict[int, str]) -> Any:
    return lambda job: [sys.executable, "-c", CHILD, str(job.dir), mode_of[job.seed]]


def jobs(tmp_path: Path, n: int) -> list[Job]:
    return [Job(PolicyChoice("p", "p"), seed, tmp_path / f"p-seed{seed}") for seed in range(n)]


def read_if_there(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


async def wait_file(path: Path, within: float = START_S) -> str:
    """The content of `path` once it has some (the stand-in writes it in one go, once it is ready)."""
    deadline = time.monotonic() + within
    while not (text := read_if_there(path)):
        assert time.monotonic() < deadline, f"{path} did not appear"
        await asyncio.sleep(0.01)
    return text


@pytest.mark.parametrize("kind", LOOPS)
def test_runner_interrupt_stops_launching_and_keeps_partial_results(kind: str, tmp_path: Path) -> None:
    async def body() -> None:
        js = jobs(tmp_path, 3)
        runner = CompareRunner(js, stand_in({0: "wait", 1: "ok", 2: "ok"}), parallel=1, stop_timeout_s=EXIT_S)
        task = asyncio.create_task(runner.run())
        pids = [int(p) for p in (await wait_file(js[0].dir / "ready")).split()]
        runner.interrupt()
        results = await task
        assert [r.returncode for r in results] == [130, None, None]
        assert results[0].summary == {"availability": 0.5, "complete": False}
        assert not results[0].failed
        assert not js[1].dir.exists() and not js[2].dir.exists()  # never launched
        assert not alive(pids[0])
        # SIGINT went to the stand-in's whole process group, as a terminal's Ctrl-C would: the grandchild
        # `sleep` dies of it too.
        deadline = time.monotonic() + EXIT_S
        while alive(pids[1]):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)

    run_on(kind, body)


@pytest.mark.parametrize("kind", LOOPS)
def test_runner_kills_a_child_that_ignores_the_stop(kind: str, tmp_path: Path) -> None:
    async def body() -> None:
        js = jobs(tmp_path, 1)
        runner = CompareRunner(js, stand_in({0: "ignore"}), stop_timeout_s=0.3)
        task = asyncio.create_task(runner.run())
        pids = [int(p) for p in (await wait_file(js[0].dir / "ready")).split()]
        started = time.monotonic()
        runner.interrupt()
        results = await task
        assert results[0].returncode == -signal.SIGKILL and results[0].failed
        assert time.monotonic() - started < 0.3 + START_S
        assert not alive(pids[0])
        deadline = time.monotonic() + EXIT_S
        while alive(pids[1]):  # killed with its group; reaped by whoever adopted it
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)

    run_on(kind, body)


@pytest.mark.parametrize("kind", LOOPS)
def test_runner_reports_a_failing_child_and_goes_on(kind: str, tmp_path: Path) -> None:
    async def body() -> None:
        js = jobs(tmp_path, 4)
        done: list[JobResult] = []
        runner = CompareRunner(js, stand_in({0: "fail", 1: "ok", 2: "ok", 3: "ok"}), parallel=2,
                               on_done=done.append)
        results = await runner.run()
        assert [r.returncode for r in results] == [3, 0, 0, 0]
        assert [r.failed for r in results] == [True, False, False, False]
        assert "line 1999 of a long traceback" in results[0].stderr_tail
        assert len(results[0].stderr_tail) <= 4000  # a tail, not everything
        assert results[1].summary == {"availability": 1.0, "complete": True}
        assert sorted(r.job.seed for r in done) == [0, 1, 2, 3]
        assert not runner.stopped

    run_on(kind, body)


@pytest.mark.parametrize("kind", LOOPS)
def test_runner_reports_a_killed_child_and_keeps_the_others(kind: str, tmp_path: Path) -> None:
    async def body() -> None:
        js = jobs(tmp_path, 3)
        results = await CompareRunner(js, stand_in({0: "ok", 1: "killed", 2: "ok"}), parallel=2).run()
        assert [r.failed for r in results] == [False, True, False]
        assert results[1].returncode == -signal.SIGKILL
        assert results[1].how_it_ended() == "killed by SIGKILL"
        assert "about to be killed" in results[1].stderr_tail
        assert results[0].summary is not None and results[2].summary is not None

    run_on(kind, body)


# -- end to end ---------------------------------------------------------------------------------------------


def compare_limit(runs: int, jobs: int, duration: float = DURATION) -> float:
    waves = -(-runs // jobs)
    return START_S + waves * (duration / SPEED + START_S) + START_S


def test_compare_end_to_end_and_report(tmp_path: Path) -> None:
    sc = scenario_file(tmp_path)
    out = tmp_path / "cmp"
    r = lbsim("compare", str(sc), "--policy", "naive", "--policy", "fail-open", "--seeds", "2", "--jobs", "2",
              "--speed", f"{SPEED:g}", "--out", str(out), timeout=compare_limit(4, 2))
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.count("availability") == 4  # one progress line per run

    doc = json.loads((out / "compare.json").read_text())
    assert set(doc) == {"scenario", "world", "seeds", "complete", "policies", "runs"} and doc["world"] == "real"
    assert doc["scenario"] == "tiny-compare" and doc["seeds"] == [7, 8] and doc["complete"] is True
    assert list(doc["policies"]) == ["naive", "fail-open"]
    assert sorted((x["policy"], x["seed"]) for x in doc["runs"]) == \
        sorted((p, s) for p in ("naive", "fail-open") for s in (7, 8))
    for policy, metrics in doc["policies"].items():
        summaries = [json.loads((out / x["dir"] / "summary.json").read_text())
                     for x in doc["runs"] if x["policy"] == policy]
        assert [s["policy"] for s in summaries] == [policy, policy]
        assert sorted(s["seed"] for s in summaries) == [7, 8]
        for key in ("availability", "capacity_lost_target_seconds", "requests_total", "flaps"):
            values = [float(s[key]) for s in summaries]
            assert metrics[key] == pytest.approx({"mean": sum(values) / 2, "min": min(values), "max": max(values)})
        assert metrics["complete"]["min"] == 1.0
        assert "stages" not in metrics and "policy" not in metrics and "seed" not in metrics

    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert {(row["policy"], row["metric"]) for row in rows} == \
        {(p, m) for p, ms in doc["policies"].items() for m in ms}
    assert (out / "compare.png").read_bytes().startswith(PNG)
    assert "fail-open vs naive" in r.stdout

    (out / "compare.png").unlink()
    rep = lbsim("report", str(out), timeout=START_S + EXIT_S)
    assert rep.returncode == 0, rep.stderr
    assert "naive" in rep.stdout and "fail-open" in rep.stdout and "fail-open vs naive" in rep.stdout
    assert (out / "compare.png").read_bytes().startswith(PNG)  # re-rendered

    run_dir = out / doc["runs"][0]["dir"]
    rep = lbsim("report", str(run_dir), timeout=START_S + EXIT_S)
    assert rep.returncode == 0, rep.stderr
    assert "availability" in rep.stdout and doc["runs"][0]["policy"] in rep.stdout
    assert (run_dir / "run.png").read_bytes().startswith(PNG)

    bad = lbsim("report", str(tmp_path), timeout=START_S + EXIT_S)
    assert bad.returncode == 2 and "neither a run directory" in bad.stderr


def test_compare_sigint_stops_writes_incomplete_results_and_leaves_no_child(tmp_path: Path) -> None:
    duration = 400.0  # 20 s of wall per run at speed 20: the signal comes long before the first run ends
    sc = scenario_file(tmp_path, duration=duration)
    out = tmp_path / "cmp"
    proc = subprocess.Popen([*LBSIM, "compare", str(sc), "-p", "naive", "-p", "fail-open", "--jobs", "1",
                             "--speed", f"{SPEED:g}", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                            start_new_session=True)
    try:
        deadline = time.monotonic() + START_S
        runs = out / "runs"
        while not (runs.is_dir() and any(runs.iterdir())):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no run was started"
            time.sleep(0.01)  # a poll period; the deadline decides
        # Wait until the first run is under way: it opens its sockets only after installing its signal handlers,
        # so from then on a SIGINT makes it stop cleanly and write its partial results.
        while not any(has_sockets(pid) for pid in session_processes(proc.pid) if pid != proc.pid):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the first run did not start"
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=EXIT_S + START_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130, err
    assert session_processes(proc.pid) == []  # no child outlived compare
    doc = json.loads((out / "compare.json").read_text())
    assert doc["complete"] is False
    assert [d.name for d in (out / "runs").iterdir()] == ["naive-seed7"]  # the second run was never launched
    assert doc["runs"] == [{"policy": "naive", "seed": 7, "dir": "runs/naive-seed7"}]
    summary = json.loads((out / "runs" / "naive-seed7" / "summary.json").read_text())
    assert summary["complete"] is False and 0 < summary["duration_s"] < duration
    assert doc["policies"]["naive"]["complete"]["max"] == 0.0 and doc["policies"]["fail-open"] == {}
    assert "(interrupted)" in err


def test_compare_loads_a_policy_file_and_a_user_class(tmp_path: Path) -> None:
    sc = scenario_file(tmp_path)
    (tmp_path / "my_policies.py").write_text(USER_POLICY)
    (tmp_path / "slow.yaml").write_text("- fail-open\n- {name: velocity, window_s: 30}\n")
    out = tmp_path / "cmp"
    r = lbsim("compare", str(sc), "-p", "slow.yaml", "-p", "my_policies:Stubborn", "--allow-import",
              "--jobs", "2", "--out", str(out), cwd=tmp_path, timeout=compare_limit(2, 2))
    assert r.returncode == 0, r.stderr
    doc = json.loads((out / "compare.json").read_text())
    assert list(doc["policies"]) == ["slow", "stubborn"]
    by_policy = {x["policy"]: json.loads((out / x["dir"] / "summary.json").read_text()) for x in doc["runs"]}
    assert by_policy["stubborn"]["policy"] == "stubborn"
    assert any(p.startswith("velocity(") and "window_s=30" in p for p in by_policy["slow"]["policies"])
    # The user's policy never ejects, so the dead zone's targets stay routable: missed ejections.
    assert by_policy["stubborn"]["missed_ejection_target_seconds"] > 0


def test_compare_refuses_bad_policies_before_running_anything(tmp_path: Path) -> None:
    sc = scenario_file(tmp_path)
    out = tmp_path / "cmp"
    r = lbsim("compare", str(sc), "-p", "naive", "-p", "no-such-policy", "--out", str(out), timeout=START_S)
    assert r.returncode == 2
    text = r.stderr.replace("\n", "")
    assert "unknown policy 'no-such-policy'" in text and "fail-open" in text and "velocity" in text
    assert not out.exists()
    r = lbsim("compare", str(sc), "-p", "naive", "-p", "os.path:join", "--out", str(out), timeout=START_S)
    assert r.returncode == 2
    assert "--allow-import" in r.stderr.replace("\n", "")
    assert not out.exists()
