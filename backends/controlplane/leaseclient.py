"""The lease store's client: reaches it only through its DNS name, and reports every call as a LeaseResult.

Rules:
1. Every call first awaits `resolve(name)` (the resolver caches answers by TTL on its own). An empty answer is
   outcome "unresolvable" and nothing is connected: this is how the AWS empty DynamoDB record stops the host
   manager's renewals once cached answers expire (docs/sources.md#aws-summary).
2. Otherwise it connects to the first address, or a random one if an `rng` is given, on `port`, with a fresh
   connection per request (`force_close`): a kept-alive connection would outlive an emptied record.
3. One deadline, `timeout_s` sim seconds (converted with `clock.to_loop`), covers resolving, connecting and the
   response; past it the outcome is "timeout" (the store may still apply the request: it does not know).
4. Calls never raise for network or HTTP errors. Outcomes: ok, conflict (409), not_found (404), throttled
   (429), unavailable (503, or the connection refused or reset), unresolvable, timeout, error (anything else:
   400, an unexpected status, an unreadable response).
`latency_s` is the sim time the call took, whatever its outcome.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import aiohttp
from yarl import URL

from backends.controlplane.leasestore import KEY_PATTERN
from backends.controlplane.resolver import Resolve
from worlds.base import Clock
from worlds.net import http_connector


class Outcome(StrEnum):
    OK = "ok"
    CONFLICT = "conflict"
    NOT_FOUND = "not_found"
    THROTTLED = "throttled"
    UNAVAILABLE = "unavailable"
    UNRESOLVABLE = "unresolvable"
    TIMEOUT = "timeout"
    ERROR = "error"


_BY_STATUS = {
    200: Outcome.OK,
    204: Outcome.OK,
    404: Outcome.NOT_FOUND,
    409: Outcome.CONFLICT,
    429: Outcome.THROTTLED,
    503: Outcome.UNAVAILABLE,
}


@dataclass(frozen=True, slots=True)
class LeaseResult:
    """One call's result. `version`: the lease's version after an ok put/renew/get, the live version a 409
    reports (None if the key has no live lease), else None. `value`: the lease's value after an ok call."""

    ok: bool
    outcome: str
    version: int | None
    latency_s: float
    value: str | None = None


class LeaseClient:
    """A client of `LeaseStoreServer` found by DNS name `name` on `port`; `holder` is the value `acquire_lease`
    writes."""

    def __init__(
        self,
        clock: Clock,
        resolve: Resolve,
        name: str,
        port: int,
        timeout_s: float = 2.0,
        *,
        holder: str = "",
        rng: random.Random | None = None,
        max_connections: int = 100,
    ) -> None:
        if not name:
            raise ValueError("name must not be empty")
        if isinstance(port, bool) or not 0 < port < 65536:
            raise ValueError(f"port must be within 1-65535, got {port!r}")
        if not math.isfinite(timeout_s) or timeout_s <= 0:
            raise ValueError(f"timeout_s must be a finite number > 0, got {timeout_s!r}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        self._clock = clock
        self._resolve = resolve
        self.name = name
        self.port = port
        self.timeout_s = float(timeout_s)
        self.holder = holder
        self._rng = rng
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    # -- the host manager's two calls

    async def acquire_lease(self, key: str, ttl_s: float) -> LeaseResult:
        """Put the lease unconditionally: (re-)establish it whatever state it is in."""
        return await self.put(key, self.holder, ttl_s)

    async def renew_lease(self, key: str, ttl_s: float) -> LeaseResult:
        """Renew the lease; not_found means it has expired (and must be acquired again)."""
        return await self.renew(key, ttl_s)

    # -- the API

    async def put(self, key: str, value: str, ttl_s: float, expected_version: int | None = None) -> LeaseResult:
        body = {"value": value, "ttl_s": ttl_s, "expected_version": expected_version}
        return await self._call("PUT", key, "", body=body)

    async def renew(self, key: str, ttl_s: float, expected_version: int | None = None) -> LeaseResult:
        return await self._call("POST", key, "/renew", body={"ttl_s": ttl_s, "expected_version": expected_version})

    async def get(self, key: str) -> LeaseResult:
        return await self._call("GET", key, "")

    async def delete(self, key: str, expected_version: int | None = None) -> LeaseResult:
        query = None if expected_version is None else {"expected_version": str(expected_version)}
        return await self._call("DELETE", key, "", query=query)

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def __aenter__(self) -> LeaseClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- internals

    def _session_now(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("lease client is closed")
        if self._session is None:
            connector = http_connector(force_close=True, limit=self._max_connections)
            # No session timeout: each call's deadline is the asyncio.timeout around it (rule 3).
            # No cookie jar: nothing here uses cookies, and aiohttp's jar reads the wall clock.
            self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None),
                                                  cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    async def _call(
        self,
        method: str,
        key: str,
        suffix: str,
        body: dict[str, Any] | None = None,
        query: dict[str, str] | None = None,
    ) -> LeaseResult:
        if not KEY_PATTERN.fullmatch(key):
            raise ValueError(f"key must match {KEY_PATTERN.pattern}, got {key!r}")
        session = self._session_now()
        start = self._clock.now()
        try:
            async with asyncio.timeout(self._clock.to_loop(self.timeout_s)):
                addresses = await self._resolve(self.name)
                if not addresses:
                    return self._result(Outcome.UNRESOLVABLE, start)
                address = addresses[0] if self._rng is None else self._rng.choice(addresses)
                url = URL.build(scheme="http", host=address, port=self.port, path=f"/leases/{key}{suffix}")
                async with session.request(method, url, json=body, params=query) as response:
                    raw = await response.read()
        except TimeoutError:
            return self._result(Outcome.TIMEOUT, start)
        except (aiohttp.ClientConnectionError, ConnectionError):
            return self._result(Outcome.UNAVAILABLE, start)
        except (aiohttp.ClientError, OSError):
            return self._result(Outcome.ERROR, start)
        outcome = _BY_STATUS.get(response.status, Outcome.ERROR)
        if outcome not in (Outcome.OK, Outcome.CONFLICT) or not raw:
            return self._result(outcome, start)
        try:
            data = json.loads(raw)
            version = data.get("version")
            value = data.get("value")
        except (ValueError, AttributeError):
            return self._result(Outcome.ERROR, start)
        return self._result(
            outcome,
            start,
            version if isinstance(version, int) and not isinstance(version, bool) else None,
            value if isinstance(value, str) else None,
        )

    def _result(
        self, outcome: Outcome, start: float, version: int | None = None, value: str | None = None
    ) -> LeaseResult:
        return LeaseResult(outcome == Outcome.OK, outcome.value, version, self._clock.now() - start, value)
