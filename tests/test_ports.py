"""Fixed ports and listen addresses (scenarios/ports.py): the pure rules, `check_free` on real sockets, and a run
whose port is taken between the check and its bind, in-process on real loopback sockets."""

from __future__ import annotations

import errno
import json
import socket
from pathlib import Path
from typing import Any

import pytest
from support import LOOPS, open_sockets, run_on, wait_for

from scenarios.cli import start_failure
from scenarios.ports import (
    BindError,
    ListenError,
    PortClaim,
    PortError,
    bind_warning,
    check_free,
    claim_ports,
    connect_host,
    is_loopback,
    parse_bind,
    unavailable,
    url_host,
)
from scenarios.runner import ScenarioRun
from scenarios.schema import Scenario
from worlds.real import RealWorld

SMALL: dict[str, Any] = {
    "name": "ports-small",
    "zones": ["a", "b"],
    "targets_per_zone": 1,
    "health_check": {"interval_s": 2, "timeout_s": 1},
    "policy": ["aws"],
    "traffic": {"rate_per_s": 1, "timeout_s": 1},
}


def test_parse_bind_takes_ip_literals_only() -> None:
    assert parse_bind("127.0.0.2") == "127.0.0.2"
    assert parse_bind(" 0.0.0.0 ") == "0.0.0.0"
    assert parse_bind("0:0::1") == "::1"  # normal form, as it is printed
    for bad in ("localhost", "not-an-ip", "127.0.0", "example.com", ""):
        with pytest.raises(BindError, match=r"--bind .* is not an IP address.*host names are not resolved"):
            parse_bind(bad)


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.0.0.2", True), ("127.255.255.254", True), ("::1", True),
    ("::ffff:127.0.0.1", True),  # an IPv4-mapped loopback address is still this machine
    ("0.0.0.0", False), ("::", False), ("192.168.1.10", False), ("10.0.0.1", False), ("fe80::1", False),
])
def test_only_loopback_binds_go_without_a_warning(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
    warning = bind_warning(host, token=False)
    if loopback:
        assert warning is None
        return
    assert warning is not None
    assert f"--bind {host}" in warning and "reachable from the network" in warning
    assert "admin API" in warning and "metrics" in warning and "--admin-token" in warning
    with_token = bind_warning(host, token=True)
    assert with_token is not None and "reachable from the network" in with_token
    assert "/metrics has no token" in with_token


def test_connect_and_url_hosts() -> None:
    assert connect_host("0.0.0.0") == "127.0.0.1" and connect_host("::") == "::1"
    assert connect_host("127.0.0.2") == "127.0.0.2"
    assert url_host("::1") == "[::1]" and url_host("127.0.0.2") == "127.0.0.2"


def test_claim_ports_refuses_one_port_on_overlapping_addresses() -> None:
    m = PortClaim("--metrics-port", "metrics", "0.0.0.0", 9464)
    assert claim_ports([m, PortClaim("--admin-port", "admin", "127.0.0.1", 0)]) == [m]  # port 0 claims nothing
    with pytest.raises(PortError, match=r"port 9464 is wanted twice: metrics \(--metrics-port\) and targets "
                                        r"\(--targets-port\)"):
        claim_ports([m, PortClaim("--targets-port", "targets", "127.0.0.1", 9464)])
    # Different addresses, or the same port in another protocol or family, do not collide.
    claim_ports([PortClaim("-a", "a", "127.0.0.1", 9464), PortClaim("-b", "b", "127.0.0.2", 9464),
                 PortClaim("-c", "c", "127.0.0.1", 9464, "udp"), PortClaim("-d", "d", "::", 9464)])


def test_unavailable_words_an_asyncio_bind_error_without_repeating_the_address() -> None:
    e = OSError(errno.EADDRINUSE, "error while attempting to bind on address ('127.0.0.1', 9100): address already "
                                  "in use")
    msg = str(unavailable(PortClaim("--metrics-port", "/metrics", "127.0.0.1", 9100), e))
    assert msg == ("port 9100 (tcp, /metrics on 127.0.0.1) is not available: Address already in use; stop what "
                   "holds it or choose another with --metrics-port PORT (0 picks a free one)")


def test_check_free_on_another_loopback_address_and_ipv6() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.2", 0))
        held.listen(1)
        port = held.getsockname()[1]
        with pytest.raises(PortError, match=rf"port {port} \(tcp, metrics on 0.0.0.0\).*--metrics-port"):
            check_free([PortClaim("--metrics-port", "metrics", "0.0.0.0", port)])
        check_free([PortClaim("--metrics-port", "metrics", "127.0.0.3", port)])  # another address: free
    if not socket.has_ipv6:
        return
    try:
        held6 = socket.socket(socket.AF_INET6)
        held6.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with held6:
        held6.listen(1)
        port = held6.getsockname()[1]
        with pytest.raises(PortError, match=rf"port {port} \(tcp, admin on ::1\).*--admin-port"):
            check_free([PortClaim("--admin-port", "admin", "::1", port)])


@pytest.mark.parametrize("kind", LOOPS)
@pytest.mark.parametrize(("listener", "option"), [("metrics", "--metrics-port"), ("admin", "--admin-port")])
def test_a_port_taken_after_the_check_is_named_and_the_run_releases_everything(
    kind: str, listener: str, option: str, tmp_path: Path
) -> None:
    """The race check_free cannot rule out: the port is free when checked and taken when the run binds it."""
    sc = Scenario.model_validate(SMALL)
    errors: list[ListenError] = []
    claims: dict[str, PortClaim] = {}

    async def body() -> None:
        before = open_sockets()
        with socket.socket() as held:
            held.bind(("127.0.0.1", 0))
            held.listen(1)
            port = held.getsockname()[1]
            claims[listener] = PortClaim(option, listener, "127.0.0.1", port)
            run = ScenarioRun(sc, world=RealWorld(speed=20.0, seed=1),
                              metrics_port=port if listener == "metrics" else 0,
                              admin_port=port if listener == "admin" else 0)
            with pytest.raises(ListenError) as info:
                await run.run()
            errors.append(info.value)
            run.write(tmp_path / "run", run.summary())
        await wait_for(lambda: open_sockets() <= before, 2.0)

    run_on(kind, body)  # also fails on any task left behind
    (e,) = errors
    assert e.listener == listener and e.errno == errno.EADDRINUSE
    port = claims[listener].port
    assert start_failure(e, claims).startswith(f"port {port} (tcp, {listener} on 127.0.0.1) is not available: "
                                               f"Address already in use; stop what holds it or choose another "
                                               f"with {option} PORT")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["complete"] is False
