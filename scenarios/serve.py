"""`lbsim serve`: the whole system kept running on fixed ports, with an admin API to inject events by hand.

Rules:
1. A served run is a `ScenarioRun` lasting the schema's maximum (`SERVE_DURATION_S`, 7 sim days): the scenario's
   own timeline plays at its times, then the system keeps running until it is stopped.
2. Fixed ports are claimed before anything starts (`plan_ports`, `check_free`): two listeners on one port, or a
   port something else holds, is a `PortError` naming the port and the option that sets it, and nothing runs.
   Metrics, the serve admin API and, without a control plane, the zone nodes listen on the `--bind` address
   (127.0.0.1 by default); the backends, their admin API and the control plane stay on loopback.
3. `POST /events` takes exactly one timeline event as JSON, as a scenario file writes it; `at` may be left out and
   is ignored: the event happens now. It is validated by the scenario schema (`Event`), then checked against this
   run (zones, live targets, policies, control plane) before anything is touched: a rejected event changes
   nothing and answers 4xx `{"error": ...}` (400: not JSON or not the schema; 404: an unknown zone, target or
   policy). Events are applied one at a time, in arrival order.
4. A target the load balancer still lists but whose backend has been retired (deregistered long enough) cannot be
   acted on; an event selecting targets by zone or count is narrowed to the live ones, by id, before it applies.
5. With a token, every request needs `Authorization: Bearer TOKEN`, compared in constant time; otherwise 401.
6. The core (`plan_ports`, `parse_event`, `state_document`, `authorized`) is pure; `ServeAdmin` and `serve` are the
   asyncio shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import ValidationError

from lb.policies import PolicyError
from scenarios.ports import ListenError, PortClaim, PortError, claim_ports, url_host
from scenarios.runner import ScenarioRun
from scenarios.schema import Event, Scenario, ScenarioError, _format_validation

HOST = "127.0.0.1"
SERVE_DURATION_S = 7 * 24 * 3600.0  # the schema's maximum duration_s

DEFAULT_PORTS: dict[str, int] = {"metrics": 9464, "admin": 9465, "dns": 9466, "node": 9467}

ENDPOINTS: dict[str, str] = {
    "GET /": "this list",
    "GET /state": "sim time, zones in DNS, targets by state, requests so far",
    "POST /events": "apply one timeline event now (JSON as in a scenario's timeline; `at` is ignored)",
}


def serving_scenario(scenario: Scenario) -> Scenario:
    """The scenario as served: its timeline at its times, then running on to the schema's maximum duration."""
    return scenario.model_copy(update={"duration_s": max(scenario.duration_s, SERVE_DURATION_S)})


# -- ports ---------------------------------------------------------------------------------------------------


def plan_ports(
    scenario: Scenario, *, metrics: int, admin: int, dns: int, node: int, targets: int = 0, host: str = HOST
) -> list[PortClaim]:
    """Every fixed (non-zero) port a served run will listen on; `PortError` if two of them are the same.

    With a control plane each zone node has its own address 127.0.1.N and all share `node`; without one they
    share `host` and take `node`, `node`+1, ... in zone order. The DNS port counts only with a control plane.
    `host` (--bind) is where metrics, the serve admin API and those nodes listen; the rest stays on loopback.
    """
    claims = [
        PortClaim("--metrics-port", "metrics", host, metrics),
        PortClaim("--admin-port", "serve admin API", host, admin),
        PortClaim("--targets-port", "backends admin API", HOST, targets),
    ]
    if scenario.control_plane is not None:
        claims.append(PortClaim("--dns-port", "control-plane DNS", HOST, dns, "udp"))
    if node:
        if node + len(scenario.zones) - 1 > 65535:
            raise PortError(f"--node-port {node}: the zone nodes need ports {node}..{node + len(scenario.zones) - 1}, "
                            "past 65535; choose a lower --node-port")
        for i, zone in enumerate(scenario.zones):
            if scenario.control_plane is not None:
                claims.append(PortClaim("--node-port", f"zone {zone} node", f"127.0.1.{i + 1}", node))
            else:
                claims.append(PortClaim("--node-port", f"zone {zone} node", host, node + i))
    return claim_ports(claims)


# -- events --------------------------------------------------------------------------------------------------


class EventRejected(Exception):
    """An event the admin API refuses, with the HTTP status and a message for the person who sent it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class RunView:
    """What an event is checked against: the run as it is now."""

    zones: tuple[str, ...]
    targets: Mapping[str, str]  # target id -> zone, every target the load balancer lists, in id order
    live: frozenset[str]  # targets whose backend still exists
    policies: frozenset[str]
    control_plane: bool
    enactors: tuple[str, ...] = ()


def parse_event(body: str, now: float, view: RunView) -> Event:
    """The event in `body`, happening at `now`, ready for `ScenarioRun.apply`; `EventRejected` if it must not be
    applied (then nothing may be changed)."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError as e:
        raise EventRejected(400, f"body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise EventRejected(400, f"body must be a JSON object (one timeline event), got {type(data).__name__}")
    data["at"] = round(now, 3)
    try:
        ev = Event.model_validate(data)
    except ValidationError as e:
        raise EventRejected(400, _format_validation("event", e).replace(": invalid scenario", ": invalid", 1)) from None
    return check_event(ev, view)


def check_event(ev: Event, view: RunView) -> Event:
    """Check `ev` against the run; return it, narrowed to live targets if it selects by zone or count."""
    if ev.zone is not None and ev.zone not in view.zones:
        raise EventRejected(404, f"zone = {ev.zone!r} is not one of the zones {list(view.zones)}")
    if ev.control is not None:
        c = ev.control
        if not view.control_plane:
            raise EventRejected(400, "control: acts on the control plane, but this scenario has no `control_plane`")
        if c.enactor is not None and c.enactor not in view.enactors:
            raise EventRejected(404, f"control.enactor = {c.enactor!r} is not one of the enactors "
                                     f"{list(view.enactors)}")
        if c.zone is not None and c.zone not in view.zones:
            raise EventRejected(404, f"control.zone = {c.zone!r} is not one of the zones {list(view.zones)}")
        return ev
    if ev.set_policy is not None:
        if ev.set_policy.policy not in view.policies:
            raise EventRejected(404, f"set_policy.policy = {ev.set_policy.policy!r} is not among this run's "
                                     f"policies ({', '.join(sorted(view.policies)) or 'none'})")
        return ev
    if ev.register_ is not None:
        return ev
    if ev.targets is not None:
        unknown = sorted(set(ev.targets) - set(view.targets))
        if unknown:
            raise EventRejected(404, f"targets: unknown targets {unknown} (known: {sorted(view.targets)})")
        retired = sorted(set(ev.targets) - view.live)
        if retired:
            raise EventRejected(404, f"targets: {retired} are retired (deregistered and gone)")
        if ev.zone is not None:
            elsewhere = sorted(t for t in ev.targets if view.targets[t] != ev.zone)
            if elsewhere:
                raise EventRejected(400, f"targets: {elsewhere} are not in zone {ev.zone!r}")
        return ev
    # Selected by zone and count: the live targets, as scenarios.system.Registrar.select picks them, named by id.
    ids = [t for t, z in view.targets.items() if t in view.live and (ev.zone is None or z == ev.zone)]
    if ev.count is not None:
        ids = ids[: ev.count]
    return ev.model_copy(update={"targets": ids, "count": None})


def authorized(header: str | None, token: str | None) -> bool:
    """Whether an `Authorization` header carries the bearer token (always, when there is no token)."""
    if token is None:
        return True
    scheme, _, given = (header or "").partition(" ")
    # Compared whatever the scheme, so the time taken does not tell a wrong scheme from a wrong token.
    ok = hmac.compare_digest(given.strip().encode(), token.encode())
    return ok and scheme.lower() == "bearer"


def state_document(
    *,
    scenario: str,
    policy: str,
    now: float,
    speed: float | None,
    zones: Iterable[str],
    zones_in_dns: Iterable[str],
    targets: Iterable[tuple[str, str, str]],
    requests_total: int,
    requests_failed: int,
    outcomes: Mapping[str, int],
) -> dict[str, Any]:
    """`GET /state`: `targets` are (id, zone, health state) triples."""
    by_state: dict[str, list[str]] = {}
    by_zone: dict[str, Counter[str]] = {z: Counter() for z in zones}
    for tid, zone, state in sorted(targets):
        by_state.setdefault(state, []).append(tid)
        by_zone.setdefault(zone, Counter())[state] += 1
    return {
        "scenario": scenario,
        "policy": policy,
        "sim_time_s": round(now, 3),
        "speed": speed,
        "zones": list(by_zone),
        "zones_in_dns": sorted(zones_in_dns),
        "targets": by_state,
        "targets_by_zone": {z: dict(sorted(c.items())) for z, c in by_zone.items()},
        "requests": {"total": requests_total, "failed": requests_failed, "outcomes": dict(sorted(outcomes.items()))},
    }


def port_rows(ports: Mapping[str, Any], admin_port: int, host: str = HOST) -> list[tuple[str, str]]:
    """The table printed at start: (what, address) for every listener an operator or Prometheus may use; `host`
    is where metrics and the serve admin API listen (--bind)."""
    bound = url_host(host)
    rows = [
        ("metrics (scrape this: every component)", f"http://{bound}:{ports['metrics']}/metrics"),
        ("serve admin API", f"http://{bound}:{admin_port}/  (GET /state, POST /events)"),
        ("backends admin API", f"http://{HOST}:{ports['admin']}/targets  (its /metrics: backends only)"),
    ]
    if "dns" in ports:
        rows.append(("control-plane DNS (udp)", f"{HOST}:{ports['dns']}  (dig @{HOST} -p {ports['dns']} lb.lbsim)"))
    for zone, address in ports.get("nodes", {}).items():
        node_host, _, node_port = str(address).rpartition(":")
        rows.append((f"load balancer node, zone {zone}", f"{url_host(node_host)}:{node_port}"))
    return rows


# -- the shell -----------------------------------------------------------------------------------------------

def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class ServeAdmin:
    """The serve admin API over one `ScenarioRun`, on host:port (0: an ephemeral port).

    It may start before the run does: until the run is up, `/state` and `/events` answer 503.
    """

    def __init__(self, run: ScenarioRun, *, host: str = HOST, port: int = 0, token: str | None = None) -> None:
        self.run = run
        self.host = host
        self.port = port
        self.token = token
        self._lock = asyncio.Lock()
        self._runner: web.AppRunner | None = None
        self.app = web.Application(middlewares=[self._auth, self._json_errors])
        self.app.router.add_get("/", self._index)
        self.app.router.add_get("/state", self._state)
        self.app.router.add_post("/events", self._events)

    async def start(self) -> int:
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # -- middleware

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not authorized(request.headers.get("Authorization"), self.token):
            resp = _error(401, "this API needs `Authorization: Bearer TOKEN` (the --admin-token)")
            resp.headers["WWW-Authenticate"] = "Bearer"
            return resp
        return await handler(request)

    @web.middleware
    async def _json_errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except EventRejected as e:
            return _error(e.status, e.message)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return _error(e.status, e.reason)

    # -- handlers

    def _ready(self) -> bool:
        return self.run.system is not None  # assembled: listening, its load balancer's DNS view set

    def view(self) -> RunView:
        r = self.run
        system = r.system
        assert system is not None
        return RunView(
            zones=tuple(r.scenario.zones),
            targets={tid: t.zone for tid, t in sorted(system.lb.targets.items())},
            live=frozenset(i.id for i in system.fleet.snapshot()),
            policies=frozenset(p.name for p in r.policies),
            control_plane=system.control is not None,
            enactors=tuple(r.scenario.enactor_names()) if r.scenario.control_plane is not None else (),
        )

    async def _index(self, request: web.Request) -> web.Response:
        return web.json_response({"scenario": self.run.scenario.name, "policy": self.run.policy_name,
                                  "endpoints": ENDPOINTS})

    async def _state(self, request: web.Request) -> web.Response:
        if not self._ready():
            return _error(503, "the run is still starting")
        r = self.run
        assert r.system is not None
        lb = r.system.lb
        snap = lb.snapshot()
        req = r.state.requests
        assert lb.dns is not None
        return web.json_response(state_document(
            scenario=r.scenario.name, policy=r.policy_name, now=r.clock.now(), speed=r.speed, zones=r.scenario.zones,
            zones_in_dns=lb.dns.zones, targets=[(t.id, t.zone, t.state.value) for t in snap.targets],
            requests_total=req.total, requests_failed=req.failed, outcomes=r.state.client_outcomes,
        ))

    async def _events(self, request: web.Request) -> web.Response:
        if not self._ready():
            return _error(503, "the run is still starting")
        try:
            body = await request.text()
        except UnicodeDecodeError as e:
            raise EventRejected(400, f"body is not UTF-8: {e}") from None
        async with self._lock:
            r = self.run
            ev = parse_event(body, r.clock.now(), self.view())
            try:
                touched = await r.apply(ev)
            except (ScenarioError, PolicyError, ValueError) as e:
                raise EventRejected(400, str(e)) from None
            entry = r.last_applied
        spec = {k: v for k, v in entry.get("spec", {}).items() if (k, v) != ("deregister", False)}
        result: dict[str, Any] = {"applied": ev.action, "at": ev.at, "targets": touched, "spec": spec}
        # What a control action reports (hosts flushed, instances terminated ...).
        result.update({k: v for k, v in entry.items() if k not in ("t", "kind", "subject", "note", "at", "spec",
                                                                     "targets")})
        return web.json_response(result)


async def serve(
    run: ScenarioRun,
    stop: asyncio.Event,
    *,
    admin_port: int = 0,
    token: str | None = None,
    on_ready: Callable[[list[tuple[str, str]]], None] | None = None,
) -> dict[str, Any]:
    """Run `run` with the serve admin API next to it until `stop` is set (or the run ends); return its summary.

    The admin API binds first, on the run's `bind` host, so a port conflict there stops everything before it
    starts. `on_ready` gets the table of listeners once the whole system is up.
    """
    admin = ServeAdmin(run, host=run.bind, port=admin_port, token=token)
    try:
        await admin.start()
    except OSError as e:
        raise ListenError("serve-admin", e) from e
    try:
        previous = run.on_started

        def started(ports: dict[str, Any]) -> None:
            if previous is not None:
                previous(ports)
            if on_ready is not None:
                on_ready(port_rows(ports, admin.port, run.bind))

        run.on_started = started
        return await run.run(stop)
    finally:
        with contextlib.suppress(Exception):
            await admin.stop()
