"""Soak: steady load through `lbsim serve`'s zone nodes, sampling errors, RSS and fds; run: python bench/soak.py

About 10 minutes with the defaults (`--duration 600`); `--duration 60` is a smoke run, `--help` lists the knobs.

What it does, in order:

1. Starts `lbsim serve SCENARIO --speed 1` as a child process (default `zone-outage` with its timeline emptied by
   `--set timeline=[]`, so nothing fails on purpose: a steady system) on fixed loopback ports from `--base-port`
   (metrics, admin API, DNS, then one port per zone node), and reads the zone nodes' addresses from the table it
   prints. It waits until every target is healthy (GET /state).
2. Capacity probe (skipped with `--rate`): `--probe-concurrency` closed-loop clients for `--probe-seconds`
   against the zone nodes; the soak then runs open loop at `--rate-fraction` (default 80%) of the rate achieved.
   The probe's rate is that of the whole loopback system on this machine, client included: the bench prints the
   serve and client CPU during the probe, so one can tell which of them was the limit.
3. Soak: `--duration` wall seconds of open-loop load, HTTP/1.1 `GET --path` with a new connection per request
   (`Connection: close`, as bench/proxy.py's newconn mode), round robin over the zone nodes. A request that
   would exceed `--max-outstanding` in flight is not sent and counts as *shed* (the client could not keep up),
   not as an error. Every `--sample-every` seconds one sample: requests done and failed in the interval, latency
   p50/p99 of the successful ones, the serve process's RSS (VmRSS of /proc/PID/status, summed over it and any
   descendants) and open file descriptors (entries of /proc/PID/fd, likewise summed), its CPU, and its targets
   that are healthy. Each sample is appended to the CSV (`--out`) as it is taken, so a killed bench keeps them.
4. Report: the samples as a table, then total requests, error rate, RSS at the end of warm-up vs at the end,
   growth (MiB and %), the least-squares RSS slope after warm-up (MiB/min), fd min/max, and a verdict; last, one
   JSON line with those figures.

Memory criterion: "memory flat" when RSS grew by less than `--max-growth` (default 5%) from the first sample at
or after the warm-up (`--warmup`, default 10% of the duration: 60 s of the default 10 minutes) to the last
sample. The warm-up is left out because the first minute fills allocator arenas, caches and socket buffers and
says nothing about a leak; the slope after warm-up is printed next to the verdict to tell a trend from a step.

Ctrl-C (or SIGTERM) stops the load, keeps and prints the samples taken so far (exit 130). The serve process is
always stopped the same way: SIGINT (its normal, clean stop), a grace period, then SIGKILL; a second Ctrl-C
abandons the requests in flight but still stops serve. If the bench itself is killed, the kernel sends SIGTERM
to serve (PR_SET_PDEATHSIG), which also stops it cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import dataclasses
import datetime
import errno
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, cast

import _common as c
from rich.console import Console
from rich.table import Table

MIB = 1024 * 1024
MAX_DURATION_S = 12 * 3600.0  # hard upper bound of --duration: a soak is hours at most, never open-ended
MAX_SAMPLES = 10_000  # and of the samples it keeps (duration / sample-every)
MAX_RATE = 100_000.0  # far above what one Python client sends; bounds the pacer's work per step
MAX_ANSWER_BYTES = 1 << 20  # an answer larger than this is malformed (the backends send a few hundred bytes)
STOP_GRACE_S = 20.0  # serve's clean stop closes every socket and task; it takes well under a second when idle
READY_TIMEOUT_S = 60.0
TICK_S = 0.005  # the open-loop pacer's step: at 2,000 req/s, 10 requests per step
# One line of serve's start-up table: "│ load balancer node, zone a │ 127.0.0.1:19473 │" (box characters, or ASCII
# if rich decides the output cannot take them).
NODE_LINE = re.compile(r"load balancer node, zone (\S+)\s*\S\s*([\d.]+):(\d+)")


class SoakError(Exception):
    """The soak cannot go on (serve did not start, or died); the message says why."""


# -- the serve process ---------------------------------------------------------------------------------------


def descendants(root: int) -> list[int]:
    """`root` and every process below it, from the parent PIDs in /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                children.setdefault(int(c.stat_fields(int(entry.name))[1]), []).append(int(entry.name))
    out: list[int] = []
    todo = [root]
    while todo and len(out) < 10_000:  # bounded, whatever /proc says
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def rss_bytes(pid: int) -> int:
    """VmRSS of one process (0 if it is gone, or a zombie without one)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024  # the kernel writes kB (KiB)
    return 0


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


class ServeProcess:
    """`lbsim serve` as a child: its own session (a Ctrl-C in the terminal reaches only the bench, which stops it
    in order), stdout and stderr in files that are read for the node addresses and for errors."""

    def __init__(self, argv: list[str], logdir: Path) -> None:
        self.argv = argv
        self.out_path, self.err_path = logdir / "serve.out", logdir / "serve.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                preexec_fn=c._die_with_parent,  # we start no threads, so fork+preexec is safe
            )
        self.pid = self.proc.pid

    def tail(self, lines: int = 15) -> str:
        text = ""
        for path in (self.out_path, self.err_path):
            with contextlib.suppress(OSError):
                text += path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def wait_nodes(self, timeout_s: float = READY_TIMEOUT_S) -> list[tuple[str, str, int]]:
        """(zone, host, port) of every zone node, from the table serve prints once it listens."""
        deadline = time.monotonic() + timeout_s
        seen: list[tuple[str, str, int]] = []
        while time.monotonic() < deadline:
            text = self.out_path.read_text(errors="replace")
            nodes = [(m[1], m[2], int(m[3])) for m in NODE_LINE.finditer(text)]
            # The table is one print, but may reach the file in more than one write: take the rows once two reads
            # 0.1 s apart agree (the zone count is checked against GET /state later).
            if nodes and nodes == seen:
                return nodes
            seen = nodes
            if self.proc.poll() is not None:
                raise SoakError(f"lbsim serve exited with code {self.proc.returncode}:\n{self.tail()}")
            time.sleep(0.1)
        raise SoakError(f"lbsim serve printed no zone nodes within {timeout_s:g} s:\n{self.tail()}")

    def tree(self) -> list[int]:
        return descendants(self.pid) if self.proc.poll() is None else []

    def usage(self) -> tuple[int, int, float]:
        """(RSS bytes, open fds, CPU seconds) of serve and its descendants."""
        rss = fds = 0
        cpu = 0.0
        for pid in self.tree():
            rss += rss_bytes(pid)
            fds += fd_count(pid)
            with contextlib.suppress(OSError, ValueError, IndexError):
                cpu += c.cpu_seconds(pid)
        return rss, fds, cpu

    def stop(self, grace_s: float = STOP_GRACE_S) -> int | None:
        """SIGINT (serve's clean stop), wait up to `grace_s`, then SIGKILL; any descendant still alive is killed
        too. Returns serve's exit code."""
        # Identify descendants by (pid, start time) now, so a PID reused after they exit is never signalled.
        others = []
        for pid in self.tree()[1:]:
            with contextlib.suppress(OSError, ValueError, IndexError):
                others.append((pid, c.stat_fields(pid)[19]))
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                print(f"lbsim serve did not stop within {grace_s:g} s of SIGINT: killed", file=sys.stderr)
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait(10.0)
        for pid, started in others:
            with contextlib.suppress(OSError, ValueError, IndexError):
                if c.stat_fields(pid)[19] == started:
                    os.kill(pid, signal.SIGKILL)
        return self.proc.returncode


# -- the HTTP client -----------------------------------------------------------------------------------------


class _Exchange(asyncio.Protocol):
    """One request on a fresh connection: sent once connected, the answer collected until the server closes.

    A bare Protocol rather than asyncio streams: the client shares the machine with what it measures, and this
    costs about half the CPU per request.
    """

    def __init__(self, request: bytes, done: asyncio.Future[bytes]) -> None:
        self._request = request
        self._done = done
        self._chunks: list[bytes] = []
        self._size = 0
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        # A stream transport (uvloop's does not subclass asyncio's classes, so no isinstance check).
        cast(asyncio.Transport, transport).write(self._request)

    def data_received(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > MAX_ANSWER_BYTES:
            if not self._done.done():
                self._done.set_exception(ValueError("answer too large"))
            if self._transport is not None:
                self._transport.close()
            return
        self._chunks.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done.done():
            if exc is None:
                self._done.set_result(b"".join(self._chunks))
            else:
                self._done.set_exception(exc)


async def fetch(host: str, port: int, request: bytes, timeout_s: float) -> bytes:
    """The whole answer to `request` on a new connection to host:port, within `timeout_s` (else TimeoutError)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bytes] = loop.create_future()
    transport: asyncio.BaseTransport | None = None
    try:
        async with asyncio.timeout(timeout_s):
            transport, _ = await loop.create_connection(lambda: _Exchange(request, done), host, port)
            return await done
    finally:
        if not done.done():
            done.cancel()  # so a reset arriving after a timeout is not logged as an exception nobody retrieved
        if transport is not None:
            transport.close()  # a no-op after the server closed; on a timeout or cancel, ours goes now


def http_request(path: str, host: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: lbsim-soak\r\nConnection: close\r\n\r\n".encode()


def classify(answer: bytes) -> str:
    """'ok' for a complete 200 answer, else what was wrong with it."""
    if not answer:
        return "empty"  # the connection closed with no answer at all
    head, sep, body = answer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if not sep or len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        return "malformed"
    if parts[1] != b"200":
        return f"status_{parts[1].decode()}"
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            # Connection: close and no chunking, so the body is everything after the head.
            return "ok" if value.strip().isdigit() and int(value) == len(body) else "short"
    return "ok"


async def request_outcome(host: str, port: int, request: bytes, timeout_s: float) -> str:
    try:
        return classify(await fetch(host, port, request, timeout_s))
    except TimeoutError:
        return "timeout"
    except ConnectionRefusedError:
        return "refused"
    except ConnectionResetError:
        return "reset"
    except OSError as e:
        return f"os_{errno.errorcode.get(e.errno or 0, 'error').lower()}"
    except ValueError:
        return "malformed"


async def get_json(port: int, path: str, timeout_s: float = 5.0) -> Any:
    """GET a JSON document from serve's admin API."""
    answer = await fetch(c.HOST, port, http_request(path, c.HOST), timeout_s)
    if classify(answer) != "ok":
        raise SoakError(f"GET {path} on port {port}: {answer[:200]!r}")
    return json.loads(answer.partition(b"\r\n\r\n")[2])


# -- samples and tallies -------------------------------------------------------------------------------------


@dataclass
class Tally:
    """What the client saw in one interval."""

    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    shed: int = 0
    latencies_ms: list[float] = field(default_factory=list)  # successful requests only

    @property
    def done(self) -> int:
        return self.ok + sum(self.errors.values())


@dataclass
class Sample:
    """One row of the table and of the CSV."""

    t_s: float  # wall seconds since the soak's load started
    requests: int  # requests that completed in the interval (ok or failed)
    errors: int
    error_rate: float
    shed: int
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    rss_mib: float
    fds: int
    serve_cpu_pct: float
    client_cpu_pct: float
    healthy_targets: int | None
    serve_traffic_failed: int | None  # failures of serve's own client traffic in the interval
    error_kinds: str  # e.g. "reset=3 timeout=1"


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def least_squares_slope(points: list[tuple[float, float]]) -> float | None:
    if len(points) < 2 or len({x for x, _ in points}) < 2:
        return None
    return statistics.linear_regression([x for x, _ in points], [y for _, y in points]).slope


@dataclass
class Verdict:
    warm_index: int | None  # the sample the warm-up ended at
    rss_warm_mib: float | None
    rss_end_mib: float | None
    growth_mib: float | None
    growth_pct: float | None
    slope_mib_per_min: float | None
    text: str


def judge(samples: list[Sample], warmup_s: float, max_growth_pct: float) -> Verdict:
    """The memory criterion (see the module's doc): growth from the end of warm-up to the end < max_growth_pct."""
    warm = next((i for i, s in enumerate(samples) if s.t_s >= warmup_s - 1e-6), None)
    if warm is None or warm >= len(samples) - 1:
        return Verdict(warm, None, None, None, None, None, "not enough samples after warm-up to judge memory")
    after = samples[warm:]
    start, end = after[0].rss_mib, after[-1].rss_mib
    growth = end - start
    pct = 100 * growth / start if start else math.inf
    slope_s = least_squares_slope([(s.t_s, s.rss_mib) for s in after])
    slope = None if slope_s is None else slope_s * 60
    flat = pct < max_growth_pct
    text = (
        f"memory flat (RSS grew {pct:+.1f}% after warm-up, below {max_growth_pct:g}%)"
        if flat
        else f"memory grows (RSS grew {pct:+.1f}% after warm-up, {max_growth_pct:g}% allowed)"
    )
    return Verdict(warm, start, end, growth, pct, slope, text)


# -- the soak ------------------------------------------------------------------------------------------------


class Soak:
    """The load, the sampler and the samples; the samples survive however the run ends."""

    def __init__(self, args: argparse.Namespace, csv_file: TextIO) -> None:
        self.args = args
        self.samples: list[Sample] = []
        self.tally = Tally()
        self.stop = asyncio.Event()
        self.stopped_by: str | None = None  # the signal's name, if one stopped the soak
        self.failure: str | None = None
        self.rate: float | None = args.rate
        self.capacity: dict[str, float] = {}
        self.idle_rss_mib: float | None = None
        self.idle_fds: int | None = None
        self.started_wall: float | None = None  # time.monotonic() when the load started
        self._csv = csv.DictWriter(csv_file, fieldnames=[f.name for f in dataclasses.fields(Sample)])
        self._csv.writeheader()
        csv_file.flush()
        self._csv_file = csv_file
        self._inflight: set[asyncio.Task[None]] = set()
        self._main: asyncio.Task[Any] | None = None

    # -- signals: first one stops the soak gracefully, a second one abandons the requests in flight

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.stopped_by is None:
            self.stopped_by = sig.name
            print(f"\n{sig.name}: stopping the load; the samples so far are kept (again to abandon requests)",
                  file=sys.stderr)
            self.stop.set()
        elif self._main is not None:
            self._main.cancel()

    async def run(self, serve: ServeProcess, nodes: list[tuple[str, str, int]]) -> None:
        loop = asyncio.get_running_loop()
        self._main = asyncio.current_task()
        sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        # The loop's handlers, not Python's: an exception raised by a Python handler inside a loop callback would be
        # logged and lost. remove_signal_handler resets to SIG_DFL, so the previous handlers are put back after.
        previous = {sig: signal.getsignal(sig) for sig in sigs}
        for sig in sigs:
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            await self._run(serve, nodes)
        except asyncio.CancelledError:
            self.stopped_by = f"{self.stopped_by or 'SIGINT'} twice, requests in flight abandoned"
        finally:
            for task in list(self._inflight):
                task.cancel()
            await asyncio.gather(*self._inflight, return_exceptions=True)
            for sig in sigs:
                loop.remove_signal_handler(sig)
                signal.signal(sig, previous[sig])

    async def _run(self, serve: ServeProcess, nodes: list[tuple[str, str, int]]) -> None:
        args = self.args
        targets = await self._wait_healthy(serve, nodes)
        if self.stop.is_set():
            return
        print(f"serve is up: {len(nodes)} zone nodes ({', '.join(f'{h}:{p}' for _, h, p in nodes)}), "
              f"{targets} targets healthy")
        rss, fds, _ = serve.usage()
        self.idle_rss_mib, self.idle_fds = rss / MIB, fds
        print(f"serve idle: RSS {self.idle_rss_mib:.1f} MiB, {fds} fds")
        if self.rate is None:
            await self._probe_capacity(serve, nodes)
            if self.stop.is_set():
                return
        assert self.rate is not None
        print(f"soak: {self.rate:,.0f} req/s for {args.duration:g} s, a sample every {args.sample_every:g} s "
              f"(warm-up {args.warmup:g} s)", flush=True)
        await self._soak(serve, nodes, self.rate)

    async def _wait_healthy(self, serve: ServeProcess, nodes: list[tuple[str, str, int]]) -> int:
        """Wait (bounded) until serve's admin API answers and every target it lists is healthy."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        last: Any = None
        while time.monotonic() < deadline and not self.stop.is_set():
            if serve.proc.poll() is not None:
                raise SoakError(f"lbsim serve exited with code {serve.proc.returncode}:\n{serve.tail()}")
            state: Any = None
            with contextlib.suppress(OSError, TimeoutError, SoakError, ValueError):  # not up yet: 503 or refused
                state = last = await get_json(self.args.admin_port, "/state")
            if state is not None:
                if len(state["zones"]) != len(nodes):
                    raise SoakError(f"serve has zones {state['zones']} but printed {len(nodes)} zone nodes")
                by_state: dict[str, list[str]] = state["targets"]
                total = sum(len(v) for v in by_state.values())
                if total and len(by_state.get("healthy", [])) == total:
                    return total
            await asyncio.sleep(0.2)
        if self.stop.is_set():
            return 0
        raise SoakError(f"targets not all healthy within {READY_TIMEOUT_S:g} s; last /state: {last}")

    async def _probe_capacity(self, serve: ServeProcess, nodes: list[tuple[str, str, int]]) -> None:
        """Closed loop, `--probe-concurrency` clients for `--probe-seconds`: the rate the system sustains."""
        args = self.args
        loop = asyncio.get_running_loop()
        tally = Tally()
        requests = [http_request(args.path, f"{h}:{p}") for _, h, p in nodes]

        async def client(i: int) -> None:
            k = i
            while loop.time() < deadline and not self.stop.is_set():
                _, host, port = nodes[k % len(nodes)]
                outcome = await request_outcome(host, port, requests[k % len(nodes)], args.timeout)
                k += 1
                if outcome == "ok":
                    tally.ok += 1
                else:
                    tally.errors[outcome] += 1

        print(f"capacity probe: {args.probe_concurrency} closed-loop clients for {args.probe_seconds:g} s ...",
              flush=True)
        _, _, cpu0 = serve.usage()
        me0, t0 = c.cpu_seconds(os.getpid()), loop.time()
        deadline = t0 + args.probe_seconds
        await asyncio.gather(*(client(i) for i in range(args.probe_concurrency)))
        elapsed = loop.time() - t0
        _, _, cpu1 = serve.usage()
        me1 = c.cpu_seconds(os.getpid())
        rps = tally.ok / elapsed
        self.capacity = {
            "rps": rps,
            "errors": sum(tally.errors.values()),
            "serve_cpu_pct": 100 * (cpu1 - cpu0) / elapsed,
            "client_cpu_pct": 100 * (me1 - me0) / elapsed,
        }
        errs = " ".join(f"{k}={v}" for k, v in sorted(tally.errors.items())) or "none"
        print(f"capacity probe: {rps:,.0f} req/s ok, errors {errs}; serve CPU {self.capacity['serve_cpu_pct']:.0f}%,"
              f" client CPU {self.capacity['client_cpu_pct']:.0f}% (100% = one core: the one near 100% is the limit)")
        if rps <= 0:
            raise SoakError("the capacity probe completed no request: nothing to soak at")
        self.rate = rps * args.rate_fraction

    async def _soak(self, serve: ServeProcess, nodes: list[tuple[str, str, int]], rate: float) -> None:
        args = self.args
        loop = asyncio.get_running_loop()
        requests = [http_request(args.path, f"{h}:{p}") for _, h, p in nodes]
        self.tally = Tally()
        t0 = loop.time()
        self.started_wall = time.monotonic()
        deadline = t0 + args.duration
        pacer = asyncio.create_task(self._pace(nodes, requests, rate, t0, deadline))
        try:
            n = math.ceil(args.duration / args.sample_every - 1e-9)
            prev = (serve.usage()[2], c.cpu_seconds(os.getpid()), t0, await self._serve_failed())
            for k in range(1, n + 1):  # bounded: one sample per interval, the last one at the deadline
                due = min(t0 + k * args.sample_every, deadline)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, due - loop.time())):
                        await self.stop.wait()
                prev = await self._sample(serve, t0, prev)
                if self.stop.is_set():
                    break
                if serve.proc.poll() is not None:
                    self.failure = f"lbsim serve exited during the soak (code {serve.proc.returncode}):\n{serve.tail()}"
                    break
        finally:
            pacer.cancel()
            await asyncio.gather(pacer, return_exceptions=True)
        # Let the requests in flight finish (each is bounded by --timeout); they are not counted in any sample.
        if self._inflight:
            await asyncio.wait(self._inflight, timeout=args.timeout + 1)

    async def _pace(
        self, nodes: list[tuple[str, str, int]], requests: list[bytes], rate: float, t0: float, deadline: float
    ) -> None:
        """Open loop: start requests at `rate` per second, whatever the answers do, until the deadline."""
        loop = asyncio.get_running_loop()
        sent = 0
        while not self.stop.is_set() and (now := loop.time()) < deadline:
            # Catch up by the schedule, not by the sleeps: a late wake-up sends the requests that came due.
            due = int((now - t0) * rate) - sent
            for _ in range(max(0, due)):
                if len(self._inflight) >= self.args.max_outstanding:
                    self.tally.shed += 1
                else:
                    i = sent % len(nodes)
                    task = asyncio.create_task(self._one(nodes[i][1], nodes[i][2], requests[i]))
                    self._inflight.add(task)
                    task.add_done_callback(self._inflight.discard)
                sent += 1
            await asyncio.sleep(TICK_S)

    async def _one(self, host: str, port: int, request: bytes) -> None:
        t = time.perf_counter()
        outcome = await request_outcome(host, port, request, self.args.timeout)
        tally = self.tally  # the interval it completes in
        if outcome == "ok":
            tally.ok += 1
            tally.latencies_ms.append((time.perf_counter() - t) * 1000)
        else:
            tally.errors[outcome] += 1

    async def _serve_failed(self) -> tuple[int | None, int | None]:
        """(healthy targets, failed requests of serve's own traffic so far) from /state; None if it did not answer."""
        try:
            state = await get_json(self.args.admin_port, "/state")
        except (OSError, TimeoutError, SoakError, ValueError):
            return None, None
        return len(state["targets"].get("healthy", [])), int(state["requests"]["failed"])

    async def _sample(
        self, serve: ServeProcess, t0: float, prev: tuple[float, float, float, tuple[int | None, int | None]]
    ) -> tuple[float, float, float, tuple[int | None, int | None]]:
        loop = asyncio.get_running_loop()
        tally, self.tally = self.tally, Tally()
        now = loop.time()
        rss, fds, cpu = serve.usage()
        me = c.cpu_seconds(os.getpid())
        healthy, failed = state = await self._serve_failed()
        cpu0, me0, t_prev, (_, failed0) = prev
        dt = max(now - t_prev, 1e-9)
        lat = sorted(tally.latencies_ms)
        errors = sum(tally.errors.values())
        sample = Sample(
            t_s=round(now - t0, 2),
            requests=tally.done,
            errors=errors,
            error_rate=round(errors / tally.done, 6) if tally.done else 0.0,
            shed=tally.shed,
            rps=round(tally.done / dt, 1),
            p50_ms=_round(c.percentile(lat, 50), 3),
            p99_ms=_round(c.percentile(lat, 99), 3),
            rss_mib=round(rss / MIB, 3),
            fds=fds,
            serve_cpu_pct=round(100 * (cpu - cpu0) / dt, 1),
            client_cpu_pct=round(100 * (me - me0) / dt, 1),
            healthy_targets=healthy,
            serve_traffic_failed=None if failed is None or failed0 is None else failed - failed0,
            error_kinds=" ".join(f"{k}={v}" for k, v in sorted(tally.errors.items())),
        )
        self.samples.append(sample)
        self._csv.writerow(dataclasses.asdict(sample))
        self._csv_file.flush()
        if self.args.progress:
            print(f"  t={sample.t_s:6.0f} s  {sample.rps:7,.0f} req/s  errors {sample.errors}  shed {sample.shed}  "
                  f"RSS {sample.rss_mib:.1f} MiB  fds {sample.fds}  serve CPU {sample.serve_cpu_pct:.0f}%", flush=True)
        return cpu, me, now, state


# -- report --------------------------------------------------------------------------------------------------


def _f(value: float | None, spec: str) -> str:
    return c.fmt(value, spec)


def samples_table(samples: list[Sample]) -> Table:
    table = Table(title="soak samples (each over the interval before it)")
    for name in ("t (s)", "req/s", "requests", "errors", "error %", "shed", "p50 ms", "p99 ms", "RSS MiB", "fds",
                 "serve CPU %", "client CPU %", "healthy", "serve traffic failed"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("error kinds")
    for s in samples:
        table.add_row(
            f"{s.t_s:.0f}", f"{s.rps:,.0f}", f"{s.requests:,}", f"{s.errors:,}", f"{100 * s.error_rate:.2f}",
            f"{s.shed:,}", _f(s.p50_ms, ".2f"), _f(s.p99_ms, ".2f"), f"{s.rss_mib:.1f}", str(s.fds),
            f"{s.serve_cpu_pct:.0f}", f"{s.client_cpu_pct:.0f}", "-" if s.healthy_targets is None else
            str(s.healthy_targets), "-" if s.serve_traffic_failed is None else str(s.serve_traffic_failed),
            s.error_kinds or "-",
        )
    return table


def report(soak: Soak, args: argparse.Namespace, extra: dict[str, Any]) -> dict[str, Any]:
    """Print the table and the summary; return the figures of the JSON line."""
    console = Console(width=max(Console().width, 180), highlight=False)
    samples = soak.samples
    if samples:
        console.print(samples_table(samples))
    requests = sum(s.requests for s in samples)
    errors = sum(s.errors for s in samples)
    shed = sum(s.shed for s in samples)
    verdict = judge(samples, args.warmup, args.max_growth)
    fds = [s.fds for s in samples]
    elapsed = samples[-1].t_s if samples else 0.0
    figures: dict[str, Any] = {
        "duration_s": elapsed,
        "rate_target": None if soak.rate is None else round(soak.rate, 1),
        "capacity_rps": round(soak.capacity["rps"], 1) if soak.capacity else None,
        "requests": requests,
        "errors": errors,
        "error_rate": round(errors / requests, 6) if requests else None,
        "shed": shed,
        "rss_idle_mib": None if soak.idle_rss_mib is None else round(soak.idle_rss_mib, 1),
        "rss_warm_mib": None if verdict.rss_warm_mib is None else round(verdict.rss_warm_mib, 1),
        "rss_end_mib": None if verdict.rss_end_mib is None else round(verdict.rss_end_mib, 1),
        "rss_growth_mib": None if verdict.growth_mib is None else round(verdict.growth_mib, 2),
        "rss_growth_pct": None if verdict.growth_pct is None else round(verdict.growth_pct, 2),
        "rss_slope_mib_per_min": None if verdict.slope_mib_per_min is None else round(verdict.slope_mib_per_min, 3),
        "fds_min": min(fds) if fds else None,
        "fds_max": max(fds) if fds else None,
        "memory_flat": None if verdict.growth_pct is None else verdict.growth_pct < args.max_growth,
        "complete": soak.stopped_by is None and soak.failure is None and elapsed >= args.duration - 1,
    }
    p99s = [s.p99_ms for s in samples if s.p99_ms is not None]
    warm_at = "-" if verdict.warm_index is None else f"{samples[verdict.warm_index].t_s:.0f} s"
    lines = [
        f"soak: {elapsed:.0f} s of load at {_f(soak.rate, ',.0f')} req/s target"
        + (f" ({100 * args.rate_fraction:.0f}% of the {soak.capacity['rps']:,.0f} req/s capacity probe)"
           if soak.capacity else " (--rate)")
        + ("" if figures["complete"] else " - INCOMPLETE"),
        f"requests {requests:,} ({requests / elapsed if elapsed else 0:,.0f}/s achieved), errors {errors:,} "
        f"(error rate {100 * errors / requests if requests else 0:.3f}%), shed by the client {shed:,}; "
        f"p99 per interval {_f(min(p99s) if p99s else None, '.1f')}-{_f(max(p99s) if p99s else None, '.1f')} ms",
        f"RSS: idle {_f(soak.idle_rss_mib, '.1f')} MiB, at warm-up end ({warm_at}) "
        f"{_f(verdict.rss_warm_mib, '.1f')} MiB, at end {_f(verdict.rss_end_mib, '.1f')} MiB: "
        f"growth {_f(verdict.growth_mib, '+.2f')} MiB ({_f(verdict.growth_pct, '+.2f')}%), "
        f"slope after warm-up {_f(verdict.slope_mib_per_min, '+.3f')} MiB/min",
        f"fds: min {_f(min(fds) if fds else None, 'd')}, max {_f(max(fds) if fds else None, 'd')} "
        f"(idle {_f(soak.idle_fds, 'd')})",
        f"verdict: {verdict.text}",
    ]
    for key, value in extra.items():
        lines.append(f"{key}: {value}")
    for line in lines:
        console.print(line, soft_wrap=True)
    return figures


# -- main ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """While serve is being stopped: a Ctrl-C must not leave it behind."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--duration", type=float, default=600.0,
                        help=f"soak length, wall s (default 600; at most {MAX_DURATION_S:g})")
    parser.add_argument("--sample-every", type=float, default=10.0, help="sampling interval, s (default 10)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="left out of the memory verdict, s (default 10%% of --duration)")
    parser.add_argument("--max-growth", type=float, default=5.0,
                        help="RSS growth after warm-up, %%, below which memory is flat (default 5)")
    parser.add_argument("--rate", type=float, default=None, help="requests/s (default: --rate-fraction of a probe)")
    parser.add_argument("--rate-fraction", type=float, default=0.8, help="share of the probed capacity (default 0.8)")
    parser.add_argument("--probe-seconds", type=float, default=5.0, help="capacity probe length, s (default 5)")
    parser.add_argument("--probe-concurrency", type=int, default=32, help="capacity probe clients (default 32)")
    parser.add_argument("--max-outstanding", type=int, default=512, help="requests in flight before shedding")
    parser.add_argument("--timeout", type=float, default=5.0, help="per-request timeout, s (default 5)")
    parser.add_argument("--path", default="/work?bytes=256", help="request path (default /work?bytes=256)")
    parser.add_argument("--scenario", default="zone-outage", help="built-in scenario or file (default zone-outage)")
    parser.add_argument("--keep-timeline", action="store_true",
                        help="play the scenario's timeline (default: emptied, so nothing fails on purpose)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to lbsim serve --set; repeatable")
    parser.add_argument("--base-port", type=int, default=19470,
                        help="serve's ports: metrics, admin, DNS, then the zone nodes from +3 (default 19470)")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop", help="the client's event loop")
    parser.add_argument("--out", type=Path, default=None, help="samples CSV (default runs/soak-TIME.csv)")
    parser.add_argument("--quiet", dest="progress", action="store_false", help="no line per sample while running")
    args = parser.parse_args(argv)
    if not 0 < args.duration <= MAX_DURATION_S:
        parser.error(f"--duration must be in (0, {MAX_DURATION_S:g}] s")
    if not 0 < args.sample_every <= args.duration:
        parser.error("--sample-every must be positive and at most --duration")
    if args.duration / args.sample_every > MAX_SAMPLES:
        parser.error(f"more than {MAX_SAMPLES} samples: raise --sample-every")
    if args.rate is not None and not 0 < args.rate <= MAX_RATE:
        parser.error(f"--rate must be in (0, {MAX_RATE:g}] requests/s")
    if not 0 < args.rate_fraction <= 1.5 or not 0 < args.probe_seconds <= 60 or not 1 <= args.probe_concurrency <= 1024:
        parser.error("--rate-fraction must be in (0, 1.5], --probe-seconds in (0, 60], "
                     "--probe-concurrency in [1, 1024]")
    if args.max_outstanding < 1 or args.timeout <= 0 or args.max_growth <= 0:
        parser.error("--max-outstanding, --timeout and --max-growth must be positive")
    if not 1024 <= args.base_port <= 65535 - 16:
        parser.error("--base-port must be in [1024, 65519]")
    if args.warmup is None:
        args.warmup = 0.1 * args.duration
    args.admin_port = args.base_port + 1
    if args.out is None:
        args.out = Path("runs") / f"soak-{datetime.datetime.now():%Y%m%d-%H%M%S}.csv"
    return args


def serve_argv(args: argparse.Namespace) -> list[str]:
    # `python -m scenarios.cli` is `lbsim` run by this very interpreter: no dependence on PATH.
    argv = [sys.executable, "-m", "scenarios.cli", "serve", args.scenario, "--speed", "1", "--no-record",
            "--metrics-port", str(args.base_port), "--admin-port", str(args.admin_port),
            "--dns-port", str(args.base_port + 2), "--node-port", str(args.base_port + 3), "--loop", "uvloop"]
    if not args.keep_timeline:
        argv += ["--set", "timeline=[]"]
    for item in args.overrides:
        argv += ["--set", item]
    return argv


def main() -> int:
    args = parse_args()
    c.raise_fd_limit()  # thousands of sockets in flight and in TIME_WAIT
    signal.signal(signal.SIGTERM, c.raise_interrupted)
    signal.signal(signal.SIGHUP, c.raise_interrupted)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    logdir = Path(tempfile.mkdtemp(prefix="lbsim-soak-"))
    print(f"lbsim soak bench: {c.versions()}")
    argv = serve_argv(args)
    print("serve: " + " ".join(argv[1:]))
    watch = c.MachineWatch(lambda: set())
    net0 = c.netstat()
    serve: ServeProcess | None = None
    serve_code: int | None = None
    code = 0
    with open(args.out, "w", newline="") as csv_file:
        soak = Soak(args, csv_file)
        try:
            serve = ServeProcess(argv, logdir)
            watch = c.MachineWatch(lambda: set(serve.tree()) if serve else set())
            nodes = serve.wait_nodes()
            c.run_loop(soak.run(serve, nodes), args.loop)
        except (KeyboardInterrupt, c.Interrupted) as e:
            soak.stopped_by = soak.stopped_by or (str(e) or "SIGINT")
        except SoakError as e:
            soak.failure = str(e)
        finally:
            with signals_ignored():
                if serve is not None:
                    serve_code = serve.stop()
                    if args.progress and serve_code not in (0, None):
                        print(f"serve's last output:\n{serve.tail()}", file=sys.stderr)
                shutil.rmtree(logdir, ignore_errors=True)
    net = {k: v - net0[k] for k, v in c.netstat().items()}
    extra = {
        "serve": f"stopped with SIGINT, exit code {serve_code}",
        "kernel counters (machine-wide)": ", ".join(f"{k} +{v}" for k, v in net.items()),
        "machine": watch.summary().removeprefix("machine: "),
        "samples CSV": str(args.out),
    }
    figures = report(soak, args, extra)
    if soak.failure:
        print(f"soak failed: {soak.failure}", file=sys.stderr)
        code = 1
    elif soak.stopped_by:
        print(f"interrupted ({soak.stopped_by}): the samples above are partial; serve was stopped", file=sys.stderr)
        code = 130
    figures["serve_exit_code"] = serve_code
    print(json.dumps(figures))
    return code


if __name__ == "__main__":
    sys.exit(main())
