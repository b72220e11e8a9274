"""Instance lifecycle and autoscaler: the pure parts step by step, then real launches behind real net paths."""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import pytest
from prometheus_client import CollectorRegistry
from support import LOOPS, open_sockets, run_on, wait_for

from backends.controlplane.instances import (
    Autoscaler,
    Instance,
    InstanceConfig,
    InstanceFleet,
    InstanceState,
    InvalidTransition,
    LaunchOutcome,
    LaunchThrottle,
    UnknownInstance,
)
from backends.controlplane.netmanager import NetworkManager, NetworkManagerConfig
from backends.fleet import Targets, UnknownTarget
from backends.netpath import PathState
from worlds.clock import ScaledClock

pytestmark = [pytest.mark.timeout(30), pytest.mark.filterwarnings("error::ResourceWarning")]

SPEED = 100.0
HOST = "127.0.0.1"
S = InstanceState

# -- the pure lifecycle ----------------------------------------------------------------------------------------


def test_lifecycle_goes_through_every_state_in_order_with_times() -> None:
    inst = Instance.new("a-i1", "a", 1.0)
    assert inst.state is S.PENDING and inst.live
    for t, state in ((2.0, S.LAUNCHING), (4.0, S.NETWORK_PENDING), (9.5, S.RUNNING), (20.0, S.TERMINATED)):
        inst.advance(state, t)
        assert inst.state is state
    assert inst.times == {S.PENDING: 1.0, S.LAUNCHING: 2.0, S.NETWORK_PENDING: 4.0, S.RUNNING: 9.5, S.TERMINATED: 20.0}
    assert inst.launch_to_running() == 8.5
    assert not inst.live


@pytest.mark.parametrize(
    ("path", "bad"),
    [
        ([], S.RUNNING),
        ([], S.NETWORK_PENDING),
        ([], S.PENDING),
        ([S.LAUNCHING], S.RUNNING),
        ([S.LAUNCHING], S.PENDING),
        ([S.LAUNCHING, S.NETWORK_PENDING], S.LAUNCHING),
        ([S.LAUNCHING, S.NETWORK_PENDING, S.RUNNING], S.RUNNING),
        ([S.TERMINATED], S.TERMINATED),
        ([S.TERMINATED], S.LAUNCHING),
        ([S.LAUNCHING, S.NETWORK_PENDING, S.RUNNING, S.TERMINATED], S.RUNNING),
    ],
)
def test_invalid_transitions_raise_and_change_nothing(path: list[InstanceState], bad: InstanceState) -> None:
    inst = Instance.new("a-i1", "a", 0.0)
    for k, state in enumerate(path, 1):
        inst.advance(state, float(k))
    before = (inst.state, dict(inst.times))
    with pytest.raises(InvalidTransition):
        inst.advance(bad, 99.0)
    assert (inst.state, inst.times) == before


@pytest.mark.parametrize("steps", range(4))
def test_terminate_is_allowed_from_every_live_state(steps: int) -> None:
    inst = Instance.new("a-i1", "a", 0.0)
    for k, state in enumerate([S.LAUNCHING, S.NETWORK_PENDING, S.RUNNING][:steps], 1):
        inst.advance(state, float(k))
    inst.terminate(10.0)
    assert inst.state is S.TERMINATED and inst.times[S.TERMINATED] == 10.0
    with pytest.raises(InvalidTransition):
        inst.terminate(11.0)


def test_autoscaler_plans_the_gap_capped_and_shared_round_robin() -> None:
    a = Autoscaler({"a": 4, "b": 1, "c": 2}, max_launch_per_tick=5)
    assert a.plan({}) == {"a": 2, "b": 1, "c": 2}
    assert a.plan({"a": 3, "b": 1, "c": 2}) == {"a": 1}
    assert a.plan({"a": 9, "b": 5, "c": 2}) == {}  # never scales in
    assert a.plan({"a": 0, "b": 1, "c": 1, "zz": 0}) == {"a": 4, "c": 1}  # undesired zones are ignored
    a.set_desired("a", 0)
    a.set_desired("d", 3)
    assert a.plan({}) == {"b": 1, "c": 2, "d": 2}
    assert a.desired == {"a": 0, "b": 1, "c": 2, "d": 3}
    assert Autoscaler({"a": 10}, max_launch_per_tick=0).plan({}) == {}
    with pytest.raises(ValueError):
        a.set_desired("a", -1)
    with pytest.raises(ValueError):
        Autoscaler({}, max_launch_per_tick=-1)


def test_launch_throttle_is_a_token_bucket() -> None:
    t = LaunchThrottle(0.5, now=0.0)  # burst: one request
    assert t.try_acquire(0.0)
    assert not t.try_acquire(1.0)
    assert t.try_acquire(2.0)
    assert t.try_acquire(100.0) and not t.try_acquire(100.0)  # a long idle still buys one request only
    t.set_rate(None)
    assert all(t.try_acquire(200.0) for _ in range(100))
    t.set_rate(2.0, burst=3, now=300.0)
    assert [t.try_acquire(300.0) for _ in range(4)] == [True, True, True, False]
    assert t.try_acquire(300.5)
    with pytest.raises(ValueError):
        t.set_rate(-1.0)
    with pytest.raises(ValueError):
        InstanceConfig(launch_burst=0.5, launch_rate_per_s=1.0)


# -- the shell on real sockets ---------------------------------------------------------------------------------


class SwitchPlacement:
    """A host manager stand-in whose capacity the test switches."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.placed: dict[str, str] = {}
        self.calls = 0
        self._hosts = itertools.count(1)

    def place(self, instance_id: str) -> str | None:
        self.calls += 1
        if len(self.placed) >= self.capacity:
            return None
        host = f"h{next(self._hosts)}"
        self.placed[instance_id] = host
        return host

    def release(self, instance_id: str) -> None:
        del self.placed[instance_id]


class Rig:
    def __init__(
        self, capacity: int = 100, net: NetworkManagerConfig | None = None, cfg: InstanceConfig | None = None
    ) -> None:
        self.clock = ScaledClock(SPEED)
        self.registry = CollectorRegistry()
        self.targets = Targets(clock=ScaledClock(SPEED), registry=self.registry)
        self.placement = SwitchPlacement(capacity)
        self.net = NetworkManager(self.clock, net or NetworkManagerConfig(rate_per_s=20.0), self.registry)
        self.launched: list[tuple[str, str, str, int]] = []
        self.terminated: list[str] = []
        self.fleet = InstanceFleet(
            self.clock,
            self.targets,
            self.placement,
            self.net,
            self.registry,
            cfg or InstanceConfig(launch_time_s=1.0),
            on_launched=lambda *a: self.launched.append(a),
            on_terminated=self.terminated.append,
        )

    async def __aenter__(self) -> Rig:
        await self.net.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.fleet.close()
        await self.net.close()
        await self.targets.close()

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        return self.registry.get_sample_value(name, labels or {})

    def state(self, iid: str) -> InstanceState:
        return self.fleet.instance(iid).state


async def health(port: int, timeout_loop: float = 0.3) -> int:
    """GET /health through a target's path; TimeoutError if the path does not deliver in time."""
    async with asyncio.timeout(timeout_loop):
        reader, writer = await asyncio.open_connection(HOST, port)
    try:
        async with asyncio.timeout(timeout_loop):
            writer.write(b"GET /health HTTP/1.0\r\nHost: lbsim\r\n\r\n")
            status = await reader.readline()
            await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return int(status.split()[1])


@pytest.mark.parametrize("loop_kind", list(LOOPS))
def test_a_new_instance_is_unreachable_until_its_network_propagates_and_terminate_frees_its_sockets(
    loop_kind: str,
) -> None:
    async def body() -> None:
        before = open_sockets()
        async with Rig(net=NetworkManagerConfig(rate_per_s=0.0)) as rig:  # stalled: nothing propagates
            fleet = rig.fleet
            first = await fleet.launch("a")
            assert first.outcome is LaunchOutcome.LAUNCHED and first.instance_id == "a-i1"
            rig.net.set_rate(20.0)
            await wait_for(lambda: rig.state("a-i1") is S.RUNNING)
            rig.net.set_rate(0.0)
            baseline = open_sockets()

            result = await fleet.launch("a")
            iid = result.instance_id
            assert result.outcome is LaunchOutcome.LAUNCHED and iid == "a-i2"
            # Registered with the load balancer while its network is still pending, as NLB did.
            (_, zone, host, port) = rig.launched[-1]
            assert (rig.launched[-1][0], zone, host) == (iid, "a", HOST)
            assert rig.state(iid) is S.NETWORK_PENDING
            assert rig.fleet.instance(iid).host == "h2"
            assert rig.targets.info(iid).path.state is PathState.BLACKHOLE
            assert not fleet.could_serve(iid)
            with pytest.raises(TimeoutError):
                await health(port)
            assert fleet.counts() == {"pending": 0, "launching": 0, "network-pending": 1, "running": 1,
                                      "terminated": 0}

            rig.net.set_rate(20.0)
            await wait_for(lambda: rig.state(iid) is S.RUNNING)
            assert await health(port) == 200
            assert fleet.could_serve(iid)
            assert rig.metric("lbsim_instances", {"state": "running"}) == 2
            assert rig.metric("lbsim_instance_launches_total", {"outcome": "launched"}) == 2
            assert rig.metric("lbsim_instance_launch_to_running_seconds_count") == 2

            await fleet.terminate(iid)
            assert rig.state(iid) is S.TERMINATED and rig.terminated == [iid]
            assert iid not in rig.placement.placed and rig.fleet.instance(iid).host == "h2"  # kept for the record
            assert not fleet.could_serve(iid)
            with pytest.raises(UnknownTarget):
                rig.targets.info(iid)
            await wait_for(lambda: open_sockets() == baseline)
            with pytest.raises((OSError, TimeoutError)):
                await health(port)
            # Its terminate item propagates too.
            await wait_for(lambda: rig.metric("lbsim_netmanager_processed_total", {"kind": "terminate"}) == 1)
            with pytest.raises(InvalidTransition):
                await fleet.terminate(iid)
            with pytest.raises(UnknownInstance):
                await fleet.terminate("nope")
        assert open_sockets() == before

    run_on(loop_kind, body)


def test_k_launches_at_rate_r_run_no_sooner_than_k_over_r() -> None:
    k, r, tick_s, launch_time_s = 6, 2.0, 0.25, 1.0

    async def body() -> None:
        net = NetworkManagerConfig(rate_per_s=r, tick_s=tick_s)
        async with Rig(net=net, cfg=InstanceConfig(launch_time_s=launch_time_s)) as rig:
            requested = rig.clock.now()
            results = await asyncio.gather(*(rig.fleet.launch("b") for _ in range(k)))
            assert all(res.outcome is LaunchOutcome.LAUNCHED for res in results)
            ids = [res.instance_id for res in results]
            await wait_for(lambda: all(rig.state(i) is S.RUNNING for i in ids if i), within=5.0)
            insts = [rig.fleet.instance(i) for i in ids if i]
            submitted = min(i.times[S.NETWORK_PENDING] for i in insts)
            assert submitted - requested >= launch_time_s - 1e-6
            last = max(i.times[S.RUNNING] for i in insts)
            # The k-th item needs k/r of busy time after the first submission; then it waits for a tick.
            assert k / r - 1e-6 <= last - submitted <= k / r + tick_s + 0.5 * k / r
            # FIFO: instances run in the order their items were submitted.
            by_submission = sorted(insts, key=lambda i: i.times[S.NETWORK_PENDING])
            runs = [i.times[S.RUNNING] for i in by_submission]
            assert runs == sorted(runs)
            assert rig.metric("lbsim_netmanager_processed_total", {"kind": "launch"}) == k
            assert rig.metric("lbsim_instance_launch_to_running_seconds_count") == k
            assert (rig.metric("lbsim_instance_launch_to_running_seconds_sum") or 0.0) >= k * launch_time_s

    run_on("asyncio", body)


def test_insufficient_capacity_creates_nothing_and_terminate_frees_the_host() -> None:
    async def body() -> None:
        async with Rig(capacity=0) as rig:
            res = await rig.fleet.launch("a")
            assert res.outcome is LaunchOutcome.INSUFFICIENT_CAPACITY and res.instance_id is None
            assert rig.fleet.instances() == [] and rig.targets.snapshot() == [] and rig.launched == []
            rig.placement.capacity = 1
            ok = await rig.fleet.launch("a")
            assert ok.outcome is LaunchOutcome.LAUNCHED and ok.instance_id is not None
            assert (await rig.fleet.launch("a")).outcome is LaunchOutcome.INSUFFICIENT_CAPACITY
            await rig.fleet.terminate(ok.instance_id)
            assert rig.placement.placed == {}
            assert (await rig.fleet.launch("a")).outcome is LaunchOutcome.LAUNCHED
            assert rig.metric("lbsim_instance_launches_total", {"outcome": "insufficient_capacity"}) == 2
            assert rig.metric("lbsim_instance_launches_total", {"outcome": "launched"}) == 2
            assert len(rig.targets.snapshot()) == 1

    run_on("asyncio", body)


def test_request_limit_exceeded_creates_nothing_until_the_throttle_refills() -> None:
    async def body() -> None:
        cfg = InstanceConfig(launch_time_s=0.5, launch_rate_per_s=0.25)  # one launch per 4 s, burst 1
        async with Rig(cfg=cfg) as rig:
            first, second = await asyncio.gather(rig.fleet.launch("a"), rig.fleet.launch("a"))
            assert first.outcome is LaunchOutcome.LAUNCHED
            assert second.outcome is LaunchOutcome.REQUEST_LIMIT_EXCEEDED and second.instance_id is None
            assert rig.placement.calls == 1 and len(rig.targets.snapshot()) == 1
            await rig.clock.sleep(4.0)
            assert (await rig.fleet.launch("a")).outcome is LaunchOutcome.LAUNCHED
            assert rig.metric("lbsim_instance_launches_total", {"outcome": "request_limit_exceeded"}) == 1
            rig.fleet.set_launch_rate(None)  # operators relax the throttle
            results = await asyncio.gather(*(rig.fleet.launch("a") for _ in range(3)))
            assert all(res.outcome is LaunchOutcome.LAUNCHED for res in results)

    run_on("asyncio", body)


def test_network_admission_rejection_cleans_the_launch_up() -> None:
    async def body() -> None:
        async with Rig(net=NetworkManagerConfig(rate_per_s=0.0, max_depth=1)) as rig:
            a, b = await asyncio.gather(rig.fleet.launch("a"), rig.fleet.launch("a"))
            assert {a.outcome, b.outcome} == {LaunchOutcome.LAUNCHED, LaunchOutcome.NETWORK_ADMISSION_REJECTED}
            rejected = b if b.outcome is LaunchOutcome.NETWORK_ADMISSION_REJECTED else a
            assert rejected.instance_id is not None
            assert rig.state(rejected.instance_id) is S.TERMINATED
            assert rejected.instance_id not in rig.placement.placed
            assert rejected.instance_id not in {t.id for t in rig.targets.snapshot()}
            assert len(rig.targets.snapshot()) == 1 and len(rig.launched) == 1
            assert rig.terminated == []  # never registered, so nothing to deregister
            assert rig.net.depth == 1  # no terminate item for a network never configured
            assert rig.metric("lbsim_instance_launches_total", {"outcome": "network_admission_rejected"}) == 1

    run_on("asyncio", body)


def test_terminated_records_are_capped_and_still_counted() -> None:
    async def body() -> None:
        clock, registry = ScaledClock(SPEED), CollectorRegistry()
        targets = Targets(clock=ScaledClock(SPEED), registry=registry)
        net = NetworkManager(clock, NetworkManagerConfig(), registry)
        fleet = InstanceFleet(clock, targets, SwitchPlacement(100), net, registry, InstanceConfig(max_terminated=2))
        try:
            ids = []
            for _ in range(5):
                # The synchronous start of a launch (placed, launching, no backend yet), then its termination.
                inst = fleet._begin("a")
                assert isinstance(inst, Instance)
                await fleet.terminate(inst.id)
                ids.append(inst.id)
            assert [i.id for i in fleet.instances()] == ids[-2:]  # the newest records are kept
            assert fleet.counts()["terminated"] == 5 and fleet.forgotten == 3
            assert registry.get_sample_value("lbsim_instances", {"state": "terminated"}) == 5
            assert registry.get_sample_value("lbsim_instance_records_dropped_total") == 3
            with pytest.raises(UnknownInstance):
                fleet.instance(ids[0])
            live = fleet._begin("a")
            assert isinstance(live, Instance) and live.id not in ids  # ids are never reused
            assert fleet.instance(live.id) is live and fleet.forgotten == 3  # a live record is never dropped
        finally:
            await fleet.close()
            await targets.close()
        with pytest.raises(ValueError, match="max_terminated"):
            InstanceConfig(max_terminated=0)

    run_on("asyncio", body)


def test_terminate_while_launching_aborts_the_launch() -> None:
    async def body() -> None:
        async with Rig(cfg=InstanceConfig(launch_time_s=30.0)) as rig:
            task = asyncio.create_task(rig.fleet.launch("c"))
            await wait_for(lambda: len(rig.targets.snapshot()) == 1)
            assert rig.state("c-i1") is S.LAUNCHING
            assert rig.targets.info("c-i1").path.state is PathState.BLACKHOLE
            await rig.fleet.terminate("c-i1")
            res = await task
            assert res.outcome is LaunchOutcome.ABORTED
            assert rig.targets.snapshot() == [] and rig.placement.placed == {}
            assert rig.launched == [] and rig.terminated == [] and rig.net.depth == 0

    run_on("asyncio", body)


def test_autoscaler_retries_failed_launches_until_desired() -> None:
    async def body() -> None:
        cfg = InstanceConfig(launch_time_s=0.5, autoscale_interval_s=2.0, max_launch_per_tick=2)
        async with Rig(capacity=1, cfg=cfg) as rig:
            rig.fleet.set_desired("a", 3)
            rig.fleet.set_desired("b", 1)
            await rig.fleet.start()
            await wait_for(lambda: rig.fleet.outcomes[LaunchOutcome.INSUFFICIENT_CAPACITY] >= 2, within=3.0)
            assert sum(rig.fleet.live_counts().values()) == 1
            rig.placement.capacity = 10
            await wait_for(lambda: rig.fleet.counts()["running"] == 4, within=5.0)
            assert rig.fleet.live_counts() == {"a": 3, "b": 1}
            # Another tick changes nothing: the desired count is met.
            await rig.clock.sleep(2 * cfg.autoscale_interval_s)
            assert rig.fleet.outcomes[LaunchOutcome.LAUNCHED] == 4 and len(rig.targets.snapshot()) == 4
            # A terminated instance is replaced.
            await rig.fleet.terminate("a-i1" if rig.fleet.instance("a-i1").live else "b-i1")
            await wait_for(lambda: rig.fleet.counts()["running"] == 4, within=5.0)
            assert rig.fleet.outcomes[LaunchOutcome.LAUNCHED] == 5

    run_on("asyncio", body)


def test_adopted_targets_are_running_and_terminate_like_the_others() -> None:
    async def body() -> None:
        async with Rig() as rig:
            await rig.targets.add("a-0", "a")
            inst = rig.fleet.adopt("a-0", "a")
            assert inst.state is S.RUNNING and rig.fleet.live_counts() == {"a": 1}
            assert rig.net.depth == 0 and rig.fleet.could_serve("a-0")
            with pytest.raises(UnknownTarget):
                rig.fleet.adopt("a-9", "a")
            with pytest.raises(ValueError, match="exists"):
                rig.fleet.adopt("a-0", "a")
            await rig.targets.add("b-0", "b")
            assert rig.placement.place("b-0") == "h1"
            rig.fleet.adopt("b-0", "b", host="h1")
            await rig.fleet.terminate("a-0")
            assert rig.terminated == ["a-0"] and [t.id for t in rig.targets.snapshot()] == ["b-0"]
            await rig.fleet.terminate("b-0")
            assert rig.placement.placed == {} and rig.targets.snapshot() == []
            await wait_for(lambda: rig.metric("lbsim_netmanager_processed_total", {"kind": "terminate"}) == 2)

    run_on("asyncio", body)
