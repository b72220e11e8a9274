"""`lbsim serve`: the pure core (ports, events, auth, state), the admin API in-process, the command as a subprocess,
and a real Prometheus scraping it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from support import LOOPS, open_sockets, require_binary, run_on, wait_for

from scenarios.ports import PortError, check_free
from scenarios.runner import ScenarioRun
from scenarios.schema import Scenario
from scenarios.serve import (
    SERVE_DURATION_S,
    EventRejected,
    RunView,
    authorized,
    parse_event,
    plan_ports,
    serve,
    serving_scenario,
    state_document,
)
from worlds.real import RealWorld

REPO = Path(__file__).resolve().parent.parent

# 2 zones x 2 targets, no timeline: what the subprocess tests serve.
SMALL: dict[str, Any] = {
    "name": "serve-small",
    "zones": ["a", "b"],
    "targets_per_zone": 2,
    "health_check": {"interval_s": 2, "timeout_s": 1, "healthy_threshold": 2, "unhealthy_threshold": 2,
                     "jitter": 0.1},
    "load_balancer": {"deregistration_delay_s": 5},
    "policy": ["aws"],
    "traffic": {"rate_per_s": 5, "timeout_s": 1, "dns_ttl_s": 2},
}
SPEED = 10.0


def detection_bound_s(sc: dict[str, Any], speed: float) -> float:
    """Wall seconds within which a blackholed zone's targets must be unhealthy: a probe already under way may still
    pass, then `unhealthy_threshold` probes each up to a jittered interval apart fail by timeout, then one
    evaluation; plus a wall second for the HTTP polling and a busy machine."""
    hc = sc["health_check"]
    sim = (hc["unhealthy_threshold"] + 1) * hc["interval_s"] * (1 + hc["jitter"]) + hc["timeout_s"] + 1.0
    return sim / speed + 1.0


# -- pure core -------------------------------------------------------------------------------------------------


def small(**extra: Any) -> Scenario:
    return Scenario.model_validate({**SMALL, **extra})


def test_serving_scenario_keeps_the_timeline_and_runs_for_the_schema_maximum() -> None:
    sc = small(timeline=[{"at": 10, "zone": "a", "path": {"state": "blackhole"}}])
    served = serving_scenario(sc)
    assert served.duration_s == SERVE_DURATION_S == 7 * 24 * 3600
    assert served.timeline == sc.timeline


def test_plan_ports_without_a_control_plane_gives_each_node_its_own_port() -> None:
    claims = plan_ports(small(), metrics=9464, admin=9465, dns=9466, node=9467)
    got = {(c.option, c.host, c.port, c.proto) for c in claims}
    assert got == {("--metrics-port", "127.0.0.1", 9464, "tcp"), ("--admin-port", "127.0.0.1", 9465, "tcp"),
                   ("--node-port", "127.0.0.1", 9467, "tcp"), ("--node-port", "127.0.0.1", 9468, "tcp")}


def test_plan_ports_with_a_control_plane_shares_the_node_port_and_claims_dns() -> None:
    claims = plan_ports(small(control_plane={}), metrics=0, admin=1000, dns=1001, node=1002, targets=1003)
    got = {(c.host, c.port, c.proto) for c in claims}
    assert got == {("127.0.0.1", 1000, "tcp"), ("127.0.0.1", 1001, "udp"), ("127.0.0.1", 1003, "tcp"),
                   ("127.0.1.1", 1002, "tcp"), ("127.0.1.2", 1002, "tcp")}


def test_plan_ports_refuses_one_port_twice_naming_both_options() -> None:
    with pytest.raises(PortError, match=r"port 9467 .*--admin-port.*--node-port"):
        plan_ports(small(), metrics=9464, admin=9467, dns=9466, node=9466)
    with pytest.raises(PortError, match="65535"):
        plan_ports(small(), metrics=0, admin=0, dns=0, node=65535)


def test_check_free_names_the_port_held_and_its_option() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        claims = plan_ports(small(), metrics=port, admin=0, dns=0, node=0)
        with pytest.raises(PortError, match=rf"port {port} .*--metrics-port"):
            check_free(claims)
    check_free(claims)  # free again once released


VIEW = RunView(
    zones=("a", "b"),
    targets={"a-0": "a", "a-1": "a", "a-2": "a", "b-0": "b"},
    live=frozenset({"a-0", "a-2", "b-0"}),  # a-1 was deregistered and retired
    policies=frozenset({"fail-open", "dns-failover"}),
    control_plane=False,
)


def rejected(body: str, view: RunView = VIEW) -> EventRejected:
    with pytest.raises(EventRejected) as info:
        parse_event(body, 12.0, view)
    return info.value


def test_an_event_happens_now_whatever_its_at() -> None:
    ev = parse_event('{"at": 500, "targets": ["a-0"], "backend": {"mode": "crash"}}', 12.3456, VIEW)
    assert ev.at == 12.346 and ev.targets == ["a-0"] and ev.backend is not None
    assert parse_event('{"targets": ["b-0"], "deregister": true}', 3.0, VIEW).at == 3.0


def test_a_zone_or_count_selection_is_narrowed_to_live_targets() -> None:
    ev = parse_event('{"zone": "a", "path": {"state": "blackhole"}}', 1.0, VIEW)
    assert ev.targets == ["a-0", "a-2"] and ev.count is None
    assert parse_event('{"count": 2, "path": {"state": "open"}}', 1.0, VIEW).targets == ["a-0", "a-2"]


def test_malformed_bodies_are_400_with_the_reason() -> None:
    e = rejected('{"zone": "a",')
    assert e.status == 400 and "not valid JSON" in e.message
    e = rejected('[{"zone": "a"}]')
    assert e.status == 400 and "JSON object" in e.message


def test_schema_errors_name_the_field_and_what_is_allowed() -> None:
    e = rejected('{"zone": "a", "pth": {"state": "blackhole"}}')
    assert e.status == 400 and "pth: unknown field" in e.message
    e = rejected('{"zone": "a", "path": {"state": "blackhol"}}')
    assert e.status == 400 and "path.state: must be one of" in e.message and "'blackhole'" in e.message
    e = rejected('{"zone": "a"}')
    assert e.status == 400 and "exactly one action" in e.message


def test_unknown_zone_target_or_policy_is_404() -> None:
    assert rejected('{"zone": "z", "path": {"state": "open"}}').status == 404
    e = rejected('{"targets": ["a-0", "a-9"], "path": {"state": "open"}}')
    assert e.status == 404 and "a-9" in e.message and "a-0'" not in e.message.split("(known")[0]
    e = rejected('{"targets": ["a-1"], "path": {"state": "open"}}')
    assert e.status == 404 and "retired" in e.message
    e = rejected('{"set_policy": {"policy": "velocity", "param": "enabled", "value": false}}')
    assert e.status == 404 and "dns-failover, fail-open" in e.message
    assert rejected('{"zone": "b", "targets": ["a-0"], "path": {"state": "open"}}').status == 400


def test_control_events_need_a_control_plane_and_known_names() -> None:
    body = '{"control": {"component": "dns", "action": "delay-enactor", "enactor": "%s", "delay_s": 5}}'
    assert "no `control_plane`" in rejected(body % "a").message
    cp = RunView(zones=("a", "b"), targets={}, live=frozenset(), policies=frozenset(), control_plane=True,
                 enactors=("a", "b"))
    assert parse_event(body % "b", 1.0, cp).control is not None
    assert rejected(body % "q", cp).status == 404
    e = rejected('{"control": {"component": "dns", "action": "explode"}}', cp)
    assert e.status == 400 and "must be one of" in e.message


def test_register_and_set_policy_pass_through() -> None:
    ev = parse_event('{"zone": "b", "register": {"count": 2}}', 1.0, VIEW)
    assert ev.register_ is not None and ev.register_.count == 2 and ev.targets is None
    ev = parse_event('{"set_policy": {"policy": "dns-failover", "param": "enabled", "value": false}}', 1.0, VIEW)
    assert ev.set_policy is not None and ev.set_policy.value is False


def test_authorized_needs_the_bearer_token_when_there_is_one() -> None:
    assert authorized(None, None) and authorized("Bearer x", None)
    assert authorized("Bearer s3cret", "s3cret") and authorized("bearer s3cret", "s3cret")
    assert not authorized(None, "s3cret")
    assert not authorized("Bearer s3cre", "s3cret")
    assert not authorized("Basic s3cret", "s3cret")


def test_state_document_groups_targets_by_state_and_zone() -> None:
    doc = state_document(scenario="s", policy="aws", now=12.34567, speed=10.0, zones=["a", "b"], zones_in_dns=["b"],
                         targets=[("a-1", "a", "unhealthy"), ("a-0", "a", "unhealthy"), ("b-0", "b", "healthy")],
                         requests_total=10, requests_failed=3, outcomes={"ok": 7, "reset": 3})
    assert doc["sim_time_s"] == 12.346 and doc["zones_in_dns"] == ["b"]
    assert doc["targets"] == {"unhealthy": ["a-0", "a-1"], "healthy": ["b-0"]}
    assert doc["targets_by_zone"] == {"a": {"unhealthy": 2}, "b": {"healthy": 1}}
    assert doc["requests"] == {"total": 10, "failed": 3, "outcomes": {"ok": 7, "reset": 3}}


# -- the admin API in-process, on real loopback sockets ----------------------------------------------------------


@pytest.mark.parametrize("kind", LOOPS)
def test_admin_api_applies_events_and_refuses_bad_ones_without_change(kind: str) -> None:
    sc = serving_scenario(small(traffic={"rate_per_s": 1, "timeout_s": 1}))

    async def body() -> None:
        before = open_sockets()
        run = ScenarioRun(sc, world=RealWorld(speed=100.0, seed=3), record=False)
        stop = asyncio.Event()
        ready: asyncio.Future[list[tuple[str, str]]] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(serve(run, stop, token="t0k", on_ready=ready.set_result))
        rows = await asyncio.wait_for(ready, 5)
        base = next(addr for what, addr in rows if what == "serve admin API").split()[0].rstrip("/")
        auth = {"Authorization": "Bearer t0k"}
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/state") as r:
                assert r.status == 401 and "Bearer" in (await r.json())["error"]
            async with http.get(f"{base}/", headers=auth) as r:
                assert r.status == 200 and "POST /events" in (await r.json())["endpoints"]
            events_before = len(run.state.events)
            for bad, status in (("{nope", 400), ('{"zone": "a", "colour": 1, "path": {"state": "open"}}', 400),
                                ('{"targets": ["a-7"], "path": {"state": "blackhole"}}', 404)):
                async with http.post(f"{base}/events", data=bad, headers=auth) as r:
                    assert r.status == status and "error" in await r.json()
            assert len(run.state.events) == events_before
            assert run.system is not None
            assert all(i.path.state.value == "open" for i in run.system.fleet.snapshot())
            async with http.post(f"{base}/events", json={"zone": "a", "path": {"state": "blackhole"}},
                                 headers=auth) as r:
                assert r.status == 200
                done = await r.json()
            assert done["applied"] == "path" and done["targets"] == ["a-0", "a-1"]
            states: dict[str, Any] = {}

            async def unhealthy() -> bool:
                async with http.get(f"{base}/state", headers=auth) as r:
                    states.update(await r.json())
                return states["targets_by_zone"]["a"].get("unhealthy") == 2

            deadline = time.monotonic() + detection_bound_s(SMALL, 100.0)
            while not await unhealthy():
                assert time.monotonic() < deadline, states
                await asyncio.sleep(0.02)
            assert states["targets_by_zone"]["b"] == {"healthy": 2}
        stop.set()
        summary = await asyncio.wait_for(task, 5)
        assert summary["complete"] is False
        await wait_for(lambda: open_sockets() <= before, 2.0)

    run_on(kind, body)


# -- the command, as a subprocess ------------------------------------------------------------------------------


def _low_ephemeral() -> int:
    with contextlib.suppress(OSError, ValueError):
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    return 32768


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int, taken: set[int] | None = None) -> list[int]:
    """`count` consecutive free ports below the ephemeral range (so no ephemeral socket of the run can take
    one between this check and its bind)."""
    taken = taken if taken is not None else set()
    rng = random.Random()
    for _ in range(200):
        start = rng.randrange(20000, _low_ephemeral() - count)
        ports = list(range(start, start + count))
        if not taken & set(ports) and all(_bindable(p) for p in ports):
            taken.update(ports)
            return ports
    raise AssertionError("no free ports found")


def lbsim(*args: str) -> list[str]:
    return [sys.executable, "-m", "scenarios.cli", *args]


class Served:
    """`lbsim serve` running as a subprocess on free fixed ports."""

    def __init__(self, tmp: Path, scenario: dict[str, Any], *extra: str) -> None:
        taken: set[int] = set()
        (self.metrics, self.admin, self.targets), self.nodes = free_ports(3, taken), free_ports(2, taken)
        self.path = tmp / "scenario.yaml"
        self.path.write_text(yaml.safe_dump(scenario))
        self.proc = subprocess.Popen(
            lbsim("serve", str(self.path), "--speed", str(SPEED), "--metrics-port", str(self.metrics),
                  "--admin-port", str(self.admin), "--targets-port", str(self.targets), "--node-port",
                  str(self.nodes[0]), "--loop", "asyncio", *extra),
            cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"},
        )
        self.headers: dict[str, str] = {}
        self.host = "127.0.0.1"  # where metrics and the admin API listen (--bind)

    def all_ports(self) -> list[int]:
        return [self.metrics, self.admin, self.targets, *self.nodes]

    def request(self, path: str, body: str | None = None, port: int | None = None,
                headers: dict[str, str] | None = None, host: str | None = None) -> tuple[int, Any]:
        url = f"http://{host or self.host}:{port or self.admin}{path}"
        req = urllib.request.Request(url, data=None if body is None else body.encode(),
                                     headers=headers if headers is not None else self.headers)
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                raw = r.read().decode()
                return r.status, json.loads(raw) if r.headers.get_content_type() == "application/json" else raw
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read().decode())

    def wait_ready(self, within: float = 20.0) -> None:
        deadline = time.monotonic() + within
        while True:
            assert self.proc.poll() is None, self.proc.communicate()
            with contextlib.suppress(OSError):
                status, _ = self.request("/state")
                if status == 200:
                    return
            assert time.monotonic() < deadline, "lbsim serve did not come up"
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGINT, within: float = 15.0) -> tuple[int, str, str]:
        self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=within)
        return self.proc.returncode, out, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    started: list[Served] = []

    def start(*extra: str) -> Served:
        s = Served(tmp_path, SMALL, *extra)
        started.append(s)
        return s

    yield start
    for s in started:
        s.kill()


def poll(check: Callable[[], bool], within: float, what: str) -> float:
    """Poll `check` until it holds; return the wall seconds it took."""
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < within, f"{what}: not within {within:.2f} s"
        time.sleep(0.02)
    return time.monotonic() - t0


def metric(text: str, name_and_labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name_and_labels + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_serve_subprocess_admin_api_state_metrics_token_and_sigint(served: Callable[..., Served]) -> None:
    s = served("--admin-token", "s3cret")
    s.headers = {"Authorization": "Bearer s3cret"}
    s.wait_ready()
    # The token is enforced on every endpoint.
    for path in ("/", "/state"):
        assert s.request(path, headers={})[0] == 401
        assert s.request(path, headers={"Authorization": "Bearer wrong"})[0] == 401
    status, index = s.request("/")
    assert status == 200 and "POST /events" in index["endpoints"]

    # Refused events change nothing: not the health states, not a single network path.
    _, state0 = s.request("/state")
    assert state0["targets_by_zone"] == {"a": {"healthy": 2}, "b": {"healthy": 2}}
    for bad, code, words in (
        ('{"zone": "a", "path": {"state": "blackhole"', 400, "not valid JSON"),
        ('{"zone": "a", "pathh": {"state": "blackhole"}}', 400, "pathh: unknown field"),
        ('{"targets": ["a-5"], "path": {"state": "blackhole"}}', 404, "unknown targets ['a-5']"),
    ):
        status, doc = s.request("/events", bad)
        assert status == code and words in doc["error"], doc
    _, paths = s.request("/targets", port=s.targets, headers={})
    assert {t["path"]["state"] for t in paths} == {"open"}
    _, state1 = s.request("/state")
    assert state1["targets"] == state0["targets"] and state1["sim_time_s"] > state0["sim_time_s"]

    # A blackhole on zone a: its targets go unhealthy within the detection bound, in /state and in /metrics.
    status, done = s.request("/events", '{"zone": "a", "path": {"state": "blackhole"}}')
    assert status == 200 and done["targets"] == ["a-0", "a-1"] and done["applied"] == "path"
    bound = detection_bound_s(SMALL, SPEED)
    poll(lambda: s.request("/state")[1]["targets_by_zone"]["a"].get("unhealthy") == 2, bound, "unhealthy in /state")

    def metrics_show_it() -> bool:
        text = s.request("/metrics", port=s.metrics, headers={})[1]
        return metric(text, 'lbsim_targets{state="unhealthy",zone="a"}') == 2.0

    poll(metrics_show_it, 2.0, "unhealthy in /metrics")
    _, state2 = s.request("/state")
    assert state2["targets_by_zone"]["b"] == {"healthy": 2}

    # SIGINT is the normal way to stop: exit 0, the ports table was printed, every port is free again.
    rc, out, err = s.stop()
    assert rc == 0, err
    assert "stopped at sim time" in err
    for port in s.all_ports():
        assert f"127.0.0.1:{port}" in out, out
    assert s.proc.poll() is not None
    for port in s.all_ports():
        assert _bindable(port), port


def test_serve_refuses_a_port_in_use_and_starts_nothing(tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(SMALL))
    admin, node = free_ports(1), free_ports(2)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        t0 = time.monotonic()
        p = subprocess.run(lbsim("serve", str(tmp_path / "s.yaml"), "--metrics-port", str(port), "--admin-port",
                                 str(admin[0]), "--node-port", str(node[0])),
                           capture_output=True, text=True, timeout=30, env={**os.environ, "COLUMNS": "200"})
    assert p.returncode == 2, p.stderr
    assert f"port {port}" in p.stderr and "--metrics-port" in p.stderr
    assert "lbsim serve:" not in p.stdout  # nothing started, so no ports table
    assert time.monotonic() - t0 < 20
    assert all(_bindable(x) for x in admin + node)


def test_serve_bind_moves_metrics_admin_and_nodes_to_that_address(served: Callable[..., Served]) -> None:
    s = served("--bind", "127.0.0.2")  # still loopback: no warning, and no listener reachable from the network
    s.host = "127.0.0.2"
    s.wait_ready()
    status, text = s.request("/metrics", port=s.metrics, headers={})
    assert status == 200 and "lbsim_targets" in text
    for port in (s.metrics, s.admin, s.nodes[0]):
        with socket.socket() as c:  # nothing of ours on 127.0.0.1 for them any more
            assert c.connect_ex(("127.0.0.1", port)) != 0, port
    # The backends' admin API stays on loopback 127.0.0.1 (it has no token).
    assert s.request("/targets", port=s.targets, headers={}, host="127.0.0.1")[0] == 200
    # The client traffic reaches the zone nodes on the bind address.
    poll(lambda: s.request("/state")[1]["requests"]["outcomes"].get("ok", 0) > 0, 10.0, "requests answered")
    rc, out, err = s.stop()
    assert rc == 0, err
    assert "warning" not in err
    assert f"http://127.0.0.2:{s.metrics}/metrics" in out and f"http://127.0.0.2:{s.admin}/" in out, out
    assert f"127.0.0.2:{s.nodes[0]}" in out and f"http://127.0.0.1:{s.targets}/targets" in out, out


def test_serve_bind_outside_loopback_warns_and_a_name_is_refused(tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(SMALL))
    env = {**os.environ, "COLUMNS": "200"}
    # A held metrics port stops serve before it listens on anything: no listener on the network in a test.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        p = subprocess.run(lbsim("serve", str(tmp_path / "s.yaml"), "--bind", "0.0.0.0", "--metrics-port", str(port)),
                           capture_output=True, text=True, timeout=30, env=env)
    assert p.returncode == 2, p.stderr
    assert "warning: --bind 0.0.0.0 is not a loopback address" in p.stderr
    assert "reachable from the network" in p.stderr and "--admin-token" in p.stderr
    assert f"port {port} (tcp, metrics on 0.0.0.0)" in p.stderr and "--metrics-port" in p.stderr
    assert "lbsim serve:" not in p.stdout
    for bad in ("not-an-ip", "localhost"):
        p = subprocess.run(lbsim("serve", str(tmp_path / "s.yaml"), "--bind", bad),
                           capture_output=True, text=True, timeout=30, env=env)
        assert p.returncode == 2, p.stderr
        assert f"error: --bind '{bad}' is not an IP address" in p.stderr and "Traceback" not in p.stderr
        assert "lbsim serve:" not in p.stdout


# -- a real Prometheus scraping it -----------------------------------------------------------------------------


def prom_query(port: int, expr: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            doc = json.loads(r.read().decode())
    except (OSError, ValueError):
        return []
    return list(doc["data"]["result"]) if doc.get("status") == "success" else []


def prom_value(port: int, expr: str) -> float | None:
    result = prom_query(port, expr)
    return float(result[0]["value"][1]) if len(result) == 1 else None


def test_prometheus_scrapes_serve_and_sees_an_injected_fault(served: Callable[..., Served], tmp_path: Path) -> None:
    binary = require_binary("prometheus", package="prometheus")
    s = served()
    shipped = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    job = shipped["scrape_configs"][0]
    assert job["job_name"] == "lbsim" and job["static_configs"][0]["targets"] == ["127.0.0.1:9464"]
    job.update({"scrape_interval": "1s", "scrape_timeout": "900ms",
                "static_configs": [{"targets": [f"127.0.0.1:{s.metrics}"]}]})
    shipped["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(shipped))
    (prom_port,) = free_ports(1, set(s.all_ports()))
    prom = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        s.wait_ready()
        names = ("lbsim_zones_in_dns", "lbsim_targets", "lbsim_client_requests_total", "lbsim_probes_total")
        poll(lambda: all(prom_query(prom_port, f'{{__name__="{n}",job="lbsim"}}') for n in names), 30.0,
             "lbsim series in Prometheus")
        assert prom_value(prom_port, "lbsim_zones_in_dns") == 2.0
        assert prom_value(prom_port, 'lbsim_targets{zone="a",state="unhealthy"}') == 0.0
        status, _ = s.request("/events", '{"zone": "a", "path": {"state": "blackhole", "cut_existing": true}}')
        assert status == 200
        # Seen by Prometheus: one scrape interval (1 s) after lbsim shows it, plus a second of slack.
        within = detection_bound_s(SMALL, SPEED) + 2.0
        poll(lambda: prom_value(prom_port, 'lbsim_targets{zone="a",state="unhealthy"}') == 2.0, within,
             "zone a unhealthy in Prometheus")
        # The aws policy's automatic AZ DNS failover takes the dead zone's node out of DNS.
        poll(lambda: prom_value(prom_port, "lbsim_zones_in_dns") == 1.0, within, "zone a out of DNS in Prometheus")
        assert prom_value(prom_port, 'lbsim_zone_in_dns{zone="a"}') == 0.0
        down = prom_value(prom_port, 'sum(lbsim_health_transitions_total{from_state="healthy",to_state="unhealthy"})')
        assert down is not None and down >= 2.0
    finally:
        prom.send_signal(signal.SIGTERM)
        try:
            _, prom_err = prom.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.communicate()
            raise
    assert prom.returncode == 0, prom_err[-2000:]
    rc, _, err = s.stop()
    assert rc == 0, err
    assert _bindable(prom_port) and all(_bindable(p) for p in s.all_ports())
