"""CPU per HTTP health probe of the lbsim checker vs HAProxy 2.6, lateness, saturation; run: python bench/checks.py

About 1.5 minutes with the defaults; `--quick` is a ~25 s smoke run (one short run each), `--help` lists the knobs.

For each N (default 100 and 1,000 backends), one backend child serves N aiohttp backends on 127.0.0.1 (one
BackendFleet process, uvloop). Against it, in the same run and interleaved round by round:

* lbsim steady: one NodeChecker (HTTP GET /health, uvloop unless --loop asyncio) in its own process, interval
  N/1000 s at speed 1, so 1,000 probes/s; capacity unlimited, so the interval alone sets the rate.
* HAProxy steady: the same N servers with `option httpchk GET /health` and `check inter` = the same interval.
* lbsim saturation: interval N/100,000 s (far more than it can do) and unlimited capacity; what it achieves.

Probes are counted the same way for both checkers, by the backends: the requests that reached a handler
during the window (the lbsim checker's own report count is printed next to it as a cross-check; at saturation
the busy backend process answers the count request a little late, so the two differ by a percent or two). CPU is
utime+stime of the checker process (/proc/PID/stat) over the same window, so CPU per probe = CPU / probes.
Lateness (start - due) comes from the lbsim checker's ProbeReports; at speed 1, sim time is wall time.
Each figure is the median of --runs runs (default 3), each in a fresh checker process after a warm-up of at
least one interval. The last line printed is one JSON object with the N=1000 steady-rate figures.
Without HAProxy (`apt-get install haproxy`) the lbsim figures are still measured; HAProxy's are null.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common as c

STEADY_RATE = 1000.0  # probes/s asked of both checkers
SATURATION_DEMAND = 100_000.0  # probes/s asked in the saturation runs: well beyond what one core can do
PROBE_TIMEOUT_S = 2.0  # both checkers; far above a loopback probe's duration, so no probe times out
# In saturation a target's next probe is due one (tiny) interval after the previous one was *due*, so its
# lateness grows by roughly one probe duration per probe; a long timeout keeps those probes real (a probe
# later than its timeout is not sent at all, it becomes a "late" timeout) for the whole run.
SATURATION_TIMEOUT_S = 120.0


# -- the lbsim checker child -------------------------------------------------------------------------------


async def _checker_child(cfg: dict[str, Any]) -> None:
    from lb.checker import DEFAULT_WAKE_GRID_S_LOOP, CheckConfig, CheckerCapacity, NodeChecker, ProbeReport
    from lb.targets import Target
    from worlds.clock import ScaledClock

    lateness: list[float] = []
    outcomes: Counter[str] = Counter()

    def on_report(report: ProbeReport) -> None:
        # Kept minimal: this callback's cost is part of the measured CPU, as the balancer's would be.
        lateness.append(report.lateness_s)
        outcomes[report.outcome] += 1

    config = CheckConfig(protocol="http", path="/health", interval_s=cfg["interval_s"], timeout_s=cfg["timeout_s"])
    n = len(cfg["ports"])
    # No rate limit and a slot per target: the interval alone sets the probe rate, not the capacity model.
    capacity = CheckerCapacity(max_in_flight=max(n, 1), max_per_second=math.inf)
    grid = DEFAULT_WAKE_GRID_S_LOOP if cfg["wake_grid_ms"] is None else cfg["wake_grid_ms"] / 1000
    checker = NodeChecker("bench", ScaledClock(1.0), config, capacity, on_report, seed=1, wake_grid_s_loop=grid)
    for i, port in enumerate(cfg["ports"]):
        checker.add_target(Target(f"t{i}", "a", c.HOST, port))
    checker.start()
    c.reply({"ready": True, "wake_grid_ms": grid * 1000})

    async def handle(msg: c.Json) -> c.Json:
        if msg["cmd"] == "mark":  # the measuring window starts: forget the warm-up
            lateness.clear()
            outcomes.clear()
            return {"ok": True}
        if msg["cmd"] == "stats":
            values = sorted(lateness)
            p50, p99 = c.percentile(values, 50), c.percentile(values, 99)
            return {
                "reports": len(values),
                "outcomes": dict(outcomes),
                "lateness_p50_ms": None if p50 is None else p50 * 1000,
                "lateness_p99_ms": None if p99 is None else p99 * 1000,
                "lateness_max_ms": values[-1] * 1000 if values else None,
            }
        raise ValueError(f"unknown command {msg['cmd']!r}")

    try:
        await c.serve_commands(handle)
    finally:
        await checker.stop()


# -- one measured run --------------------------------------------------------------------------------------


@dataclass
class Run:
    """One window of one checker against one fleet."""

    probes: int  # requests the backends received in the window
    seconds: float
    cpu_s: float  # checker process CPU in the window
    fleet_cpu_s: float
    reports: int | None = None  # lbsim only: reports in the window (cross-check of `probes`)
    failed: int | None = None  # lbsim: reports that were not SUCCESS; HAProxy: servers not UP at the end
    lateness_p50_ms: float | None = None
    lateness_p99_ms: float | None = None
    lateness_max_ms: float | None = None

    @property
    def rate(self) -> float:
        return self.probes / self.seconds

    @property
    def us_per_probe(self) -> float | None:
        return self.cpu_s / self.probes * 1e6 if self.probes else None

    @property
    def cpu_pct(self) -> float:
        return 100 * self.cpu_s / self.seconds

    @property
    def fleet_cpu_pct(self) -> float:
        return 100 * self.fleet_cpu_s / self.seconds


def _window(fleet: c.Fleet, checker_cpu: Callable[[], float], seconds: float) -> tuple[int, float, float, float]:
    """Count probes and CPU over `seconds`: (probes, elapsed, checker CPU s, fleet CPU s)."""
    cpu0, fcpu0, n0, t0 = checker_cpu(), fleet.cpu(), fleet.requests(), time.monotonic()
    time.sleep(seconds)
    cpu1, fcpu1, n1, t1 = checker_cpu(), fleet.cpu(), fleet.requests(), time.monotonic()
    return n1 - n0, t1 - t0, cpu1 - cpu0, fcpu1 - fcpu0


def run_lbsim(
    reaper: c.Reaper, fleet: c.Fleet, args: argparse.Namespace, interval_s: float, timeout_s: float, window_s: float
) -> Run:
    cfg = {"ports": fleet.ports, "interval_s": interval_s, "timeout_s": timeout_s, "wake_grid_ms": args.wake_grid_ms}
    child = c.Child(reaper, "checker", [str(Path(__file__)), "--child-checker", json.dumps(cfg), "--loop", args.loop])
    try:
        child.read(timeout_s=30.0)  # ready: every target added, the scheduler running
        # Warm-up: every target's first probe is due within one interval; wait for steady state past that.
        time.sleep(max(args.warmup, interval_s + 0.5))
        child.call("mark")
        probes, seconds, cpu_s, fleet_cpu_s = _window(fleet, child.cpu, window_s)
        stats = child.call("stats")
    finally:
        child.stop()
    outcomes: dict[str, int] = stats["outcomes"]
    return Run(
        probes,
        seconds,
        cpu_s,
        fleet_cpu_s,
        reports=stats["reports"],
        failed=sum(v for k, v in outcomes.items() if k != "success"),
        lateness_p50_ms=stats["lateness_p50_ms"],
        lateness_p99_ms=stats["lateness_p99_ms"],
        lateness_max_ms=stats["lateness_max_ms"],
    )


def haproxy_config(ports: list[int], interval_s: float, nbthread: int, listen_port: int, sock: Path) -> str:
    inter = max(1, round(interval_s * 1000))  # HAProxy times are integer milliseconds
    timeout_ms = round(PROBE_TIMEOUT_S * 1000)
    servers = "\n".join(f"    server s{i} {c.HOST}:{port}" for i, port in enumerate(ports))
    # fastinter/downinter = inter: a server changing state must not change the check rate. The frontend only
    # exists because HAProxy refuses to start without a listener; no traffic is sent to it.
    return f"""global
    maxconn 4000
    nbthread {nbthread}
    stats socket {sock} mode 600 level admin
defaults
    mode http
    timeout connect {timeout_ms}
    timeout client 10s
    timeout server 10s
    timeout check {timeout_ms}
frontend fe
    bind {c.HOST}:{listen_port}
    default_backend be
backend be
    option httpchk GET /health
    default-server check inter {inter} fastinter {inter} downinter {inter} rise 2 fall 3
{servers}
"""


def run_haproxy(reaper: c.Reaper, fleet: c.Fleet, args: argparse.Namespace, interval_s: float) -> Run:
    port = c.free_port()
    sock = reaper.logdir / "hap-checks.sock"
    hap = c.HAProxy(
        reaper, "haproxy-checks", haproxy_config(fleet.ports, interval_s, args.haproxy_nbthread, port, sock), sock
    )
    try:
        hap.wait_ready(port)
        # HAProxy spreads its servers' first checks evenly over one interval, so the same warm-up applies.
        time.sleep(max(args.warmup, interval_s + 0.5))
        probes, seconds, cpu_s, fleet_cpu_s = _window(fleet, hap.cpu, args.window)
        status = hap.server_status()
    finally:
        hap.stop()
    return Run(probes, seconds, cpu_s, fleet_cpu_s, failed=status["not_up"])


# -- orchestration and report --------------------------------------------------------------------------------


@dataclass
class Results:
    n: int
    interval_s: float
    lbsim: list[Run] = field(default_factory=list)
    haproxy: list[Run] = field(default_factory=list)
    saturation: list[Run] = field(default_factory=list)


def bench_n(reaper: c.Reaper, n: int, args: argparse.Namespace, have_haproxy: bool) -> Results:
    fleet = c.Fleet(reaper, n)
    res = Results(n, n / STEADY_RATE)
    try:
        # Interleave the three kinds round by round, so drift in the machine's load hits each of them alike.
        for r in range(args.runs):
            print(f"  N={n} round {r + 1}/{args.runs}: lbsim", end="", flush=True)
            res.lbsim.append(run_lbsim(reaper, fleet, args, res.interval_s, PROBE_TIMEOUT_S, args.window))
            if have_haproxy:
                print(", haproxy", end="", flush=True)
                res.haproxy.append(run_haproxy(reaper, fleet, args, res.interval_s))
            if not args.no_saturation:
                print(", saturation", end="", flush=True)
                sat_interval = n / SATURATION_DEMAND
                res.saturation.append(
                    run_lbsim(reaper, fleet, args, sat_interval, SATURATION_TIMEOUT_S, args.saturation_window)
                )
            print(flush=True)
    finally:
        fleet.stop()
    return res


def _row(label: str, runs: list[Run], lateness: bool) -> str:
    if not runs:
        return f"  {label:<30} n/a"
    us = [r.us_per_probe for r in runs]
    line = (
        f"  {label:<30} {c.fmt(c.median([r.rate for r in runs]), ',.0f'):>8} probes/s  "
        f"{c.fmt(c.median(us), '.1f'):>6} us/probe ({c.runs_str(us, '.1f')})  "
        f"CPU {c.fmt(c.median([r.cpu_pct for r in runs]), '.1f')}% "
        f"[{c.fmt(c.median([r.cpu_s for r in runs]), '.2f')} s/window]  "
        f"backends {c.fmt(c.median([r.fleet_cpu_pct for r in runs]), '.0f')}%"
    )
    if lateness:
        p50 = [r.lateness_p50_ms for r in runs]
        p99 = [r.lateness_p99_ms for r in runs]
        line += (
            f"\n  {'':<30} lateness p50 {c.fmt(c.median(p50), '.2f')} ms ({c.runs_str(p50, '.2f')}), "
            f"p99 {c.fmt(c.median(p99), '.2f')} ms ({c.runs_str(p99, '.2f')}), "
            f"max {c.runs_str([r.lateness_max_ms for r in runs], '.1f')} ms"
        )
    if runs[0].reports is not None:
        line += (
            f"\n  {'':<30} checker reports {c.runs_str([r.reports for r in runs])} vs backend requests "
            f"{c.runs_str([r.probes for r in runs])}; failed {c.runs_str([r.failed for r in runs])}"
        )
    elif runs[0].failed is not None:
        line += f"\n  {'':<30} servers not UP at the end of each run: {c.runs_str([r.failed for r in runs])}"
    return line


def report(res: Results, args: argparse.Namespace, have_haproxy: bool) -> dict[str, float | None]:
    lb_us = c.median([r.us_per_probe for r in res.lbsim])
    hap_us = c.median([r.us_per_probe for r in res.haproxy]) if have_haproxy else None
    figures = {
        "us_per_probe": lb_us,
        "haproxy_us_per_probe": hap_us,
        "ratio": c.ratio(lb_us, hap_us),
        "lateness_p50_ms": c.median([r.lateness_p50_ms for r in res.lbsim]),
        "lateness_p99_ms": c.median([r.lateness_p99_ms for r in res.lbsim]),
        "saturation": c.median([r.rate for r in res.saturation]),
    }
    print(
        f"\nN={res.n}: interval {res.interval_s:g} s (steady target {STEADY_RATE:,.0f} probes/s), median of "
        f"{args.runs}, window {args.window:g} s"
    )
    print(_row(f"lbsim ({args.loop})", res.lbsim, lateness=True))
    if have_haproxy:
        print(_row(f"HAProxy nbthread {args.haproxy_nbthread}", res.haproxy, lateness=False))
        per_round = [c.ratio(a.us_per_probe, b.us_per_probe) for a, b in zip(res.lbsim, res.haproxy, strict=False)]
        print(
            f"  {'ratio lbsim/HAProxy CPU/probe':<30} {c.fmt(figures['ratio'], '.2f')}x "
            f"(per round {c.runs_str(per_round, '.2f')})"
        )
    else:
        print("  HAProxy: skipped (--no-haproxy)" if args.no_haproxy else "  HAProxy: not installed, skipped")
    if res.saturation:
        print(_row(f"lbsim saturation (ask {SATURATION_DEMAND:,.0f}/s)", res.saturation, lateness=False))
        # What one core of checker could do: probes per checker CPU-second. When the checker is well below one
        # core, the achieved rate is set by the backend process (or the machine), not by the checker.
        per_cpu_s = c.median([r.probes / r.cpu_s if r.cpu_s else None for r in res.saturation])
        cpu_pct = c.median([r.cpu_pct for r in res.saturation]) or 0.0
        limit = "the checker" if cpu_pct >= 90 else "the backends or the machine (the checker is below 90% of a core)"
        print(f"  {'':<30} = {c.fmt(per_cpu_s, ',.0f')} probes per checker CPU-second; the rate is set by {limit}")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--n", type=int, nargs="+", default=[100, 1000], help="backend counts (default 100 1000)")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure; the median is reported")
    parser.add_argument("--window", type=float, default=4.0, help="measuring window of a steady run, s")
    parser.add_argument("--saturation-window", type=float, default=3.0, help="measuring window of a saturation run, s")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up before a window, s (at least interval+0.5)")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop", help="the lbsim checker's loop")
    parser.add_argument("--wake-grid-ms", type=float, default=None, help="NodeChecker wake grid (default: lbsim's)")
    parser.add_argument("--haproxy-nbthread", type=int, default=1, help="HAProxy threads (default 1, like lbsim)")
    parser.add_argument("--no-haproxy", action="store_true", help="skip HAProxy")
    parser.add_argument("--no-saturation", action="store_true", help="skip the saturation runs")
    parser.add_argument("--quick", action="store_true", help="1 run, 2 s windows: a smoke test, not a measurement")
    parser.add_argument("--child-checker", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_checker is not None:
        c.ignore_sigint()
        c.run_loop(_checker_child(json.loads(args.child_checker)), args.loop)
        return
    if args.quick:
        args.runs, args.window, args.saturation_window = 1, 2.0, 2.0
    if args.runs < 1 or args.window <= 0 or args.saturation_window <= 0 or min(args.n) < 1:
        parser.error("--runs, --window and --n must be positive")

    have_haproxy = c.haproxy_path() is not None and not args.no_haproxy
    with c.Reaper() as reaper:
        watch = c.MachineWatch(lambda: reaper.pids)
        net0 = c.netstat()
        started = time.monotonic()
        print(f"lbsim checks bench: {c.versions()}")
        print(
            f"probes: HTTP GET /health, new connection each, timeout {PROBE_TIMEOUT_S:g} s; counted by the "
            f"backends; CPU = utime+stime from /proc/PID/stat ({c.CLK_TCK} ticks/s)"
        )
        if not have_haproxy:
            # Not a reason to stop: the lbsim figures stand alone; only the comparison column goes.
            print("HAProxy: skipped (--no-haproxy)" if args.no_haproxy
                  else c.missing_tool("haproxy", "its column and the lbsim/HAProxy ratio are skipped (null)"))
        results = [bench_n(reaper, n, args, have_haproxy) for n in args.n]
        figures = {res.n: report(res, args, have_haproxy) for res in results}
        net = {k: v - net0[k] for k, v in c.netstat().items()}
        print(f"\nkernel counters during the bench (machine-wide): {', '.join(f'{k} +{v}' for k, v in net.items())}")
        print(watch.summary())
        print(f"bench took {time.monotonic() - started:.0f} s")

    # The JSON line uses N=1000 (or the largest N run) at the steady rate; saturation from the same N.
    key = 1000 if 1000 in figures else max(figures)
    f = figures[key]
    print(
        json.dumps(
            {
                "lbsim_us_per_probe": _round(f["us_per_probe"]),
                "haproxy_us_per_probe": _round(f["haproxy_us_per_probe"]),
                "ratio_vs_haproxy": _round(f["ratio"], 3),
                "lateness_p99_ms": _round(f["lateness_p99_ms"], 3),
                "saturation_probes_per_s": _round(f["saturation"], 0),
            }
        )
    )


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


if __name__ == "__main__":
    c.run_main(main)
