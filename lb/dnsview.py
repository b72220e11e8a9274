"""The load balancer's DNS view: which zone node addresses its name resolves to, published on change."""

from __future__ import annotations

from collections.abc import Callable, Mapping

DnsListener = Callable[[tuple[str, ...]], None]


class DnsView:
    """Holds the published node addresses and tells listeners (a DNS server, a traffic generator) on change.

    If no zone is published the view still answers with every node: AWS publishes all zones when all fail.
    Policies already guarantee that; the view enforces it so a buggy user policy cannot empty the name.
    """

    def __init__(self, nodes: Mapping[str, str]) -> None:
        self._nodes = dict(nodes)  # zone -> "host:port"
        self._published: tuple[str, ...] = tuple(sorted(self._nodes))
        self._listeners: list[DnsListener] = []

    def subscribe(self, listener: DnsListener) -> None:
        self._listeners.append(listener)
        listener(self.addresses())

    @property
    def zones(self) -> tuple[str, ...]:
        return self._published

    def addresses(self) -> tuple[str, ...]:
        return tuple(self._nodes[z] for z in self._published)

    def update(self, dns: Mapping[str, bool]) -> tuple[list[str], list[str]]:
        """Apply a plan's DNS decision; return the zones just removed and the zones just added back."""
        zones = tuple(sorted(z for z, up in dns.items() if up and z in self._nodes)) or tuple(sorted(self._nodes))
        removed = [z for z in self._published if z not in zones]
        added = [z for z in zones if z not in self._published]
        if zones != self._published:
            self._published = zones
            for listener in self._listeners:
                listener(self.addresses())
        return removed, added
