"""Wires one run's control plane: DNS, lease store, host manager, network manager and instances, and the LB's name.

The chain of 2025-10-20 (docs/sources.md#aws-summary) runs through real sockets here:
- the host manager reaches the lease store only by its DNS name (`leasestore.cp.lbsim`), through a resolver
  that honours TTLs, so an empty record stops renewals once cached answers expire;
- instances need a leased host to launch, and a launched instance's network path stays blackholed until the
  network manager has propagated its configuration; the scenario registers it with the load balancer as soon
  as it is network-pending, as NLB did;
- the load balancer's own name (`lb.lbsim`) is served by the same DNS server from the load balancer's DNS view,
  and client traffic resolves it there.
`backends/` knows nothing of the load balancer: the runner passes callbacks for registration and for the
addresses the load balancer publishes.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry

from backends.controlplane.dnsservice import DnsService, DnsServiceConfig
from backends.controlplane.hostmanager import HostManager, HostManagerConfig
from backends.controlplane.instances import InstanceConfig, InstanceFleet
from backends.controlplane.leaseclient import LeaseClient
from backends.controlplane.leasestore import LeaseStoreServer
from backends.controlplane.netmanager import NetworkManager, NetworkManagerConfig
from backends.controlplane.resolver import Resolver
from backends.fleet import Targets
from scenarios.schema import ControlAction, ControlPlaneSpec, Scenario
from worlds.base import Clock

ZONE_SUFFIX = "cp.lbsim"
LEASE_STORE_NAME = f"leasestore.{ZONE_SUFFIX}"
LB_NAME = "lb.lbsim"
# The planner plans several endpoints of the same service, as DynamoDB's planned its regional, FIPS and IPv6 ones;
# the race struck the regional one. A forced-mode pass writes them sorted, the regional one last; AWS gives no
# order, so an emergent-mode pass draws one (backends/controlplane/dnsautomation.py rule 6).
_ENDPOINTS = (f"leasestore-fips.{ZONE_SUFFIX}", f"leasestore-ipv6.{ZONE_SUFFIX}", LEASE_STORE_NAME)
# How long a client waits for the DNS server, in sim seconds.
_DNS_TIMEOUT_S = 1.0

OnLaunched = Callable[[str, str, str, int], None]
OnEvent = Callable[[str, str, dict[str, Any]], None]


class ControlPlane:
    """The control plane of one run; `start` brings it up after the load balancer, `close` releases it all."""

    def __init__(
        self,
        scenario: Scenario,
        clock: Clock,
        targets: Targets,
        registry: CollectorRegistry,
        *,
        lb_addresses: Callable[[], list[str]],
        on_launched: OnLaunched,
        on_terminated: Callable[[str], None],
        on_event: OnEvent,
        dns_port: int = 0,
        seed: int | None = None,
    ) -> None:
        assert scenario.control_plane is not None
        self.spec: ControlPlaneSpec = scenario.control_plane
        self.scenario = scenario
        self.clock = clock
        self.targets = targets
        self.registry = registry
        self._lb_addresses = lb_addresses
        self._on_launched = on_launched
        self._on_terminated = on_terminated
        self._on_event = on_event
        self.seed = scenario.seed if seed is None else seed  # the run's seed (`--seed`), else the scenario's
        self.dns_port = dns_port  # 0: an ephemeral port; `lbsim serve` fixes it so an operator can dig it
        self.store: LeaseStoreServer | None = None
        self.dns: DnsService | None = None
        self.host_resolver: Resolver | None = None
        self.traffic_resolver: Resolver | None = None
        self.lease_client: LeaseClient | None = None
        self.hosts: HostManager | None = None
        self.network: NetworkManager | None = None
        self.instances: InstanceFleet | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def start(self, adopt: list[tuple[str, str]]) -> None:
        """Bring every component up; `adopt` are the (target id, zone) running before the run began."""
        spec = self.spec
        try:
            # The specs are the components' own settings: they pass through whole, already checked by their rules.
            self.store = LeaseStoreServer(self.clock, self.registry, **dict(spec.lease_store))
            await self.store.start()
            self.dns = DnsService(
                self.clock,
                DnsServiceConfig.from_settings(spec.dns, zone_suffix=ZONE_SUFFIX,
                                               enactors=tuple(self.scenario.enactor_names())),
                {name: {self.store.host: 1} for name in _ENDPOINTS},
                self.registry,
                extra=self._extra,
                extra_ttl=self._extra_ttl,
                port=self.dns_port,
                rng=random.Random(f"dns-race/{self.seed}"),  # the emergent race's delays, fixed by the run's seed
            )
            self.dns.on_event = lambda kind, data: self._on_event(f"dns_{kind}", "dns", data)
            await self.dns.start()
            self.host_resolver = Resolver(self.clock, self.dns.address, _DNS_TIMEOUT_S, self.registry,
                                          client="host-manager")
            self.traffic_resolver = Resolver(self.clock, self.dns.address, _DNS_TIMEOUT_S, self.registry,
                                             client="traffic")
            hm = spec.host_manager
            self.lease_client = LeaseClient(self.clock, self.host_resolver.resolve, LEASE_STORE_NAME, self.store.port,
                                            timeout_s=hm.item_timeout_s, holder="host-manager")
            self.hosts = HostManager(
                self.clock, self.lease_client,
                HostManagerConfig.from_settings(hm, key_prefix="host-"),
                self.registry,
                on_event=lambda kind, data: self._on_event(f"hosts_{kind}", "host-manager", data),
            )
            await self.hosts.start()
            self.network = NetworkManager(
                self.clock,
                NetworkManagerConfig.from_settings(spec.network_manager),
                self.registry,
                on_event=lambda ev: self._on_event(f"network_{ev.kind}", "network-manager", {"depth": ev.depth}),
            )
            im = spec.instances
            desired = im.desired_per_zone if im.desired_per_zone is not None else self.scenario.targets_per_zone
            self.instances = InstanceFleet(
                self.clock, self.targets, self.hosts, self.network, self.registry,
                InstanceConfig.from_settings(im),
                on_launched=self._on_launched,
                on_terminated=self._on_terminated,
                desired=dict.fromkeys(self.scenario.zones, desired),
                on_event=self._instance_event,
            )
            for tid, zone in adopt:
                # Instances launched before the event hold a host slot; they kept running throughout.
                self.instances.adopt(tid, zone, host=self.hosts.place(tid))
            await self.network.start()
            await self.instances.start()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Release every component, the ones that depend on others first. Safe to call twice."""
        for closer in (self.instances, self.network, self.hosts, self.lease_client, self.host_resolver,
                       self.traffic_resolver, self.dns, self.store):
            if closer is not None:
                with contextlib.suppress(Exception):
                    await closer.close()

    # -- names -----------------------------------------------------------------------------------------------

    def _extra(self, name: str) -> list[str] | None:
        if name != LB_NAME:
            return None
        return sorted({address.rpartition(":")[0] for address in self._lb_addresses()})

    def _extra_ttl(self, name: str) -> int:
        return max(0, round(self.scenario.traffic.dns_ttl_s))

    async def lookup_lb(self, port: int) -> list[str]:
        """The load balancer's node addresses as a client finds them: by name, through the DNS server."""
        assert self.traffic_resolver is not None
        return [f"{ip}:{port}" for ip in await self.traffic_resolver.resolve(LB_NAME)]

    # -- actions ---------------------------------------------------------------------------------------------

    async def apply(self, c: ControlAction) -> dict[str, Any]:
        """Carry out one timeline action; return what it did, for the event log."""
        assert self.dns and self.store and self.hosts and self.network and self.instances
        p = c.params()
        done: dict[str, Any] = {}
        match c.component, c.action:
            case "dns", "delay-enactor":
                # The delay strikes the enactor's write of the lease store's own record, as it struck the
                # regional endpoint on 2025-10-20.
                self.dns.delay_enactor(p["enactor"], p["delay_s"], p.get("writes", 1), endpoint=LEASE_STORE_NAME)
            case "dns", "fail-writes":
                self.dns.fail_writes(p["enactor"], p["count"])
            case "dns", "restore":
                self.dns.restore()
            case "dns", "pause":
                self.dns.pause()
            case "dns", "resume":
                self.dns.resume()
            case "lease_store", "set-capacity":
                self.store.set_capacity(p["capacity_per_s"])
            case "host_manager", "throttle":
                self.hosts.throttle(p["per_s"])
            case "host_manager", "restart":
                done["flushed"] = len(self.hosts.restart())
            case "host_manager", "set-admission":
                self.hosts.set_admission(p["max_depth"])
            case "network_manager", "set-rate":
                self.network.set_rate(p["rate_per_s"])
            case "network_manager", "set-admission":
                self.network.set_admission(p["max_depth"])
            case "instances", "set-desired":
                zones = [p["zone"]] if p.get("zone") else self.scenario.zones
                for zone in zones:
                    self.instances.set_desired(zone, p["count"])
            case "instances", "launch":
                results = [await self.instances.launch(p["zone"]) for _ in range(p["count"])]
                done["outcomes"] = [r.outcome for r in results]
            case "instances", "terminate":
                victims = [i.id for i in self.instances.instances()
                           if i.live and (not p.get("zone") or i.zone == p["zone"])][: p["count"]]
                for iid in victims:
                    await self.instances.terminate(iid)
                done["terminated"] = victims
            case "instances", "set-launch-rate":
                self.instances.set_launch_rate(p["per_s"])
            case _:  # the schema only lets known pairs through
                raise ValueError(f"no such control action: {c.component} {c.action}")
        return done

    # -- observing -------------------------------------------------------------------------------------------

    def sample(self) -> dict[str, float]:
        """One row of control-plane columns for the run's time series (what the stages are detected from)."""
        assert self.dns and self.hosts and self.network and self.instances
        record = self.dns.record(LEASE_STORE_NAME)
        counts = self.hosts.counts()
        inst = self.instances.counts()
        rec = self.hosts.recovery
        return {
            "cp_record": float(len(record or [])),
            "dns_inconsistent": float(self.dns.inconsistent),
            "hosts_leased": float(counts["leased"]),
            "hosts_expired": float(counts["expired"]),
            "hosts_recovering": float(counts["recovering"]),
            "recovery_depth": float(self.hosts.queue_depth),
            "recovery_goodput_total": float(self.hosts.goodput_total),
            "recovery_timeouts_total": float(self.hosts.timeouts_total),
            "placements_failed_total": float(self.hosts.placement.insufficient),
            "net_backlog": float(self.network.depth),
            "instances_running": float(inst["running"]),
            "instances_network_pending": float(inst["network-pending"]),
            "recovery_service_s": float(rec.last_service_s),
        }

    def _instance_event(self, ev: Any) -> None:
        self._on_event(f"instance_{ev.kind}", ev.instance_id or ev.zone, {"zone": ev.zone})
