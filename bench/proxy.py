"""Requests/s, p99 and CPU per request through the lbsim L4 proxy vs HAProxy mode tcp; run: python bench/proxy.py

About 3 minutes with the defaults; `--quick` is a ~25 s smoke run (one 2 s run each), `--help` lists the knobs.

One backend child serves 4 aiohttp backends (one BackendFleet process, uvloop) on 127.0.0.1. Load comes from
`wrk -t1 -c32 -d5s --latency` on GET /health, once with keep-alive and once with a new connection per request
(`-H "Connection: close"`), against each of these, in the same run and interleaved round by round:

* direct: wrk straight to one backend port. All 4 backends live in the one fleet process, so this loads the
  backend process exactly as a proxy spreading over the 4 ports does; it is the no-proxy reference.
* lbsim: a NodeProxy (uvloop unless --loop asyncio) in its own process, choosing round robin over the 4 backends.
* floor: a bare asyncio Protocol proxy on the same loop, doing only accept, connect, copy and close (no timeouts,
  reports, half-close or bookkeeping): what the loop and the kernel cost alone, so lbsim's figure can be read
  against the limit of its stack measured in the same run (`--no-floor` skips it).
* HAProxy nbthread 1, and HAProxy with its default thread count (one per CPU; the stats socket says how many):
  `mode tcp`, `balance roundrobin` over the same 4 backends.

CPU per request = utime+stime of the proxy process (/proc/PID/stat) over the wrk run / requests wrk completed.
Each figure is the median of --runs runs (default 3). The ratios in the last line (one JSON object) compare
lbsim with HAProxy nbthread 1, the stronger of the two here (one thread leaves the second core to wrk and the
backends); the default-thread figures are printed too, and so are lbsim / floor and floor / HAProxy.

wrk is required: without it the bench says how to install it (`apt-get install wrk`) and exits with code 2.
HAProxy is optional: without it (`apt-get install haproxy`) its rows and the ratios are skipped (null).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import _common as c

BACKENDS = 4
MODES = {"keepalive": [], "newconn": ["-H", "Connection: close"]}
MODE_TITLES = {"keepalive": "keep-alive", "newconn": "new connection per request (Connection: close)"}


# -- the lbsim proxy child ---------------------------------------------------------------------------------


async def _proxy_child(ports: list[int]) -> None:
    from lb.proxy import ConnectionReport, NodeProxy
    from lb.targets import Target

    targets = [Target(f"b{i}", "a", c.HOST, port) for i, port in enumerate(ports)]
    outcomes: Counter[str] = Counter()
    turn = 0

    def choose(_flow: Any) -> Target:
        # A fixed rotation, the cheapest possible choose(): the bench measures the data path, not selection.
        nonlocal turn
        turn += 1
        return targets[turn % len(targets)]

    def on_outcome(report: ConnectionReport) -> None:
        outcomes[report.outcome] += 1

    proxy = NodeProxy("bench", choose, on_outcome)
    port = await proxy.start(c.HOST, 0)
    c.reply({"port": port})

    async def handle(msg: c.Json) -> c.Json:
        if msg["cmd"] == "stats":
            return {"accepted": proxy.accepted, "outcomes": dict(outcomes)}
        raise ValueError(f"unknown command {msg['cmd']!r}")

    try:
        await c.serve_commands(handle)
    finally:
        await proxy.stop()


# -- the floor: the least a uvloop Protocol proxy can do ----------------------------------------------------


async def _floor_child(ports: list[int]) -> None:
    """A bare asyncio Protocol proxy: the cost of the asyncio/uvloop machinery alone, as a reference row.

    It does only what wrk needs: round robin, copy both ways, close both sides when either ends. No connect or
    idle timeout, no outcome report, no half-close, no backpressure, no bookkeeping, so lbsim's NodeProxy, which
    must do all of that, cannot get below it on the same loop. Not for use anywhere but this bench.
    """
    loop = asyncio.get_running_loop()
    turn = 0

    class Upstream(asyncio.Protocol):
        def __init__(self, client: Client) -> None:
            self.client = client

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            client = self.client
            client.up = cast(asyncio.Transport, transport)
            if client.transport.is_closing():  # the client left while we connected
                client.up.close()
                return
            if client.early:
                client.up.write(b"".join(client.early))
            client.early = []

        def data_received(self, data: bytes) -> None:
            self.client.transport.write(data)

        def eof_received(self) -> bool:
            self.client.transport.close()
            return False

        def connection_lost(self, exc: Exception | None) -> None:
            self.client.transport.close()

    class Client(asyncio.Protocol):
        transport: asyncio.Transport
        up: asyncio.Transport | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            nonlocal turn
            turn += 1
            self.transport = cast(asyncio.Transport, transport)
            self.early: list[bytes] = []
            port = ports[turn % len(ports)]
            task = loop.create_task(loop.create_connection(lambda: Upstream(self), c.HOST, port))
            task.add_done_callback(self._connected)

        def _connected(self, task: asyncio.Task[Any]) -> None:
            if task.cancelled() or task.exception() is not None:
                self.transport.abort()

        def data_received(self, data: bytes) -> None:
            if self.up is None:
                self.early.append(data)
            else:
                self.up.write(data)

        def connection_lost(self, exc: Exception | None) -> None:
            if self.up is not None:
                self.up.close()

    server = await loop.create_server(Client, c.HOST, 0, backlog=1024)
    c.reply({"port": server.sockets[0].getsockname()[1]})

    async def handle(msg: c.Json) -> c.Json:
        raise ValueError(f"unknown command {msg['cmd']!r}")

    try:
        await c.serve_commands(handle)
    finally:
        server.close()


# -- wrk -----------------------------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"unexpected wrk duration {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclass
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int  # socket errors (connect, read, write, timeout) plus non-2xx/3xx answers

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def parse_wrk(out: str) -> WrkResult:
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m),", out)
    p50 = re.search(r"^\s+50%\s+(\S+)$", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)$", out, re.M)
    if not (m and p50 and p99):
        raise c.ChildError(f"cannot parse wrk output:\n{out}")
    errors = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(non2xx.group(1)) if non2xx else 0
    seconds = _ms(m.group(2) + m.group(3)) / 1000
    return WrkResult(int(m.group(1)), seconds, _ms(p50.group(1)), _ms(p99.group(1)), errors)


def run_wrk(reaper: c.Reaper, wrk: str, port: int, mode: str, args: argparse.Namespace, seconds: float) -> WrkResult:
    argv = [wrk, "-t1", f"-c{args.connections}", f"-d{seconds:g}s", "--latency", "--timeout", "2s", *MODES[mode]]
    proc = reaper.spawn([*argv, f"http://{c.HOST}:{port}/health"], "wrk")
    try:
        out, _ = proc.communicate(timeout=seconds + 15)  # wrk stops itself after -d; the margin bounds a hang
    except subprocess.TimeoutExpired:
        raise c.ChildError(f"wrk did not finish within {seconds + 15:g} s") from None
    finally:
        reaper.release(proc)
    if proc.returncode != 0:
        raise c.ChildError(f"wrk failed (code {proc.returncode})\n{reaper.log_tail('wrk')}")
    return parse_wrk(out.decode(errors="replace"))


# -- targets ---------------------------------------------------------------------------------------------------


@dataclass
class Target:
    """Something wrk can load: its port and, for a proxy, the PID whose CPU we read."""

    label: str
    port: int
    pid: int | None


def haproxy_tcp_config(ports: list[int], listen_port: int, nbthread: int | None, sock: Path) -> str:
    threads = f"    nbthread {nbthread}\n" if nbthread else ""
    servers = "\n".join(f"    server s{i} {c.HOST}:{port}" for i, port in enumerate(ports))
    # maxconn stays under ~9000: above that HAProxy refuses to start with this box's 20000 fd limit.
    return f"""global
    maxconn 8000
{threads}    stats socket {sock} mode 600 level admin
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend fe
    bind {c.HOST}:{listen_port}
    default_backend be
backend be
    balance roundrobin
{servers}
"""


def start_haproxy(reaper: c.Reaper, ports: list[int], nbthread: int | None) -> Target:
    name = f"haproxy-tcp-{nbthread or 'default'}"
    port = c.free_port()
    sock = reaper.logdir / f"{name}.sock"
    hap = c.HAProxy(reaper, name, haproxy_tcp_config(ports, port, nbthread, sock), sock)
    hap.wait_ready(port)
    info = dict(line.split(": ", 1) for line in hap.command("show info").splitlines() if ": " in line)
    threads = info.get("Nbthread", "?")
    label = f"HAProxy nbthread {threads}" + ("" if nbthread else " (default)")
    return Target(label, port, hap.pid)


# -- orchestration and report --------------------------------------------------------------------------------


@dataclass
class Run:
    wrk: WrkResult
    proxy_cpu_s: float | None
    fleet_cpu_s: float

    @property
    def us_per_req(self) -> float | None:
        return None if self.proxy_cpu_s is None else self.proxy_cpu_s / self.wrk.requests * 1e6

    @property
    def cpu_pct(self) -> float | None:
        return None if self.proxy_cpu_s is None else 100 * self.proxy_cpu_s / self.wrk.seconds

    @property
    def fleet_us_per_req(self) -> float:
        return self.fleet_cpu_s / self.wrk.requests * 1e6


def measure(reaper: c.Reaper, wrk: str, fleet: c.Fleet, target: Target, mode: str, args: argparse.Namespace) -> Run:
    # The proxy idles before and after wrk, so the CPU read around the wrk process is the CPU of its load.
    cpu0 = c.cpu_seconds(target.pid) if target.pid else None
    fleet0 = fleet.cpu()
    result = run_wrk(reaper, wrk, target.port, mode, args, args.duration)
    cpu1 = c.cpu_seconds(target.pid) if target.pid else None
    proxy_cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    return Run(result, proxy_cpu, fleet.cpu() - fleet0)


def _row(label: str, runs: list[Run]) -> str:
    rps = [r.wrk.rps for r in runs]
    us = [r.us_per_req for r in runs]
    p99 = [r.wrk.p99_ms for r in runs]
    return (
        f"  {label:<28} {c.fmt(c.median(rps), ',.0f'):>7} rps ({c.runs_str(rps)})  "
        f"p50 {c.fmt(c.median([r.wrk.p50_ms for r in runs]), '.2f')} ms  "
        f"p99 {c.fmt(c.median(p99), '.2f')} ms ({c.runs_str(p99, '.1f')})"
        f"\n  {'':<28} proxy CPU {c.fmt(c.median([r.cpu_pct for r in runs]), '.0f', '%')}, "
        f"{c.fmt(c.median(us), '.1f')} us/req ({c.runs_str(us, '.1f')}); "
        f"backends {c.fmt(c.median([r.fleet_us_per_req for r in runs]), '.1f')} us/req; "
        f"errors {c.runs_str([r.wrk.errors for r in runs])}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--runs", type=int, default=3, help="runs per figure; the median is reported")
    parser.add_argument("--duration", type=float, default=5.0, help="wrk duration per run, s")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (one wrk thread)")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop", help="the lbsim proxy's loop")
    parser.add_argument("--no-haproxy-default", action="store_true", help="skip HAProxy with default nbthread")
    parser.add_argument("--no-haproxy", action="store_true", help="skip HAProxy")
    parser.add_argument("--no-floor", action="store_true", help="skip the bare uvloop Protocol proxy (the floor row)")
    parser.add_argument("--quick", action="store_true", help="1 run of 2 s: a smoke test, not a measurement")
    parser.add_argument("--child-proxy", metavar="PORTS", help=argparse.SUPPRESS)
    parser.add_argument("--child-floor", metavar="PORTS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_proxy is not None or args.child_floor is not None:
        c.ignore_sigint()
        if args.child_proxy is not None:
            c.run_loop(_proxy_child([int(p) for p in args.child_proxy.split(",")]), args.loop)
        else:
            c.run_loop(_floor_child([int(p) for p in args.child_floor.split(",")]), args.loop)
        return
    if args.quick:
        args.runs, args.duration = 1, 2.0
    if args.runs < 1 or args.duration <= 0 or args.connections < 1:
        parser.error("--runs, --duration and --connections must be positive")

    # wrk makes all the load: without it there is nothing to measure (exit 2). Without HAProxy the bench still
    # measures lbsim against the direct reference, so the HAProxy rows and ratios are skipped (null).
    wrk = c.require_tool("wrk", "it generates the load this bench measures")
    have_haproxy = c.haproxy_path() is not None and not args.no_haproxy
    results: dict[str, dict[str, list[Run]]] = {mode: {} for mode in MODES}
    labels: dict[str, str] = {}
    with c.Reaper() as reaper:
        watch = c.MachineWatch(lambda: reaper.pids)
        net0 = c.netstat()
        started = time.monotonic()
        print(f"lbsim proxy bench: {c.versions()}")
        if not have_haproxy and not args.no_haproxy:
            print(c.missing_tool("haproxy", "its rows and the lbsim/HAProxy ratios are skipped (null)"))
        print(f"load: wrk -t1 -c{args.connections} -d{args.duration:g}s --latency GET /health; {BACKENDS} backends")
        fleet = c.Fleet(reaper, BACKENDS)
        proxy = c.Child(
            reaper,
            "lbsim-proxy",
            [str(Path(__file__)), "--child-proxy", ",".join(map(str, fleet.ports)), "--loop", args.loop],
        )
        targets = {
            "direct": Target("direct (one backend port)", fleet.ports[0], None),
            "lbsim": Target(f"lbsim NodeProxy ({args.loop})", int(proxy.read()["port"]), proxy.pid),
        }
        if not args.no_floor:
            floor_argv = [str(Path(__file__)), "--child-floor", ",".join(map(str, fleet.ports)), "--loop", args.loop]
            floor = c.Child(reaper, "floor-proxy", floor_argv)
            targets["floor"] = Target(f"floor: bare Protocol ({args.loop})", int(floor.read()["port"]), floor.pid)
        if have_haproxy:
            targets["haproxy1"] = start_haproxy(reaper, fleet.ports, 1)
            if not args.no_haproxy_default:
                targets["haproxy"] = start_haproxy(reaper, fleet.ports, None)
        labels = {key: t.label for key, t in targets.items()}
        # One short keep-alive warm-up each (not measured): first-use allocations, caches, TCP state.
        for target in targets.values():
            run_wrk(reaper, wrk, target.port, "keepalive", args, 1.0)
        # Interleave targets and modes round by round, so the machine's drift hits all of them alike.
        for r in range(args.runs):
            for mode in MODES:
                print(f"  round {r + 1}/{args.runs} {mode}:", end="", flush=True)
                for key, target in targets.items():
                    print(f" {key}", end="", flush=True)
                    results[mode].setdefault(key, []).append(measure(reaper, wrk, fleet, target, mode, args))
                print(flush=True)
        outcomes = proxy.call("stats")["outcomes"]
        print(f"  lbsim proxy connection outcomes over the whole bench: {outcomes}")

        for mode, by_target in results.items():
            if by_target:
                print(f"\n{MODE_TITLES[mode]}: median of {args.runs}")
                for key, runs in by_target.items():
                    print(_row(labels[key], runs))
                pairs = [("lbsim", key) for key in ("haproxy1", "haproxy", "floor")]
                pairs.append(("floor", "haproxy1"))
                for key, ref in pairs:
                    if key in by_target and ref in by_target:
                        lb, hap = by_target[key], by_target[ref]
                        rps_ratio = c.ratio(c.median([r.wrk.rps for r in lb]), c.median([r.wrk.rps for r in hap]))
                        cpu_ratio = c.ratio(c.median([r.us_per_req for r in lb]), c.median([r.us_per_req for r in hap]))
                        per_round = [c.ratio(a.wrk.rps, b.wrk.rps) for a, b in zip(lb, hap, strict=True)]
                        print(
                            f"  {key} / {labels[ref]}: throughput {c.fmt(rps_ratio, '.2f')}x "
                            f"(per round {c.runs_str(per_round, '.2f')}), CPU per request {c.fmt(cpu_ratio, '.2f')}x"
                        )
        net = {k: v - net0[k] for k, v in c.netstat().items()}
        print(f"\nkernel counters during the bench (machine-wide): {', '.join(f'{k} +{v}' for k, v in net.items())}")
        print(watch.summary())
        print(f"bench took {time.monotonic() - started:.0f} s")

    def ratio_of(mode: str, metric: str, key: str = "lbsim") -> float | None:
        by_target = results[mode]
        if key not in by_target or "haproxy1" not in by_target:
            return None
        values = {
            k: c.median([r.wrk.rps if metric == "rps" else r.us_per_req for r in by_target[k]])
            for k in (key, "haproxy1")
        }
        value = c.ratio(values[key], values["haproxy1"])
        return None if value is None else round(value, 3)

    print(
        json.dumps(
            {
                "keepalive_ratio_vs_haproxy": ratio_of("keepalive", "rps"),
                "newconn_ratio_vs_haproxy": ratio_of("newconn", "rps"),
                "keepalive_cpu_ratio_vs_haproxy": ratio_of("keepalive", "cpu"),
                "newconn_cpu_ratio_vs_haproxy": ratio_of("newconn", "cpu"),
                "floor_keepalive_ratio_vs_haproxy": ratio_of("keepalive", "rps", "floor"),
                "floor_newconn_ratio_vs_haproxy": ratio_of("newconn", "rps", "floor"),
            }
        )
    )


if __name__ == "__main__":
    c.run_main(main)
