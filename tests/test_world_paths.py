"""Conformance, part two: a probe's outcome for every net path state and backend mode, the same in every world.

The real worlds are the reference: the simulated world's network must make lbsim's own code (backends, net
paths, raw-socket probes) reach the verdicts the kernel's does. In the simulated world the verdict also lands
at an exact time, asserted here; in the real ones only within the probe timeout plus loop slack.
"""

from __future__ import annotations

from typing import Any

import pytest
from support import WORLDS, make_world

from backends.app import BackendFleet
from backends.netpath import NetPath
from lb.probes import Prober
from lb.targets import ProbeOutcome

HOST = "127.0.0.1"
TIMEOUT_S = 1.0  # sim seconds; speed 2 in the real worlds keeps each waiting case to half a wall second
SLOW_S = 5.0  # a latency or answer delay well past the timeout

S, F, T = ProbeOutcome.SUCCESS, ProbeOutcome.FAILURE, ProbeOutcome.TIMEOUT
R, X = ProbeOutcome.REFUSED, ProbeOutcome.RESET

# (path state and parameters, backend mode and parameters, HTTP probe's verdict, TCP probe's verdict)
CASES: dict[str, tuple[dict[str, Any], dict[str, Any], ProbeOutcome, ProbeOutcome]] = {
    "open/healthy": ({"state": "open"}, {"mode": "healthy"}, S, S),
    "open/unhealthy": ({"state": "open"}, {"mode": "unhealthy", "status": 503}, F, S),
    "open/slow": ({"state": "open"}, {"mode": "slow", "latency_s": SLOW_S}, T, S),
    "open/hang": ({"state": "open"}, {"mode": "hang"}, T, S),
    # A crashed backend's port refuses; the path accepted the client first, so it can only reset it.
    "open/crash": ({"state": "open"}, {"mode": "crash"}, X, S),
    "refuse": ({"state": "refuse"}, {"mode": "healthy"}, R, R),
    "blackhole": ({"state": "blackhole"}, {"mode": "healthy"}, T, T),
    "reset": ({"state": "reset"}, {"mode": "healthy"}, X, S),
    "latency/short": ({"state": "latency", "latency_s": 0.1}, {"mode": "healthy"}, S, S),
    "latency/long": ({"state": "latency", "latency_s": SLOW_S}, {"mode": "healthy"}, T, S),
    "flap/all-lost": ({"state": "flap", "loss": 1.0}, {"mode": "healthy"}, T, S),
    "flap/none-lost": ({"state": "flap", "loss": 0.0}, {"mode": "healthy"}, S, S),
    "bandwidth": ({"state": "bandwidth", "rate_bytes_per_s": 100_000}, {"mode": "healthy"}, S, S),
}


async def _probe_verdicts(
    world: Any, path_params: dict[str, Any], mode: dict[str, Any]
) -> list[tuple[str, ProbeOutcome, float]]:
    clock = world.clock
    fleet = BackendFleet(clock=clock)
    await fleet.start()
    path: NetPath | None = None
    try:
        backend_port = await fleet.add("t")
        path = NetPath("t", HOST, backend_port, "seed", clock=clock)
        await path.start()
        params = dict(path_params)
        await path.set_state(params.pop("state"), **params)
        params = dict(mode)
        await fleet.set_mode("t", params.pop("mode"), **params)
        verdicts = []
        for protocol in ("http", "tcp"):
            started = clock.now()
            outcome = await Prober(protocol).probe(HOST, path.port, clock.to_loop(TIMEOUT_S))
            verdicts.append((protocol, outcome, clock.now() - started))
        return verdicts
    finally:
        if path is not None:
            await path.stop()
        await fleet.stop()


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("kind", WORLDS)
def test_probe_outcome_for_every_path_state_and_backend_mode(kind: str, case: str) -> None:
    path_params, mode, want_http, want_tcp = CASES[case]
    world = make_world(kind, speed=2.0)
    verdicts = world.run(_probe_verdicts(world, path_params, mode))
    assert [(p, o) for p, o, _ in verdicts] == [("http", want_http), ("tcp", want_tcp)]
    for _, outcome, took in verdicts:
        if outcome is ProbeOutcome.TIMEOUT:
            # Exactly the timeout in virtual time. In the real worlds, uvloop's timers may fire up to a millisecond
            # (its clock tick) early, and any timer late by however long the loop was busy.
            if kind == "sim":
                assert took == pytest.approx(TIMEOUT_S, abs=1e-9)
            else:
                assert TIMEOUT_S - 0.001 * world.speed <= took < TIMEOUT_S + 0.5
        elif kind == "sim":
            # Everything else is decided within a few simulated round trips (plus 0.1 s each way on a latency path).
            assert took < (0.21 if case == "latency/short" else 0.01)
