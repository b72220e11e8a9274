"""The `lbsim` command line as a user runs it: a subprocess per command, scenario files in tmp_path, real ports.

No sleeps as synchronisation: a running process is observed through its /metrics endpoint (polled with a
deadline) and waited for with `Popen.wait(timeout)`.

Time limits, in wall seconds, derived from what the process has to do:
* START_LIMIT_S: interpreter start and imports take ~0.6 s here (`lbsim --help`); starting 2-4 backends, their
  net paths, the nodes and the servers takes milliseconds. 5 s (8x) leaves room for a loaded CI machine.
* EXIT_LIMIT_S: after SIGINT/SIGTERM a run cancels its tasks and closes everything. The product's own
  shutdown bounds are the net paths' 5 s guard for connections whose close is not yet confirmed, and the
  backends' and admin API's 1 s aiohttp shutdown timeouts; plus writing the run directory and interpreter
  exit (~1 s): 5 + 1 + 1 + 1 = 8 s, rounded up to 10 s. A run that hangs in its shutdown exceeds it.
* A complete run takes duration_s / speed of wall time, plus START_LIMIT_S and EXIT_LIMIT_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest
import uvloop
from prometheus_client.parser import text_string_to_metric_families
from support import LBSIM

from lb.policies import POLICY_TYPES, PRESETS
from scenarios.cli import summary_table
from scenarios.schema import builtin_names
from worlds.clock import ScaledClock

pytestmark = pytest.mark.timeout(60)

START_LIMIT_S = 5.0
EXIT_LIMIT_S = 10.0


SUMMARY_KEYS = {
    "scenario", "policy", "seed", "speed", "duration_s", "complete", "availability", "requests_total",
    "requests_failed", "min_routable_fraction", "capacity_lost_target_seconds", "false_ejection_target_seconds",
    "missed_ejection_target_seconds", "ejections", "flaps", "dns_failovers", "checker_lateness_p99_s",
    "withheld_by_reason",
}

# Two zones x two targets; zone a's network dies at t=6 and never comes back. Check settings compressed like
# the built-ins (interval 2 s, timeout 1 s: 200 ms / 100 ms of wall time at speed 10).
SCENARIO = """\
name: tiny-outage
description: Zone a's network dies; its two targets must be ejected and zone a must leave DNS.
seed: 5
speed: 10
duration_s: {duration}
zones: [a, b]
targets_per_zone: 2
health_check:
  interval_s: 2
  timeout_s: 1
  healthy_threshold: 2
  unhealthy_threshold: 2
policy: [aws]
traffic:
  rate_per_s: 20
  timeout_s: 2
  dns_ttl_s: 2
timeline: [{timeline}]
"""
FAULT = "{at: 6, zone: a, path: {state: blackhole, cut_existing: true}}"
FAULT_AT, INTERVAL, TIMEOUT, UNHEALTHY, JITTER = 6.0, 2.0, 1.0, 2, 0.1  # as in SCENARIO and FAULT (jitter: default)


def scenario_file(tmp_path: Path, name: str = "tiny.yaml", *, duration: float = 30, timeline: str = FAULT) -> Path:
    p = tmp_path / name
    p.write_text(SCENARIO.replace("{duration}", f"{duration:g}").replace("{timeline}", timeline))
    return p


def env() -> dict[str, str]:
    """The user's environment, minus a terminal size, as in CI, cron or `2>log`."""
    e = dict(os.environ)
    for k in ("COLUMNS", "LINES"):
        e.pop(k, None)
    return e


def lbsim(*args: str, timeout: float = START_LIMIT_S + EXIT_LIMIT_S, cwd: Path | None = None
          ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LBSIM, *args], capture_output=True, text=True, timeout=timeout, env=env(), cwd=cwd)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unwrap(text: str) -> str:
    """Undo rich's hard wrapping (it breaks lines at 80 columns when not on a terminal, keeping the space before
    the break, and splits words longer than a line). Used where a test checks content, not layout."""
    return text.replace("\n", "")


def session_processes(sid: int) -> list[int]:
    """Pids of live processes in session `sid` (a process started with start_new_session leads its own)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(d))
    return out


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return str(resp.read().decode())


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str) -> float | None:
    return next((v for (n, _), v in samples(text).items() if n == name), None)


@contextlib.contextmanager
def running(*args: str) -> Iterator[subprocess.Popen[str]]:
    """`lbsim ARGS` in its own session (so its whole process group can be signalled like a terminal's Ctrl-C
    and any child it leaves is found); killed on the way out if still running."""
    proc = subprocess.Popen([*LBSIM, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                            start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.communicate()


def wait_metrics(proc: subprocess.Popen[str], port: int, sim_at_least: float, limit_s: float) -> str:
    """Poll /metrics until it answers with lbsim_sim_time_seconds >= sim_at_least; return that scrape."""
    deadline = time.monotonic() + limit_s
    last = "nothing"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"lbsim exited early with {proc.returncode}: {proc.communicate()[1][-2000:]}")
        try:
            text = scrape(port)
        except OSError as e:  # not listening yet
            last = repr(e)
        else:
            t = value(text, "lbsim_sim_time_seconds")
            last = f"sim time {t}"
            if t is not None and t >= sim_at_least:
                return text
        time.sleep(0.05)  # a poll period, not synchronisation: the deadline above decides
    raise AssertionError(f"/metrics did not show sim time >= {sim_at_least} within {limit_s} s (last: {last})")


# -- lbsim run ------------------------------------------------------------------------------------------------------


def test_run_writes_summary_events_timeseries_and_a_valid_scenario(tmp_path: Path) -> None:
    duration, speed = 30.0, 10.0
    sc = scenario_file(tmp_path, duration=duration)
    out = tmp_path / "run1"
    r = lbsim("run", str(sc), "--out", str(out), "--quiet", timeout=duration / speed + START_LIMIT_S + EXIT_LIMIT_S)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert "run directory" in r.stdout

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= SUMMARY_KEYS, SUMMARY_KEYS - set(summary)
    assert summary["scenario"] == "tiny-outage" and summary["policy"] == "aws"
    assert summary["seed"] == 5 and summary["speed"] == speed
    # A complete run lasts its whole duration, not a uvloop millisecond less (see
    # test_sim_clock_never_wakes_before_its_deadline_on_uvloop).
    assert summary["complete"] is True and summary["duration_s"] == duration
    assert 0 <= summary["availability"] <= 1
    # 20 requests per sim second for 30 s: Poisson, so 600 +- a few sigma (sigma ~ 25).
    assert 450 <= summary["requests_total"] <= 750
    assert 0 <= summary["requests_failed"] <= summary["requests_total"]
    assert summary["availability"] == pytest.approx(1 - summary["requests_failed"] / summary["requests_total"],
                                                    abs=1e-6)
    # Zone a (2 of 4 targets) is dead from t=6 on; at most the other half can serve.
    assert 0 <= summary["min_routable_fraction"] <= 0.5
    assert summary["ejections"] >= 2  # both blackholed targets
    assert summary["dns_failovers"] >= 1  # zone a left DNS (policy aws = fail-open + dns-failover)
    # Detection takes time, so the dead targets were routed for a while: with U=2, I=2 s, T=1 s each one stays
    # routed for at least (U-1) x I + T = 3 sim s after the fault.
    assert summary["missed_ejection_target_seconds"] > 0
    assert summary["capacity_lost_target_seconds"] >= 0 and summary["false_ejection_target_seconds"] >= 0
    assert summary["flaps"] >= 0
    assert summary["checker_lateness_p99_s"] is not None and summary["checker_lateness_p99_s"] >= 0

    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert all({"t", "kind", "subject"} <= set(e) for e in events)
    assert [e["t"] for e in events] == sorted(e["t"] for e in events)
    ejected = {e["subject"] for e in events if e["kind"] == "ejected"}
    assert {"a-0", "a-1"} <= ejected
    fault = next(e for e in events if e["kind"] == "timeline")
    assert fault["targets"] == ["a-0", "a-1"] and fault["t"] >= 6
    assert all(e["t"] > fault["t"] for e in events if e["kind"] == "ejected" and e["subject"].startswith("a-"))
    assert any(e["kind"] == "dns_removed" and e["subject"] == "a" for e in events)

    with (out / "samples.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert set(rows[0]) == {"t", "registered", "routed", "serving", "can_serve", "false_out", "missed_in",
                            "zones_in_dns", "transitions_total", "transitions_down_total", "transitions_up_total"}
    assert min(float(row["zones_in_dns"]) for row in rows) < 2  # zone a left DNS, as the event log says
    # One sample per sim second (sample_interval_s default 1) over 30 s.
    assert duration - 2 <= len(rows) <= duration + 2
    assert all(float(a["t"]) < float(b["t"]) for a, b in itertools.pairwise(rows))
    assert all(int(row["registered"]) == 4 for row in rows)
    assert int(rows[0]["can_serve"]) == 4 and int(rows[-1]["can_serve"]) == 2
    assert any(int(row["missed_in"]) > 0 for row in rows)
    assert (out / "requests.csv").read_text().startswith("started,latency_s,ok,error")
    assert (out / "run.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")  # the run's plot
    # The tidy series is what a scrape of /metrics gave, every record_interval_s (10) and once at the end.
    with (out / "timeseries.csv").open() as f:
        tidy = list(csv.DictReader(f))
    assert list(tidy[0]) == ["t", "component", "metric", "labels", "value"]
    times = sorted({float(r["t"]) for r in tidy})
    assert times[0] < 1 and all(9 < b - a < 11 for a, b in itertools.pairwise(times[:-1]))
    last = [r for r in tidy if float(r["t"]) == times[-1]]
    requests = sum(float(r["value"]) for r in last if r["metric"] == "lbsim_client_requests_total")
    assert requests == summary["requests_total"]
    assert any(r["metric"] == "lbsim_truth_targets" and r["labels"] == "set=can_serve" for r in last)

    # The resolved scenario is a valid scenario that says what was run.
    resolved = out / "scenario.yaml"
    v = lbsim("validate", str(resolved))
    assert v.returncode == 0, v.stderr
    again = json.loads(v.stdout)
    assert again["name"] == "tiny-outage" and again["speed"] == speed and again["seed"] == 5
    assert again["policy"] == ["aws"]
    assert again["timeline"][0]["path"]["state"] == "blackhole"


@pytest.mark.parametrize(
    ("policies", "label"),
    [
        (["naive"], "naive"),
        (["fail-open"], "fail-open"),
        (["fail-open", "dns-failover(min_healthy=2)"], "fail-open+dns-failover(min_healthy=2)"),
    ],
)
def test_policy_option_overrides_the_scenarios(tmp_path: Path, policies: list[str], label: str) -> None:
    duration = 3.0  # 0.3 s of wall time: this is about the label, not the outcome
    sc = scenario_file(tmp_path, duration=duration, timeline="")
    out = tmp_path / "run"
    args = [a for p in policies for a in ("--policy", p)]
    r = lbsim("run", str(sc), *args, "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["policy"] == label
    assert summary["complete"] is True
    names = [d.partition("(")[0] for d in summary["policies"]]
    assert names == [p.partition("(")[0] for p in policies]
    if len(policies) == 2:
        assert "min_healthy=2" in summary["policies"][1]
    assert json.loads(lbsim("validate", str(out / "scenario.yaml")).stdout)["policy"] == policies


# -- interrupting a run ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_the_run_cleanly_and_keeps_the_results(tmp_path: Path, sig: signal.Signals) -> None:
    # 600 sim s at speed 10 would take a minute; the signal comes after a few sim seconds. No fault in the timeline:
    # this is about stopping, and a healthy fleet keeps the run's state simple.
    sc = scenario_file(tmp_path, duration=600, timeline="")
    out = tmp_path / "interrupted"
    port = free_port()
    with running("run", str(sc), "--out", str(out), "--quiet", "--metrics-port", str(port)) as proc:
        text = wait_metrics(proc, port, sim_at_least=5.0, limit_s=START_LIMIT_S + 5.0 / 10)
        seen_sim = value(text, "lbsim_sim_time_seconds")
        assert seen_sim is not None
        os.killpg(proc.pid, sig)  # like Ctrl-C in a terminal: the whole foreground process group
        try:
            rc = proc.wait(timeout=EXIT_LIMIT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"lbsim did not exit within {EXIT_LIMIT_S} s of {sig.name}") from None
        stdout, stderr = proc.communicate()
    assert rc == 130, stderr
    assert "Traceback" not in stderr
    assert not session_processes(proc.pid), "lbsim left processes behind"
    # Its listeners were closed: the metrics port can be listened on again (SO_REUSEADDR: the scrapes' closed
    # connections may sit in TIME_WAIT on it; only a live listener would still conflict).
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()

    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is False
    assert seen_sim <= summary["duration_s"] < 600
    assert summary["requests_total"] > 0 and summary["probes_total"] > 0
    assert 0 <= summary["availability"] <= 1
    rows = (out / "samples.csv").read_text().splitlines()
    assert len(rows) - 1 >= int(seen_sim)  # the samples so far: one per sim second
    # The recorder scraped up to the interruption: its last round is after what we saw.
    with (out / "timeseries.csv").open() as f:
        scraped = [float(r["t"]) for r in csv.DictReader(f)]
    assert scraped and max(scraped) >= seen_sim - 10
    assert (out / "events.jsonl").read_text()
    assert "INCOMPLETE" in stdout


def test_metrics_endpoint_during_a_run(tmp_path: Path) -> None:
    sc = scenario_file(tmp_path, duration=600)
    port = free_port()
    with running("run", str(sc), "--out", str(tmp_path / "m"), "--quiet", "--metrics-port", str(port)) as proc:
        # Past the fault and its detection, so zone a is out of DNS: the first failing probe starts within one
        # interval of the fault, U of them take U intervals (each stretched by up to the jitter), the last one
        # its timeout, and the policy's evaluation one more tick (1 s). One more interval of slack for a loaded
        # machine, whose late probes only move this later.
        settled = FAULT_AT + (1 + UNHEALTHY * (1 + JITTER)) * INTERVAL + TIMEOUT + 1.0 + INTERVAL
        first = wait_metrics(proc, port, sim_at_least=settled, limit_s=START_LIMIT_S + settled / 10)
        second = wait_metrics(proc, port, sim_at_least=value(first, "lbsim_sim_time_seconds") + 1,  # type: ignore[operator]
                              limit_s=2.0)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=EXIT_LIMIT_S)

    families = {f.name: f for f in text_string_to_metric_families(first)}
    s = samples(first)
    names = {n for n, _ in s}
    for required in ("lbsim_sim_time_seconds", "lbsim_probes_total", "lbsim_targets", "lbsim_zone_in_dns",
                     "lbsim_proxy_connections_total"):
        assert required in names, required
    assert families["lbsim_probes"].type == "counter" and families["lbsim_targets"].type == "gauge"
    # The sim clock moves and counters only grow.
    assert value(second, "lbsim_sim_time_seconds") > value(first, "lbsim_sim_time_seconds")  # type: ignore[operator]
    probes = lambda t: sum(v for (n, _), v in samples(t).items() if n == "lbsim_probes_total")  # noqa: E731
    assert 0 < probes(first) <= probes(second)
    # Label values: every registered target counted once per zone, across states.
    targets: dict[str, float] = {}
    for (n, labels), v in s.items():
        if n == "lbsim_targets":
            d = dict(labels)
            targets[d["zone"]] = targets.get(d["zone"], 0) + v
    assert targets == {"a": 2, "b": 2}
    in_dns = {dict(labels)["zone"]: v for (n, labels), v in s.items() if n == "lbsim_zone_in_dns"}
    assert in_dns == {"a": 0, "b": 1}
    conns = sum(v for (n, _), v in s.items() if n == "lbsim_proxy_connections_total")
    assert conns > 0
    zones_of_probes = {dict(labels)["zone"] for (n, labels), _ in s.items() if n == "lbsim_probes_total"}
    assert zones_of_probes == {"a", "b"}


# -- mistakes -------------------------------------------------------------------------------------------------------

# An AWS-conformant health check (no "note:" lines) so that stderr holds only the error.
VALID = """\
name: ok
speed: 10
duration_s: 5
zones: [a, b]
targets_per_zone: 1
health_check: {interval_s: 5, timeout_s: 2, healthy_threshold: 2, unhealthy_threshold: 2}
"""


@pytest.mark.parametrize(
    ("extra", "field", "allowed"),
    [
        ("load_balancer: {selection: random}\n", "load_balancer.selection", "'flow-hash'"),
        ("timeline: [{at: 2, zone: a, path: {state: melt}}]\n", "timeline.0.path.state", "'blackhole'"),
        ("speeed: 3\n", "speeed", "unknown field"),
        # HostManagerConfig's rule: once crashed `run` after the sockets were up, while `validate` passed.
        ("control_plane: {host_manager: {lease_ttl_s: 100, renew_interval_s: 60}}\n", "control_plane.host_manager",
         "lease_ttl_s * (1 - ttl_spread) = 50 must exceed renew_interval_s = 60"),
        # The backend's rules: `validate` passed these, and `run` crashed when the event fired.
        ("timeline: [{at: 2, zone: a, backend: {mode: slow}}]\n", "timeline.0.backend", "mode slow needs latency_s"),
        ("timeline: [{at: 2, zone: a, backend: {mode: healthy, status: 500}}]\n", "timeline.0.backend",
         "mode healthy does not take status"),
        ("traffic: {rate_per_s: -1}\n", "traffic.rate_per_s", "greater than or equal to 0"),
        ("timeline: [{at: 2, zone: z, path: {state: open}}]\n", "timeline.0.zone", "['a', 'b']"),
    ],
)
@pytest.mark.parametrize("command", ["run", "validate"])
def test_scenario_mistake_names_file_field_and_what_is_allowed(
    tmp_path: Path, command: str, extra: str, field: str, allowed: str
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(VALID + extra)
    r = lbsim(command, str(bad), *(["--quiet", "--out", str(tmp_path / "never")] if command == "run" else []))
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    msg = unwrap(r.stderr)
    assert str(bad) in msg and field in msg and allowed in msg, r.stderr
    assert not (tmp_path / "never").exists()


def test_unknown_policy_lists_the_allowed_names(tmp_path: Path) -> None:
    sc = tmp_path / "ok.yaml"
    sc.write_text(VALID)
    r = lbsim("run", str(sc), "--policy", "fail-opne", "--quiet", "--out", str(tmp_path / "never"))
    in_file = tmp_path / "in-file.yaml"
    in_file.write_text(VALID + "policy: [fail-open, bogus]\n")
    v = lbsim("validate", str(in_file))
    for res, name in ((r, "fail-opne"), (v, "bogus")):
        assert res.returncode == 2, res.stderr
        assert "Traceback" not in res.stderr
        msg = unwrap(res.stderr)
        assert f"unknown policy '{name}'" in msg, res.stderr
        for allowed in [*POLICY_TYPES, *PRESETS]:
            assert allowed in msg, allowed
    assert "policy.1" in unwrap(v.stderr) and str(in_file) in unwrap(v.stderr)


def test_metrics_port_in_use_is_a_one_line_error(tmp_path: Path) -> None:
    sc = tmp_path / "ok.yaml"
    sc.write_text(VALID)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with running("run", str(sc), "--quiet", "--out", str(tmp_path / "never"), "--metrics-port", str(port)) as p:
            try:
                rc = p.wait(timeout=START_LIMIT_S + EXIT_LIMIT_S)
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    f"lbsim with its --metrics-port in use did not exit within {START_LIMIT_S + EXIT_LIMIT_S} s"
                ) from None
            _, stderr = p.communicate()
    assert rc != 0 and rc != 130
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error:") and str(port) in lines[0] and "in use" in lines[0]
    assert not session_processes(p.pid)


@pytest.mark.parametrize(("option", "what"), [("--metrics-port", "/metrics"), ("--admin-port", "backends admin API")])
def test_run_refuses_a_port_in_use_before_creating_its_directory(tmp_path: Path, option: str, what: str) -> None:
    sc = scenario_file(tmp_path, duration=2, timeline="")
    target = tmp_path / "never"
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        r = lbsim("run", str(sc), "--quiet", "--out", str(target), option, str(port))
    assert r.returncode == 2, r.stderr
    msg = unwrap(r.stderr)
    assert "Traceback" not in msg
    assert f"error: port {port} (tcp, {what} on 127.0.0.1) is not available" in msg, msg
    assert f"choose another with {option} PORT (0 picks a free one)" in msg, msg
    assert not target.exists()  # checked before the run directory is made
    r = lbsim("run", str(sc), "--quiet", "--out", str(target), "--metrics-port", str(port), "--admin-port", str(port))
    assert r.returncode == 2 and "--metrics-port" in r.stderr and "--admin-port" in r.stderr and "twice" in r.stderr
    assert not target.exists()


def test_error_messages_are_not_hard_wrapped(tmp_path: Path) -> None:
    """Outside a terminal (CI logs, `2>err.log`, a wrapper script) an error line must stay one line: a path or a
    name broken across lines cannot be grepped for, copied or parsed. A scenario kept a few directories deep
    gives a message longer than 80 columns."""
    bad = tmp_path / "experiments" / "2025-10-20-us-east-1" / "nlb-health-check-cascade" / "zone-outage-variant.yaml"
    bad.parent.mkdir(parents=True)
    bad.write_text(VALID + "speeed: 3\n")
    r = lbsim("validate", str(bad))
    assert r.returncode == 2
    first = r.stderr.splitlines()[0]
    assert first == f"error: {bad}: invalid scenario", r.stderr


def test_user_text_in_messages_is_printed_as_is(tmp_path: Path) -> None:
    """Output quotes user input (file paths, policy specs). Printed through rich markup unescaped, a `[wip]`
    directory vanishes from the path (rich takes it for a style tag), a `[/...]` in a spec crashes the error report
    itself with a MarkupError traceback, and a list in a spec disappears from the summary table's title."""
    bad = tmp_path / "[wip]" / "scenario.yaml"
    bad.parent.mkdir()
    bad.write_text(VALID + "speeed: 3\n")
    r = lbsim("validate", str(bad))
    assert r.returncode == 2, r.stderr
    assert str(bad) in unwrap(r.stderr), r.stderr

    ok = tmp_path / "ok.yaml"
    ok.write_text(VALID)
    spec = "velocity(window_s=[/60])"
    r = lbsim("run", str(ok), "--policy", spec, "--quiet", "--out", str(tmp_path / "never"))
    assert "Traceback" not in r.stderr and "MarkupError" not in r.stderr, r.stderr[-600:]
    assert r.returncode == 2, r.stderr[-600:]
    assert "window_s" in r.stderr and "[/60]" in unwrap(r.stderr)

    # A valid spec with a list (the README's `[a,b]` syntax): the summary table's title names the policy as given.
    spec = "min-healthy(min_percent=60,actions=[dns-failover])"
    r = lbsim("run", str(ok), "--policy", spec, "--quiet", "--out", str(tmp_path / "listed"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "listed" / "summary.json").read_text())["policy"] == spec
    assert spec in re.sub(r"\s+", "", r.stdout), r.stdout  # the title may be wrapped and centred


# -- listing and validating ---------------------------------------------------------------------------------------


def test_scenarios_policies_and_validate_a_builtin() -> None:
    r = lbsim("scenarios")
    assert r.returncode == 0, r.stderr
    for name in builtin_names():
        assert name in r.stdout
    assert {"zone-outage", "flapping-new-targets"} <= set(builtin_names())

    r = lbsim("policies")
    assert r.returncode == 0, r.stderr
    for name in [*POLICY_TYPES, *PRESETS]:
        assert re.search(rf"\b{re.escape(name)}\b", r.stdout), name

    r = lbsim("validate", "zone-outage")
    assert r.returncode == 0, r.stderr
    resolved = json.loads(r.stdout)
    assert resolved["name"] == "zone-outage"
    assert resolved["health_check"]["interval_s"] == 2  # and defaults are filled in:
    assert resolved["checker"]["max_in_flight"] == 1000 and resolved["traffic"]["path"].startswith("/work")
    assert "note:" in r.stderr and "interval_s" in r.stderr  # compressed intervals are pointed out

    r = lbsim("validate", "no-such-scenario")
    assert r.returncode == 2
    assert "no-such-scenario" in r.stderr and "zone-outage" in unwrap(r.stderr)


def test_scenarios_list_show_schema_and_policies_with_origins() -> None:
    r = lbsim("scenarios", "list")
    assert r.returncode == 0, r.stderr
    assert all(name in r.stdout for name in builtin_names())

    r = lbsim("scenarios", "show", "dns-enactor-race")
    assert r.returncode == 0, r.stderr
    # The file itself, byte for byte, so it can be copied and edited.
    assert r.stdout == resources.files("scenarios.library").joinpath("dns-enactor-race.yaml").read_text()
    r = lbsim("scenarios", "show", "no-such")
    assert r.returncode == 2 and "aws-2025-10-20" in unwrap(r.stderr)

    r = lbsim("scenarios", "schema")
    assert r.returncode == 0, r.stderr
    schema = json.loads(r.stdout)
    assert schema["additionalProperties"] is False  # editors flag unknown fields too
    assert {"name", "timeline", "control_plane", "health_check"} <= set(schema["properties"])
    assert "ControlAction" in schema["$defs"]

    # On a wide terminal each policy is one line: its parameters with their defaults, and where it comes from.
    wide = subprocess.run([*LBSIM, "policies"], capture_output=True, text=True, timeout=START_LIMIT_S,
                          env={**env(), "COLUMNS": "400"})
    assert wide.returncode == 0, wide.stderr
    rows = {line.split("│")[1].strip(): line for line in wide.stdout.splitlines() if line.count("│") >= 4}
    assert "max_removed_percent=10" in rows["velocity"] and "AWS" in rows["velocity"]
    assert "Envoy" in rows["panic"] and "gRPC" in rows["max-ejection"] and "HAProxy" in rows["passive"]
    assert "lbsim" in rows["naive"] and "lbsim" in rows["flap-damping"]


# -- the run's clock ------------------------------------------------------------------------------------------------


def test_sim_clock_never_wakes_before_its_deadline_on_uvloop() -> None:
    """`lbsim run` runs on uvloop by default, and a run's end (`clock.sleep_until(duration_s)`) and every
    timeline event (`clock.sleep_until(at)`) are ScaledClock deadlines: returning before one means a complete run
    reports `duration_s` short of the scenario's (seen before the fix: 29.996 of 30) and events apply early.

    uvloop's timers run on libuv's cached millisecond clock, which trails `time.monotonic()` (what
    `ScaledClock.now()` reads) by up to 1 ms; when other work wakes the loop, a timer fires as soon as the
    truncated clock reaches its due time, i.e. up to 1 ms of wall time before `now()` does. A sibling task that
    keeps the loop busy makes that the common case (about 2 of 3 sleeps), so 20 sleeps show it."""
    async def main() -> list[float]:
        busy = True

        async def keep_loop_busy() -> None:
            while busy:  # noqa: ASYNC110 - a yield, not a wait: one loop iteration per pass
                await asyncio.sleep(0)

        spinner = asyncio.create_task(keep_loop_busy())
        clock = ScaledClock(speed=10)
        early = []
        for _ in range(20):
            deadline = clock.now() + 0.05
            await clock.sleep_until(deadline)
            if clock.now() < deadline:
                early.append(deadline - clock.now())
        busy = False
        await spinner
        return early

    early = uvloop.run(main())
    assert not early, f"{len(early)} of 20 sleep_until() calls returned early, by up to {max(early):.4f} sim s"


def test_run_refuses_a_non_empty_or_unwritable_out_dir_before_starting(tmp_path: Path) -> None:
    sc = scenario_file(tmp_path, duration=2, timeline="")
    used = tmp_path / "used"
    used.mkdir()
    (used / "summary.json").write_text("{}")
    r = lbsim("run", str(sc), "--out", str(used), "--quiet")
    assert r.returncode == 2
    assert "not empty" in unwrap(r.stderr) and "--force" in unwrap(r.stderr)
    assert (used / "summary.json").read_text() == "{}"  # nothing was started, nothing overwritten
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    r = lbsim("run", str(sc), "--out", str(blocker / "run"), "--quiet")
    assert r.returncode == 2 and "cannot write the run directory" in unwrap(r.stderr)
    r = lbsim("run", str(sc), "--out", str(used), "--quiet", "--force",
              timeout=2 / 10 + START_LIMIT_S + EXIT_LIMIT_S)
    assert r.returncode == 0, r.stderr
    assert json.loads((used / "summary.json").read_text())["complete"] is True


def test_summary_table_lists_withheld_removals_by_reason() -> None:
    from rich.console import Console

    summary = {"scenario": "s", "policy": "velocity", "seed": 1, "complete": True,
               "withheld_by_reason": {"budget": 3, "floor": 0, "cap": 0, "keep-serving": 1, "other": 0}}
    console = Console(width=200, record=True)
    console.print(summary_table(summary))
    assert re.search(r"removals withheld, by reason\s*│\s*budget 3, keep-serving 1", console.export_text())
    summary["withheld_by_reason"] = {"budget": 0}
    console.print(summary_table(summary))
    assert re.search(r"removals withheld, by reason\s*│\s*0 ", console.export_text())
