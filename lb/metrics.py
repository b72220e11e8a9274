"""Prometheus metrics of the load balancer, on an injected registry, in sim-second units."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# Buckets in sim seconds: probes and their lateness range from sub-millisecond to a checker many timeouts behind.
_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)


class LbMetrics:
    """Every series the load balancer exports. Labels stay low-cardinality: zone, state, result, policy, reason."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = registry
        self.sim_time = Gauge("lbsim_sim_time_seconds", "Current sim time", registry=r)
        self.targets = Gauge("lbsim_targets", "Registered targets by zone and merged health state",
                             ["zone", "state"], registry=r)
        self.routable = Gauge("lbsim_routable_targets", "Targets a zone node may route to now", ["zone"],
                              registry=r)
        self.in_service = Gauge("lbsim_in_service_targets", "Targets in service by zone (before fail-open)",
                                ["zone"], registry=r)
        self.probes = Counter("lbsim_probes_total", "Health-check probes by checking node's zone and result",
                              ["zone", "result"], registry=r)
        self.probes_late = Counter("lbsim_probes_late_total",
                                   "Probes that started later than their timeout and so counted as timeouts",
                                   ["zone"], registry=r)
        self.probe_duration = Histogram("lbsim_probe_duration_seconds", "Probe duration", ["zone"],
                                        buckets=_SECONDS_BUCKETS, registry=r)
        self.probe_lateness = Histogram("lbsim_probe_lateness_seconds",
                                        "How late a probe started against its schedule", ["zone"],
                                        buckets=_SECONDS_BUCKETS, registry=r)
        self.checker_in_flight = Gauge("lbsim_checker_in_flight", "Probes in flight per node", ["zone"],
                                       registry=r)
        self.transitions = Counter("lbsim_health_transitions_total", "Merged target health transitions",
                                   ["from_state", "to_state"], registry=r)
        self.ejections = Counter("lbsim_ejections_total", "Targets taken out of service", registry=r)
        self.restorations = Counter("lbsim_restorations_total", "Targets returned to service after an ejection",
                                    registry=r)
        # reason: one of lb.policy.WithholdReason (budget, floor, cap, keep-serving, other).
        self.withheld = Counter("lbsim_ejections_withheld_total",
                                "Ejections or removals a protection withheld, by policy and why",
                                ["policy", "reason"], registry=r)
        self.zone_mode = Gauge("lbsim_zone_mode", "1 for the routing mode each zone node is in",
                               ["zone", "mode"], registry=r)
        self.zone_in_dns = Gauge("lbsim_zone_in_dns", "1 if the zone's node is published in DNS", ["zone"],
                                 registry=r)
        self.zones_in_dns = Gauge("lbsim_zones_in_dns", "Zone nodes published in DNS", registry=r)
        self.dns_failovers = Counter("lbsim_dns_failovers_total", "Zone nodes removed from DNS", ["zone"],
                                     registry=r)
        self.connections = Counter("lbsim_proxy_connections_total", "Proxied connections by outcome",
                                   ["zone", "outcome"], registry=r)
        self.active_connections = Gauge("lbsim_proxy_active_connections", "Open proxied connections", ["zone"],
                                        registry=r)
        self.bytes = Counter("lbsim_proxy_bytes_total", "Bytes proxied", ["direction"], registry=r)


class MetricsServer:
    """Serves one or more registries at `/metrics` over HTTP on loopback."""

    def __init__(self, *registries: CollectorRegistry) -> None:
        self._registries = registries
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        app = web.Application()
        app.router.add_get("/metrics", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        # aiohttp keeps the bound address on the runner once the site is up; port 0 resolves here.
        addresses = self._runner.addresses
        self.port = int(addresses[0][1])
        return self.port

    async def _handle(self, request: web.Request) -> web.Response:
        body = b"".join(generate_latest(r) for r in self._registries)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
