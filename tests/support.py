"""Helpers shared by the loopback tests: count open sockets, run a body on a fresh asyncio or uvloop loop, find
a system program a test needs (skipped without it, failed without it in CI)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop
from hypothesis import strategies as st

from lb.probes import MAX_STATUS_LINE, is_status_line_prefix, parse_status_line
from lb.targets import ProbeOutcome

# How a user starts lbsim: the installed script beside this Python, else the module (an uninstalled checkout).
_SCRIPT = Path(sys.executable).with_name("lbsim")
LBSIM = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "scenarios.cli"]

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def require_binary(name: str, package: str) -> str:
    """The path of the system program `name`. Without it the test is skipped, saying which Debian package has it,
    or fails when the environment variable CI is set (CI installs every package, so a missing one is a bug)."""
    found = shutil.which(name)
    if found is not None:
        return found
    reason = f"`{name}` not found on PATH: install the Debian package {package} (apt-get install {package})"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, so a missing program fails the test", pytrace=False)
    pytest.skip(reason)


def open_sockets() -> int:
    """Socket fds in /proc/self/fd (not all fds: uvloop keeps a /dev/null one per loop, on purpose)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the fd listdir itself used is gone already
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


def run_on(kind: str, body: Callable[[], Awaitable[None]], timeout: float = 30.0) -> None:
    """Run `body` on a fresh loop of `kind`; fail on anything the loop's exception handler saw (a task that
    died unobserved, a callback that raised) or any task left pending."""
    errors: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        async with asyncio.timeout(timeout):
            await body()
        leftover = asyncio.all_tasks() - {asyncio.current_task()}
        assert not leftover, leftover

    with asyncio.Runner(loop_factory=LOOPS[kind]) as runner:
        runner.run(main())
    assert not errors, errors


async def wait_for(predicate: Callable[[], bool], within: float = 5.0) -> None:
    """Poll a condition with a deadline (the thing we wait on has no event to await)."""
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


# Bytes a status line's reason phrase may hold (RFC 9112: HTAB, SP, VCHAR, obs-text).
REASON_BYTES = frozenset([9, *range(32, 127), *range(128, 256)])


def reason_phrases(max_size: int) -> st.SearchStrategy[bytes]:
    return st.binary(max_size=max_size).map(lambda b: bytes(c for c in b if c in REASON_BYTES))


def status_lines(max_reason: int) -> st.SearchStrategy[bytes]:
    """Valid HTTP/1.0 and 1.1 status lines with any code from 100 to 599, CRLF included."""
    return st.builds(
        lambda v, c, r: b"HTTP/1." + v + b" " + str(c).encode() + b" " + r + b"\r\n",
        st.sampled_from([b"0", b"1"]),
        st.integers(100, 599),
        reason_phrases(max_reason),
    )


def probe_verdict(data: bytes, codes: frozenset[int]) -> ProbeOutcome | None:
    """The verdict a server's answer `data` forces on a strict HTTP probe, however it is split across reads;
    None while it decides nothing yet (the probe then ends by the server closing or by its timeout)."""
    head = data[:MAX_STATUS_LINE]
    end = head.find(b"\n")
    if end >= 0:
        code = parse_status_line(head[: end + 1])
        if code is None:
            return ProbeOutcome.MALFORMED
        return ProbeOutcome.SUCCESS if code in codes else ProbeOutcome.FAILURE
    if len(head) >= MAX_STATUS_LINE or not is_status_line_prefix(head):
        return ProbeOutcome.MALFORMED
    return None


class PinnedClock:
    """A clock a test sets to any sim time, back or forth, for code that only reads `now()` (a slotted flap)."""

    loop_timers = False

    def __init__(self) -> None:
        self.t = 0.0

    def set(self, sim_time: float) -> None:
        self.t = sim_time

    def now(self) -> float:
        return self.t

    def restart(self, start: float = 0.0) -> None:
        self.t = start

    def to_loop(self, sim_seconds: float) -> float:
        return sim_seconds

    def to_sim(self, loop_seconds: float) -> float:
        return loop_seconds

    async def sleep(self, sim_seconds: float) -> None:
        raise NotImplementedError("a pinned clock does not pass time")

    async def sleep_until(self, sim_time: float) -> None:
        raise NotImplementedError("a pinned clock does not pass time")


WORLDS = ("asyncio", "uvloop", "sim")


def make_world(kind: str, speed: float = 1.0, seed: int | str = 0) -> Any:
    """A world of `kind`: the real one on asyncio's or uvloop's loop, or the simulated one."""
    if kind == "sim":
        from worlds.sim import SimWorld

        return SimWorld(seed=seed)
    from worlds.real import RealWorld

    return RealWorld(speed=speed, seed=seed, loop="uvloop" if kind == "uvloop" else "asyncio")
