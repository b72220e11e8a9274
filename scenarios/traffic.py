"""Open-loop client traffic to the load balancer's nodes, found by a DNS lookup that caches answers for a TTL."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from lb.aio import cancel_and_wait
from worlds.base import Clock


@dataclass(frozen=True, slots=True)
class RequestResult:
    started: float  # sim seconds
    latency_s: float  # sim seconds
    ok: bool
    error: str  # "" when ok; else timeout | refused | reset | status_NNN | no_address | overload


class DnsCache:
    """A client's resolver cache: answers last for `ttl_s` sim seconds, so failover reaches clients late."""

    def __init__(self, resolve: Callable[[], tuple[str, ...]], ttl_s: float) -> None:
        self._resolve = resolve
        self._ttl = ttl_s
        self._answer: tuple[str, ...] = ()
        self._expires = float("-inf")

    def lookup(self, now: float) -> tuple[str, ...]:
        if now >= self._expires:
            self._answer = self._resolve()
            self._expires = now + self._ttl
        return self._answer


async def http_get(host: str, port: int, path: str, timeout_loop: float) -> str:
    """One request on a new connection (an NLB-style flow). Returns "" on a 2xx answer, else the error kind."""
    writer: asyncio.StreamWriter | None = None
    clean = False
    try:
        async with asyncio.timeout(timeout_loop):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: lbsim\r\nConnection: close\r\n\r\n".encode())
            status_line = await reader.readline()
            parts = status_line.split(b" ", 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
                return "reset" if not status_line else "malformed"
            status = int(parts[1])
            while await reader.read(65536):  # read the whole answer: a request is done when its body is
                pass
            clean = True
            return "" if 200 <= status < 300 else f"status_{status}"
    except TimeoutError:
        return "timeout"
    except ConnectionRefusedError:
        return "refused"
    except (ConnectionResetError, BrokenPipeError, asyncio.IncompleteReadError):
        return "reset"
    except OSError:
        return "reset"
    finally:
        if writer is not None:
            # close() after a complete answer, abort() otherwise. No wait_closed(): a cancelled request must end
            # now, and the transport finishes closing on its own.
            if clean:
                writer.close()
            else:
                writer.transport.abort()


class TrafficGenerator:
    """Poisson arrivals at `rate_per_s` (sim); each request picks a published node address at random."""

    def __init__(
        self,
        clock: Clock,
        lookup: Callable[[float], Awaitable[Sequence[str]]],
        rate_per_s: float,
        path: str,
        timeout_s: float,
        max_outstanding: int,
        seed: int,
        on_result: Callable[[RequestResult], None],
    ) -> None:
        """`lookup(now)` gives the "host:port" node addresses a client would get now; it caches by TTL itself
        (a `DnsCache` over the load balancer's DNS view, or a real resolver asking the control plane's DNS)."""
        self.clock = clock
        self.lookup = lookup
        self.rate = rate_per_s
        self.path = path
        self.timeout_s = timeout_s
        self.max_outstanding = max_outstanding
        self.rng = random.Random(seed)
        self.on_result = on_result
        self._tasks: set[asyncio.Task[None]] = set()
        self._main: asyncio.Task[None] | None = None

    def start(self, until: float) -> None:
        if self.rate > 0:
            self._main = asyncio.create_task(self._run(until), name="traffic")

    async def _run(self, until: float) -> None:
        next_at = self.clock.now()
        while True:
            next_at += self.rng.expovariate(self.rate)
            if next_at >= until:
                return
            await self.clock.sleep_until(next_at)
            # A request is stamped with its scheduled time: a lagging loop must not move it (or past the end).
            now = next_at
            if len(self._tasks) >= self.max_outstanding:
                # Open loop: a client that cannot even send counts as a failed request, not a skipped one.
                self.on_result(RequestResult(now, 0.0, False, "overload"))
                continue
            # Drawn here, not in the request, so the sequence of choices depends on the seed alone.
            pick = self.rng.random()
            task = asyncio.create_task(self._one(now, pick))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _one(self, started: float, pick: float) -> None:
        # The lookup is part of the request: a resolver that times out costs the client its time.
        addresses = await self.lookup(started)
        if not addresses:
            self.on_result(RequestResult(started, self.clock.now() - started, False, "no_address"))
            return
        host, _, port = addresses[int(pick * len(addresses)) % len(addresses)].rpartition(":")
        remaining = self.timeout_s - (self.clock.now() - started)
        err = await http_get(host, int(port), self.path, self.clock.to_loop(max(remaining, 0.0)))
        self.on_result(RequestResult(started, self.clock.now() - started, err == "", err))

    async def stop(self) -> None:
        await cancel_and_wait([self._main, *self._tasks])
        self._tasks.clear()
        self._main = None

    async def wait(self) -> None:
        """Wait for the arrival loop to end and every request to finish (each is bounded by its timeout)."""
        if self._main is not None:
            await self._main
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
