"""Pure target selection for one zone node: NLB-style flow hash and round robin over candidate target ids.

A selector sees only target ids and the flow key; which ids are candidates (healthy, fail-open, cross-zone...)
is decided elsewhere. No I/O, no clock. Both selectors work on the *sorted* candidate list so that the answer
does not depend on the order the caller happened to build the list in.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Protocol

# (client ip, client port, listener port): the parts of the NLB 5-tuple that vary on one node's listener. The
# protocol is always TCP and the destination ip is the node's own address, so they add nothing to the hash.
FlowKey = tuple[str, int, int]


class Selector(Protocol):
    """Picks one target id among `candidates` for a new connection, or None when there is none."""

    def pick(self, candidates: Sequence[str], flow: FlowKey) -> str | None: ...


def flow_hash(flow: FlowKey) -> int:
    """A stable 32-bit hash of a flow key: the same on every run and in every process.

    Python's `hash()` of a str is salted per process (PYTHONHASHSEED), so it cannot be used for a reproducible
    simulation. CRC-32 is the cheapest stable choice (~0.4 us here, against ~1.3 us for blake2b) and, being
    linear, it spreads consecutive client ports evenly, which is exactly how a load generator allocates them.
    """
    return zlib.crc32(f"{flow[0]}|{flow[1]}|{flow[2]}".encode())


class _SortedCache:
    """Remembers the sorted form of the last candidate tuple seen.

    The routing plan usually hands the same tuple object to every connection until health changes, so sorting
    once per plan instead of once per connection takes the O(n log n) off the accept path. Only tuples are
    cached: they are immutable, so identity implies equal contents (a list could have been mutated in place).
    """

    __slots__ = ("_key", "_sorted")

    def __init__(self) -> None:
        self._key: tuple[str, ...] | None = None
        self._sorted: list[str] = []

    def sorted(self, candidates: Sequence[str]) -> list[str]:
        if candidates is self._key:
            return self._sorted
        ordered = sorted(candidates)
        if isinstance(candidates, tuple):
            self._key = candidates
            self._sorted = ordered
        return ordered


class FlowHashSelector:
    """NLB routing: a flow's target is `sorted(candidates)[flow_hash(flow) % n]`.

    The same flow over the same candidate set always lands on the same target. When the set changes, flows may
    move; that matches NLB, which hashes once per new connection and pins the connection afterwards.
    """

    __slots__ = ("_cache",)

    def __init__(self) -> None:
        self._cache = _SortedCache()

    def pick(self, candidates: Sequence[str], flow: FlowKey) -> str | None:
        n = len(candidates)
        if n == 0:
            return None
        if n == 1:
            return candidates[0]
        return self._cache.sorted(candidates)[flow_hash(flow) % n]


class RoundRobinSelector:
    """Each call takes the next target of the sorted candidate list; the flow key is ignored.

    The counter is global, not per candidate set, so a set change shifts the rotation but never stalls it.
    """

    __slots__ = ("_cache", "_next")

    def __init__(self) -> None:
        self._cache = _SortedCache()
        self._next = 0

    def pick(self, candidates: Sequence[str], flow: FlowKey) -> str | None:
        n = len(candidates)
        if n == 0:
            return None
        i = self._next
        self._next = i + 1
        if n == 1:
            return candidates[0]
        return self._cache.sorted(candidates)[i % n]
