"""Helpers shared by the benchmarks, which measure nothing here: run python bench/checks.py or bench/proxy.py.

They cover CPU time from /proc, child processes, HAProxy, statistics, and the backend child:
`python bench/_common.py fleet --n 4` runs that child by hand, one BackendFleet process with N healthy aiohttp
backends on 127.0.0.1, driven by JSON lines on stdin (see `_fleet`).

Every benchmark process tree is built the same way: the parent only orchestrates and sleeps; each measured
program (backends, lbsim checker or proxy, HAProxy, wrk) is its own child process, so each can have a core and
its CPU time can be read from /proc/PID/stat over exactly the measuring window.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import importlib.metadata
import json
import os
import platform
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from worlds.clock import ScaledClock

HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Kernel counters that explain latency outliers and failed connections on loopback:
# SYN retransmits mean a 1 s stall, TIME_WAIT overflow means the table was full, listen overflows mean an
# accept queue dropped SYNs.
NETSTAT_KEYS = ("TCPSynRetrans", "TCPTimeWaitOverflow", "ListenOverflows", "ListenDrops")

Json = dict[str, Any]


# -- CPU time and machine state -----------------------------------------------------------------------------


def stat_fields(pid: int) -> list[str]:
    """Fields 3... of /proc/PID/stat: the command name (field 2) may hold spaces and parentheses, so every later
    field is read from after the last ')'."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    return raw[raw.rindex(b")") + 2 :].decode().split()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (all its threads) from /proc/PID/stat, in seconds.

    The kernel reports it in clock ticks (1/CLK_TCK s, 10 ms here), so a measuring window must hold enough CPU
    time for that resolution not to matter: the benchmarks print the window's CPU seconds next to each figure.
    """
    fields = stat_fields(pid)
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5), counted from field 3
    return (utime + stime) / CLK_TCK


def raise_fd_limit() -> None:
    """Lift the soft open-files limit to the hard one: 1,000 backends, or 1,000 probes in flight, need more than
    the common default of 1,024 descriptors (children and HAProxy inherit the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(soft, 65536) if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def netstat() -> dict[str, int]:
    """The NETSTAT_KEYS counters from /proc/net/netstat and /proc/net/snmp (missing ones read as 0)."""
    out: dict[str, int] = {}
    for path in ("/proc/net/netstat", "/proc/net/snmp"):
        with contextlib.suppress(OSError):
            lines = Path(path).read_text().splitlines()
            # Each section is a pair of lines: "Prefix: name name ..." then "Prefix: value value ...".
            for names, values in zip(lines[::2], lines[1::2], strict=False):
                for name, value in zip(names.split()[1:], values.split()[1:], strict=False):
                    if name in NETSTAT_KEYS:
                        out[name] = out.get(name, 0) + int(value)
    return {k: out.get(k, 0) for k in NETSTAT_KEYS}


def _all_process_cpu() -> dict[int, tuple[str, float]]:
    out: dict[int, tuple[str, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            out[pid] = (cmd[:90] or f"[pid {pid}]", cpu_seconds(pid))
        except (OSError, ValueError):
            continue  # exited while we looked
    return out


class MachineWatch:
    """What else ran on the machine while we measured: CPU seconds used by processes that are not ours.

    On 2 cores any other busy process takes CPU from the measured programs and skews throughput (less so CPU
    per request), so the report must say whether the box was quiet.
    """

    def __init__(self, ours: Callable[[], set[int]]) -> None:
        self._ours = ours
        self._t0 = time.monotonic()
        self._start = _all_process_cpu()
        self.loadavg_start = os.getloadavg()

    def summary(self) -> str:
        elapsed = time.monotonic() - self._t0
        end = _all_process_cpu()
        ours = self._ours() | {os.getpid()}
        used = []
        for pid, (cmd, cpu) in end.items():
            if pid in ours:
                continue
            before = self._start.get(pid, (cmd, 0.0))[1]
            if cpu - before > 0:
                used.append((cpu - before, pid, cmd))
        used.sort(reverse=True)
        total = sum(u for u, _, _ in used)
        top = "; ".join(f"{u:.2f} s pid {pid} {cmd}" for u, pid, cmd in used[:3]) or "none"
        la = " ".join(f"{x:.2f}" for x in self.loadavg_start)
        return (
            f"machine: {os.cpu_count()} CPUs, load average at start {la}; other processes used {total:.2f} CPU-s "
            f"in {elapsed:.0f} s ({100 * total / max(elapsed, 1e-9):.1f}% of one core); top: {top}"
        )


def versions() -> str:
    parts = [f"Python {platform.python_version()}", f"kernel {platform.release()}"]
    for dist in ("uvloop", "aiohttp"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            parts.append(f"{dist} {importlib.metadata.version(dist)}")
    hap = haproxy_path()
    if hap:
        out = subprocess.run([hap, "-v"], capture_output=True, text=True, timeout=10, check=False).stdout
        parts.append(out.splitlines()[0].split(" - ")[0] if out else "HAProxy ?")
    return ", ".join(parts)


# -- statistics ---------------------------------------------------------------------------------------------


def median(values: Sequence[float | None]) -> float | None:
    """Median of the values that exist; None if none does."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]) of an already sorted sequence."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil(n * q / 100), at least the first value
    return sorted_values[int(rank) - 1]


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(value: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def runs_str(values: Sequence[float | None], spec: str = ".0f") -> str:
    """Per-run values, to print next to their median so the spread is visible."""
    return "/".join(fmt(v, spec) for v in values)


# -- child processes ----------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if the bench is killed (even with SIGKILL) the kernel sends
    # SIGTERM to the child, so no backend, HAProxy or wrk outlives it.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


class Interrupted(Exception):
    """SIGTERM or SIGHUP reached the bench: unwind (and reap every child) as Ctrl-C would."""


def raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


class Reaper:
    """Owns every child process: each is killed and reaped when the `with` block ends, however it ends.

    Children get their own session, so a Ctrl-C in the terminal reaches only the bench, which then stops them
    in order instead of each child dying with its own traceback.
    """

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []
        self.pids: set[int] = set()  # every child ever started, for MachineWatch
        self.logdir = Path(tempfile.mkdtemp(prefix="lbsim-bench-"))

    def __enter__(self) -> Reaper:
        raise_fd_limit()
        signal.signal(signal.SIGTERM, raise_interrupted)
        signal.signal(signal.SIGHUP, raise_interrupted)
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        # A second Ctrl-C during cleanup must not leave children behind: ignore it until all are reaped.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for proc in reversed(self._procs):
                stop_process(proc)
            self._procs.clear()
        finally:
            signal.signal(signal.SIGINT, previous)
        shutil.rmtree(self.logdir, ignore_errors=True)

    def spawn(self, argv: Sequence[str], name: str, *, pipes: bool = False) -> subprocess.Popen[bytes]:
        """Start a child; its stderr goes to a log file whose tail `log_tail` shows if it misbehaves."""
        log = open(self.logdir / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it; closed right below
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # we start no threads, so fork+preexec is safe
                bufsize=0,
            )
        finally:
            log.close()
        self._procs.append(proc)
        self.pids.add(proc.pid)
        return proc

    def release(self, proc: subprocess.Popen[bytes]) -> None:
        """Stop and reap one child now (the rest wait for the end of the `with` block)."""
        stop_process(proc)
        if proc in self._procs:
            self._procs.remove(proc)

    def log_tail(self, name: str, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.logdir / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
        return ""


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 3.0) -> None:
    """SIGTERM, wait up to `grace_s`, then SIGKILL; always reap, and close our ends of its pipes."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(5.0)
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


class ChildError(RuntimeError):
    pass


class Child:
    """A Python child driven by JSON lines: we write {"cmd": ...} to its stdin, it answers one line on stdout.

    Reads are bounded by a timeout (select), so a wedged child fails the bench instead of hanging it.
    """

    def __init__(self, reaper: Reaper, name: str, argv: Sequence[str]) -> None:
        self.name = name
        self._reaper = reaper
        self.proc = reaper.spawn([sys.executable, *argv], name, pipes=True)
        self.pid = self.proc.pid
        self._buf = b""

    def read(self, timeout_s: float = 30.0) -> Json:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ChildError(f"{self.name}: no answer within {timeout_s} s\n{self._reaper.log_tail(self.name)}")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise ChildError(
                        f"{self.name} exited (code {self.proc.wait(5)})\n{self._reaper.log_tail(self.name)}"
                    )
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        reply: Json = json.loads(line)
        if "error" in reply:
            raise ChildError(f"{self.name}: {reply['error']}")
        return reply

    def call(self, cmd: str, timeout_s: float = 30.0, **args: Any) -> Json:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        except BrokenPipeError:
            raise ChildError(f"{self.name} is gone\n{self._reaper.log_tail(self.name)}") from None
        return self.read(timeout_s)

    def stop(self) -> None:
        # Ask politely first (the child closes its sockets), then the reaper makes sure.
        with contextlib.suppress(ChildError, OSError, ValueError):
            self.call("quit", timeout_s=5.0)
        self._reaper.release(self.proc)

    def cpu(self) -> float:
        return cpu_seconds(self.pid)


def run_loop(main: Coroutine[Any, Any, None], loop: str) -> None:
    """Run a child's main coroutine on uvloop or the asyncio loop."""
    if loop == "uvloop":
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


def reply(obj: Json) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def serve_commands(handle: Callable[[Json], Awaitable[Json]]) -> None:
    """A child's command loop: one JSON answer per JSON line on stdin, until "quit" or stdin closes (the
    parent is gone)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        msg: Json = json.loads(line)
        if msg.get("cmd") == "quit":
            reply({"ok": True})
            return
        try:
            reply(await handle(msg))
        except Exception as exc:  # report it to the parent, which fails the bench with the message
            reply({"error": f"{type(exc).__name__}: {exc}"})


def free_port() -> int:
    """An ephemeral port that was free a moment ago (for HAProxy's listeners)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout_s: float = 10.0) -> None:
    """Wait until something accepts on 127.0.0.1:port, bounded in time."""
    deadline = time.monotonic() + timeout_s
    while True:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((HOST, port)) == 0:
                return
        if time.monotonic() > deadline:
            raise ChildError(f"nothing listens on {HOST}:{port} after {timeout_s} s")
        time.sleep(0.02)


# -- HAProxy ------------------------------------------------------------------------------------------------


def haproxy_path() -> str | None:
    found = shutil.which("haproxy")
    if found:
        return found
    return "/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None


# -- external programs --------------------------------------------------------------------------------------

# A bench that cannot measure anything without a program (proxy.py without wrk) stops with EXIT_MISSING_TOOL and
# says how to install it; one that is still useful without it (HAProxy: a comparison column) skips that column
# and says so, with the same hint.
EXIT_MISSING_TOOL = 2
INSTALL = {"haproxy": "sudo apt-get install haproxy", "wrk": "sudo apt-get install wrk"}


def tool_path(name: str) -> str | None:
    return haproxy_path() if name == "haproxy" else shutil.which(name)


def missing_tool(name: str, consequence: str) -> str:
    """One line: what is missing, what that means for this bench, how to install it."""
    where = "on PATH or in /usr/sbin" if name == "haproxy" else "on PATH"
    return f"{name} is not installed (not found {where}): {consequence}; install it with `{INSTALL[name]}`"


def require_tool(name: str, purpose: str) -> str:
    """The path of a program the bench cannot do without; if it is missing, say so on stderr and exit 2."""
    found = tool_path(name)
    if found is None:
        print(f"error: {missing_tool(name, f'{purpose}, so this bench cannot run')}", file=sys.stderr)
        sys.exit(EXIT_MISSING_TOOL)
    return found


class HAProxy:
    """One HAProxy process in the foreground (-db), so its PID is the process whose CPU we read."""

    def __init__(self, reaper: Reaper, name: str, config: str, stats_socket: Path | None = None) -> None:
        binary = haproxy_path()
        if binary is None:
            raise ChildError("haproxy is not installed")
        self.name = name
        self._reaper = reaper
        self.config_path = reaper.logdir / f"{name}.cfg"
        self.config_path.write_text(config)
        self.stats_socket = stats_socket
        self.proc = reaper.spawn([binary, "-db", "-f", str(self.config_path)], name)
        self.pid = self.proc.pid

    def wait_ready(self, port: int, timeout_s: float = 10.0) -> None:
        try:
            wait_port(port, timeout_s)
        except ChildError:
            raise ChildError(f"{self.name} did not start\n{self._reaper.log_tail(self.name)}") from None
        if self.proc.poll() is not None:
            raise ChildError(f"{self.name} exited\n{self._reaper.log_tail(self.name)}")

    def command(self, cmd: str, timeout_s: float = 5.0) -> str:
        """One command on the stats socket (e.g. "show stat"), answer as text."""
        assert self.stats_socket is not None
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout_s)
            s.connect(str(self.stats_socket))
            s.sendall(cmd.encode() + b"\n")
            chunks: list[bytes] = []
            deadline = time.monotonic() + timeout_s
            # HAProxy closes the socket after one answer; the deadline and size cap only guard against a wedge.
            while (chunk := s.recv(65536)) and time.monotonic() < deadline and len(chunks) < 1000:
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def server_status(self) -> dict[str, int]:
        """How many servers `show stat` lists as UP and as anything else (DOWN, NOLB, ...)."""
        lines = self.command("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        status_col, type_col = header.index("status"), header.index("type")
        out = {"up": 0, "not_up": 0}
        for line in lines[1:]:
            row = line.split(",")
            if len(row) > max(status_col, type_col) and row[type_col] == "2":  # type 2 = server
                out["up" if row[status_col].startswith("UP") else "not_up"] += 1
        return out

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def stop(self) -> None:
        self._reaper.release(self.proc)


# -- the backend fleet child --------------------------------------------------------------------------------


class Fleet(Child):
    """The parent's handle on the backend child: N healthy aiohttp backends in one uvloop process."""

    def __init__(self, reaper: Reaper, n: int, loop: str = "uvloop") -> None:
        super().__init__(reaper, f"fleet{n}", [str(Path(__file__)), "fleet", "--n", str(n), "--loop", loop])
        self.ports: list[int] = self.read(timeout_s=60.0)["ports"]

    def requests(self) -> int:
        """Requests that reached a backend handler since start: the probe counter used for lbsim and HAProxy."""
        return int(self.call("count")["requests"])


async def _fleet(n: int) -> None:
    from backends.app import BackendFleet

    fleet = BackendFleet(clock=ScaledClock())
    await fleet.start()
    ids = [f"b{i}" for i in range(n)]
    try:
        ports = [await fleet.add(backend_id) for backend_id in ids]
        reply({"ports": ports})

        async def handle(msg: Json) -> Json:
            if msg["cmd"] == "count":
                return {"requests": sum(fleet.state(backend_id).requests for backend_id in ids)}
            raise ValueError(f"unknown command {msg['cmd']!r}")

        await serve_commands(handle)
    finally:
        await fleet.stop()


def fleet_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="_common.py fleet", description="N aiohttp backends, driven by stdin")
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args(argv)
    raise_fd_limit()
    run_loop(_fleet(args.n), args.loop)


def ignore_sigint() -> None:
    """In a child: Ctrl-C is the parent's business (it stops us through stdin, or SIGTERM)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "fleet":
        sys.exit("usage: python bench/_common.py fleet --n N [--loop uvloop|asyncio]")
    ignore_sigint()
    fleet_main(sys.argv[2:])


def run_main(main: Callable[[], None]) -> None:
    """Run a bench's main with clean exits: 130 on Ctrl-C (children already stopped), 1 if a child failed."""
    try:
        main()
    except (KeyboardInterrupt, Interrupted):
        print("\ninterrupted: every child process was stopped", file=sys.stderr)
        sys.exit(130)
    except ChildError as exc:
        print(f"\nbench failed: {exc}", file=sys.stderr)
        sys.exit(1)
