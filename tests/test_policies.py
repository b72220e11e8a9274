"""Unit and property tests of the built-in policies, the registry and the spec parser (pure, no I/O)."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.policies import (
    POLICY_TYPES,
    PRESETS,
    BuiltinPolicy,
    DnsFailover,
    FailOpen,
    FlapDamping,
    MaxEjection,
    MinHealthy,
    Naive,
    Panic,
    PassiveChecks,
    PolicyError,
    Velocity,
    builtin_policy,
    describe_policies,
    load_policy_class,
    make_policy,
    parse_policy_spec,
    register,
    register_policy,
    set_policy_param,
)
from lb.policies.base import NAMES, Positive
from lb.policy import (
    Decision,
    PassiveStats,
    Policy,
    PolicyEngine,
    RoutingPlan,
    Snapshot,
    Stage,
    TargetView,
    WithholdReason,
    ZoneMode,
    confirmed_down,
)
from lb.targets import TargetState

H, U, INIT, DRAIN = TargetState.HEALTHY, TargetState.UNHEALTHY, TargetState.INITIAL, TargetState.DRAINING
_LETTERS = {"H": H, "U": U, "I": INIT, "D": DRAIN}


class Driver:
    """Feeds an engine successive fleets written as {"a": "HHU", ...} (target ids a0, a1, a2, ...),
    keeping each target's `since` the way the health board does: the time its state last changed; and whether it
    has served since it registered. A target first seen healthy or unhealthy was in service before (a run that
    starts in service); one first seen initial has not served until it is healthy."""

    def __init__(self, policies: Sequence[Policy], cross_zone: bool = False) -> None:
        self.engine = PolicyEngine(policies)
        self.cross_zone = cross_zone
        self._last: dict[str, tuple[TargetState, float]] = {}
        self._served: set[str] = set()

    def snapshot(
        self, now: float, zones: Mapping[str, str], passive: Mapping[str, PassiveStats] | None = None
    ) -> Snapshot:
        views = []
        for zone, states in zones.items():
            for i, letter in enumerate(states):
                tid = f"{zone}{i}"
                state = _LETTERS[letter]
                prev = self._last.get(tid)
                since = prev[1] if prev is not None and prev[0] == state else now
                if state == H or (prev is None and state != INIT):
                    self._served.add(tid)
                elif state == INIT:
                    self._served.discard(tid)
                self._last[tid] = (state, since)
                views.append(
                    TargetView(tid, zone, state, since, (passive or {}).get(tid, PassiveStats()), tid in self._served)
                )
        return Snapshot(now, tuple(zones), tuple(sorted(views, key=lambda t: t.id)), self.cross_zone)

    def step(
        self, now: float, zones: Mapping[str, str], passive: Mapping[str, PassiveStats] | None = None
    ) -> RoutingPlan:
        return self.engine.step(self.snapshot(now, zones, passive))


def out_of_service(plan: RoutingPlan, ids: Sequence[str]) -> set[str]:
    return {t for t in ids if t not in plan.in_service}


# ---------------------------------------------------------------------------------------------------------
# Registry, specs, parameters


def test_registry_has_every_builtin_and_the_presets() -> None:
    assert set(POLICY_TYPES) >= {
        "naive",
        "fail-open",
        "min-healthy",
        "dns-failover",
        "panic",
        "max-ejection",
        "velocity",
        "flap-damping",
        "passive",
    }
    assert PRESETS["aws"] == "fail-open+dns-failover"
    assert [p.name for p in parse_policy_spec("aws")] == ["fail-open", "dns-failover"]
    assert [p.name for p in parse_policy_spec("aws-velocity")] == ["fail-open", "dns-failover", "velocity"]
    assert [p.name for p in parse_policy_spec("envoy")] == ["panic", "max-ejection"]
    for name, cls in POLICY_TYPES.items():
        assert cls.__doc__, name  # the CLI lists the first docstring line


def test_parse_spec_with_parameters_lists_and_whitespace() -> None:
    ps = parse_policy_spec(
        " velocity( max_removed_percent=20 , window_s=60 ) + dns-failover "
        "+ min-healthy(min_count=off, min_percent=50, actions=[dns-failover])"
        "+ min-healthy(actions=routing-failover|dns-failover)"
    )
    assert [p.name for p in ps] == ["velocity", "dns-failover", "min-healthy", "min-healthy"]
    v, _, m1, m2 = ps
    assert isinstance(v, Velocity) and v.max_removed_percent == 20.0 and v.window_s == 60.0
    assert isinstance(m1, MinHealthy) and m1.min_count is None and m1.min_percent == 50.0
    assert m1.actions == frozenset({"dns-failover"})
    assert isinstance(m2, MinHealthy) and m2.actions == frozenset({"dns-failover", "routing-failover"})


def test_make_policy_accepts_yaml_values() -> None:
    p = make_policy("min-healthy", {"min_percent": 60, "actions": ["dns-failover"]})
    assert isinstance(p, MinHealthy) and p.min_percent == 60.0 and p.min_count == 1
    q = make_policy("dns-failover", {"enabled": "false", "min_healthy": 2.0})
    assert isinstance(q, DnsFailover) and q.enabled is False and q.min_healthy == 2


@pytest.mark.parametrize(
    "policy",
    [
        Naive(),
        FailOpen(),
        MinHealthy(min_count=None, min_percent=50, actions=frozenset({"dns-failover"})),
        DnsFailover(enabled=False, min_healthy=2),
        Panic(threshold_percent=30, fail_traffic=True),
        MaxEjection(max_percent=33.5, semantics="before", always_eject_one_host=True),
        Velocity(max_removed_percent=20, window_s=60, floor_percent=40, min_budget=0),
        FlapDamping(penalty=500, half_life_s=30),
        PassiveChecks(consecutive_failures=3, keep_serving=False),
    ],
    ids=lambda p: p.name,
)
def test_describe_round_trips_through_the_parser(policy: Policy) -> None:
    [again] = parse_policy_spec(policy.describe())
    assert type(again) is type(policy)
    assert again.describe() == policy.describe()


def test_describe_policies() -> None:
    assert (
        describe_policies(parse_policy_spec("aws")) == "fail-open + dns-failover(enabled=true, min_healthy=1)"
    )
    assert describe_policies([]) == "naive"


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("nope", "unknown policy 'nope'; policies: dns-failover, fail-open, flap-damping"),
        ("nope", "presets: aws, aws-velocity, envoy"),
        (
            "velocity(speed=3)",
            "policy 'velocity' has no parameter 'speed'; allowed: max_removed_percent, window_s",
        ),
        (
            "max-ejection(semantics=after)",
            "max-ejection.semantics: input should be 'before' or 'inclusive', got 'after'",
        ),
        ("panic(threshold_percent=150)", "panic.threshold_percent: input should be less than or equal to 100, got"),
        ("panic(fail_traffic=maybe)", "panic.fail_traffic: input should be true or false, got 'maybe'"),
        ("dns-failover(min_healthy=1.5)", "dns-failover.min_healthy: input should be a valid integer"),
        ("velocity(window_s=soon)", "velocity.window_s: input should be a valid number, unable to parse string"),
        ("velocity(window_s=0)", "velocity.window_s: input should be greater than 0, got '0'"),
        ("velocity(window_s=nan)", "velocity.window_s: input should be a finite number"),
        ("velocity(base=all)", "velocity.base: input should be 'served' or 'registered', got 'all'"),
        ("min-healthy(min_count=0)", "min-healthy.min_count: input should be greater than or equal to 1"),
        (
            "min-healthy(actions=[fail-over])",
            "min-healthy.actions: input should be 'routing-failover' or 'dns-failover', got 'fail-over'",
        ),
        ("min-healthy(actions=[])", "min-healthy.actions: frozenset should have at least 1 item"),
        ("min-healthy(min_count=off)", "set min_count or min_percent"),
        ("flap-damping(reuse_threshold=3000)", "need 0 < reuse_threshold < suppress_threshold"),
        ("flap-damping(max_suppress_s=1)", "penalty ceiling"),
        ("aws(x=1)", "preset 'aws' takes no parameters"),
        ("fail-open++panic", "empty policy"),
        ("fail-open+", "empty policy"),
        ("", "empty policy spec"),
        ("velocity(window_s=60", "unbalanced"),
        ("velocity(window_s)", "must look like name=value"),
        ("velocity(window_s=1,window_s=2)", "given twice"),
        ("bad name", "bad policy name"),
    ],
)
def test_spec_errors_are_clear(spec: str, needle: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy_spec(spec)
    assert needle in str(info.value)
    assert isinstance(info.value, ValueError)


def test_make_policy_errors_are_clear() -> None:
    with pytest.raises(PolicyError, match=r"'aws' is a preset \(fail-open\+dns-failover\)"):
        make_policy("aws", None)
    with pytest.raises(
        PolicyError, match=r"has no parameter 'a', 'b'; allowed: threshold_percent, fail_traffic"
    ):
        make_policy("panic", {"b": 1, "a": 2})
    with pytest.raises(PolicyError, match="allowed: none"):
        make_policy("fail-open", {"x": 1})


def test_set_param_validates_and_reverts() -> None:
    v = Velocity()
    v.set_param("window_s", "60")
    assert v.window_s == 60.0
    with pytest.raises(PolicyError, match=r"velocity\.window_s: input should be greater than 0, got -1"):
        v.set_param("window_s", -1)
    assert v.window_s == 60.0
    with pytest.raises(PolicyError, match="no parameter 'speed'; allowed: max_removed_percent"):
        v.set_param("speed", 1)
    f = FlapDamping()
    with pytest.raises(PolicyError):
        f.set_param("reuse_threshold", 5000)
    assert f.reuse_threshold == 750.0


def test_base_policy_set_param_raises_value_error() -> None:
    with pytest.raises(ValueError, match="has no parameter"):
        Policy().set_param("x", 1)


def test_set_policy_param_helper() -> None:
    ps = parse_policy_spec("aws")
    assert set_policy_param(ps, "dns-failover", "enabled", False) == 1
    assert isinstance(ps[1], DnsFailover) and ps[1].enabled is False
    with pytest.raises(PolicyError, match="no policy 'velocity'"):
        set_policy_param(ps, "velocity", "window_s", 1)


def test_load_policy_class_and_register(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_policy_class("lb.policies:Velocity") is Velocity
    for bad, needle in [
        ("lb.policies", "looks like 'package.module:ClassName'"),
        ("lb.policies:Nope", "not a subclass"),
        ("math:pi", "not a subclass"),
        ("no_such_module_xyz:Thing", "cannot import"),
    ]:
        with pytest.raises(PolicyError, match=needle):
            load_policy_class(bad)

    @dataclass(eq=False)
    class Drop(BuiltinPolicy):
        """Test policy: take zone `zone` out of DNS."""

        name = "drop"
        zone: str = "a"

        def on_dns(self, snap: Snapshot, d: Decision) -> None:
            d.dns[self.zone] = False

    monkeypatch.setitem(POLICY_TYPES, "drop", Drop)  # undone after the test
    with pytest.raises(PolicyError, match="already taken"):
        register_policy(Velocity, "drop")
    [p] = parse_policy_spec("drop(zone=b)")
    plan = Driver([p]).step(0, {"a": "H", "b": "H"})
    assert plan.dns == {"a": True, "b": False}


def test_each_builtin_is_registered_by_its_own_module() -> None:
    modules = {name: POLICY_TYPES[name].__module__ for name in (
        "naive", "fail-open", "min-healthy", "dns-failover", "panic", "max-ejection", "velocity", "flap-damping",
        "passive")}
    assert modules["velocity"] == "lb.policies.velocity" and modules["fail-open"] == "lb.policies.fail_open"
    assert len(set(modules.values())) == len(modules)  # one module each
    for name in modules:
        assert builtin_policy(name) is POLICY_TYPES[name]
    assert builtin_policy("nope") is None

    @dataclass(eq=False)
    class Mine(Naive):
        """A user's policy: not a built-in, even once registered."""

        name = "velocity"

    with pytest.raises(PolicyError, match="already taken"):
        register(Mine)


def test_a_user_policy_gets_its_parameters_validated_from_its_annotations(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(POLICY_TYPES, "slow", Slow)
    [p] = parse_policy_spec("slow(delay_s=2.5,zones=[a,b])")
    assert isinstance(p, Slow) and p.delay_s == 2.5 and p.zones == frozenset({"a", "b"})
    assert builtin_policy("slow") is None  # registered, but not a built-in
    with pytest.raises(PolicyError, match=r"slow\.delay_s: input should be greater than 0, got '-1'"):
        parse_policy_spec("slow(delay_s=-1)")


@dataclass(eq=False)
class Slow(BuiltinPolicy):
    """Test policy with constrained parameters (module level, so its annotations resolve)."""

    name = "slow"
    delay_s: Positive = 1.0
    zones: Annotated[frozenset[str], NAMES] = frozenset()


def test_reset_forgets_state() -> None:
    m = MaxEjection(max_percent=50)
    drv = Driver([m])
    drv.step(0, {"a": "HHHH"})
    drv.step(1, {"a": "UUUU"})
    assert m._ejected
    drv.engine.reset()
    assert not m._ejected and not m._prev_in
    v = Velocity()
    v._log.append((0.0, 3))
    v.reset()
    assert not v._log and v._prev_in is None


def test_stages() -> None:
    assert DnsFailover().stage() == Stage.DECIDE
    assert DnsFailover(enabled=False).stage() == Stage.OVERRIDE
    assert PassiveChecks().stage() < MaxEjection().stage() < Velocity().stage()
    assert Velocity().stage() == max(Stage)


# ---------------------------------------------------------------------------------------------------------
# naive, fail-open, panic


def test_naive_refuses_when_nothing_is_healthy() -> None:
    plan = Driver([Naive()]).step(0, {"a": "UU", "b": "UI"})
    assert plan.routable == {"a": (), "b": ()}
    assert set(plan.zone_mode.values()) == {ZoneMode.NORMAL}


def test_fail_open_routes_to_all_when_no_target_is_healthy() -> None:
    plan = Driver([FailOpen()]).step(0, {"a": "UU", "b": "UI"})
    assert plan.zone_mode == {"a": ZoneMode.FAIL_OPEN, "b": ZoneMode.FAIL_OPEN}
    assert plan.routable == {"a": ("a0", "a1"), "b": ("b0", "b1")}
    plan = Driver([FailOpen()]).step(0, {"a": "UU", "b": "UH"})
    assert plan.zone_mode == {"a": ZoneMode.NORMAL, "b": ZoneMode.NORMAL}
    assert plan.routable == {"a": (), "b": ("b1",)}


def test_fail_open_on_an_empty_target_group() -> None:
    plan = Driver([FailOpen()]).step(0, {"a": "", "b": "DD"})
    assert plan.zone_mode == {"a": ZoneMode.FAIL_OPEN, "b": ZoneMode.FAIL_OPEN}
    assert plan.routable == {"a": (), "b": ()}  # draining targets take no new connections


def test_envoy_vector_a_panic_at_two_of_six() -> None:
    """Envoy conformance (a), `LoadBalancerBase::isHostSetInPanic` in source/common/upstream/
    load_balancer_impl.cc: 2 of 6 healthy (33% < 50) routes over all 6; 3 of 6 (50%) does not panic."""
    plan = Driver([Panic()]).step(0, {"a": "HHUUUU"})
    assert plan.zone_mode["a"] == ZoneMode.PANIC
    assert plan.routable["a"] == tuple(f"a{i}" for i in range(6))
    plan = Driver([Panic()]).step(0, {"a": "HHHUUU"})
    assert plan.zone_mode["a"] == ZoneMode.NORMAL
    assert plan.routable["a"] == ("a0", "a1", "a2")


def test_panic_fail_traffic_and_zero_threshold() -> None:
    plan = Driver([Panic(fail_traffic=True)]).step(0, {"a": "HUUU", "b": "HHHH"})
    assert plan.zone_mode == {"a": ZoneMode.FAIL_CLOSED, "b": ZoneMode.NORMAL}
    assert plan.routable["a"] == ()
    plan = Driver([Panic(threshold_percent=0)]).step(0, {"a": "UUUU"})
    assert plan.zone_mode["a"] == ZoneMode.NORMAL


def test_panic_with_cross_zone_judges_the_whole_load_balancer() -> None:
    drv = Driver([Panic()], cross_zone=True)
    plan = drv.step(0, {"a": "UUUU", "b": "HHHH"})  # 50%: no panic although zone a has no healthy target
    assert set(plan.zone_mode.values()) == {ZoneMode.NORMAL}
    assert plan.routable["a"] == ("b0", "b1", "b2", "b3")
    plan = drv.step(1, {"a": "UUUU", "b": "HHHU"})
    assert set(plan.zone_mode.values()) == {ZoneMode.PANIC}
    assert len(plan.routable["a"]) == 8


def test_panic_leaves_excluded_targets_out_of_the_denominator() -> None:
    class Exclude(Policy):
        name = "exclude"

        def on_targets(self, snap: Snapshot, d: Decision) -> None:
            d.excluded |= {"a2", "a3"}

    # 2 healthy of 4 non-excluded... of 2 non-excluded: 100%, no panic; without exclusion it would be 50%.
    plan = Driver([Exclude(), Panic(threshold_percent=60)]).step(0, {"a": "HHUU"})
    assert plan.zone_mode["a"] == ZoneMode.NORMAL
    plan = Driver([Panic(threshold_percent=60)]).step(0, {"a": "HHUU"})
    assert plan.zone_mode["a"] == ZoneMode.PANIC


def test_more_open_mode_wins_whatever_the_order() -> None:
    for order in ([FailOpen(), Panic(fail_traffic=True)], [Panic(fail_traffic=True), FailOpen()]):
        plan = Driver(order).step(0, {"a": "UU"})
        assert plan.zone_mode["a"] == ZoneMode.FAIL_OPEN


fleet_states = st.dictionaries(
    st.sampled_from(["a", "b", "c"]),
    st.text(alphabet="HUID", min_size=0, max_size=8),
    min_size=1,
)


@settings(max_examples=150, deadline=None)
@given(
    fleet_states,
    st.booleans(),
    st.sampled_from([0.0, 25.0, 50.0, 70.0, 100.0]),
    st.booleans(),
    st.sampled_from(["served", "registered"]),
)
def test_panic_routes_to_all_exactly_when_below_threshold(
    zones: dict[str, str], cross_zone: bool, threshold: float, fail_traffic: bool, base: str
) -> None:
    panic = Panic(threshold_percent=threshold, fail_traffic=fail_traffic, base=base)  # type: ignore[arg-type]
    drv = Driver([panic], cross_zone=cross_zone)
    snap = drv.snapshot(0, zones)
    plan = drv.engine.step(snap)
    live = snap.registered()
    for z in snap.zones:
        group = live if cross_zone else [t for t in live if t.zone == z]
        counted = [t for t in group if base == "registered" or t.state != INIT]  # first seen: served unless new
        healthy = sum(1 for t in counted if t.state == H)
        share = 100 * healthy / len(counted) if counted else 0.0
        panics = threshold > 0 and share < threshold
        expected_mode = (
            (ZoneMode.FAIL_CLOSED if fail_traffic else ZoneMode.PANIC) if panics else ZoneMode.NORMAL
        )
        assert plan.zone_mode[z] == expected_mode
        if panics and not fail_traffic:
            assert plan.routable[z] == tuple(sorted(t.id for t in group))
        elif not panics:
            assert plan.routable[z] == tuple(sorted(t.id for t in group if t.state == H))


@settings(max_examples=150, deadline=None)
@given(fleet_states, st.booleans())
def test_fail_open_routes_to_all_exactly_when_nothing_is_healthy(
    zones: dict[str, str], cross_zone: bool
) -> None:
    drv = Driver([FailOpen()], cross_zone=cross_zone)
    snap = drv.snapshot(0, zones)
    plan = drv.engine.step(snap)
    live = snap.registered()
    none_healthy = not any(t.state == H for t in live)
    for z in snap.zones:
        group = live if cross_zone else [t for t in live if t.zone == z]
        assert plan.zone_mode[z] == (ZoneMode.FAIL_OPEN if none_healthy else ZoneMode.NORMAL)
        wanted = group if none_healthy else [t for t in group if t.state == H]
        assert plan.routable[z] == tuple(sorted(t.id for t in wanted))


# ---------------------------------------------------------------------------------------------------------
# min-healthy (AWS target-group health) and dns-failover


DOC_EXAMPLE = {"a": "H" * 10, "b": "U" * 6 + "H" * 4}  # aws-facts 4.3: 2 AZs x 10, 6 failing in AZ B


@pytest.mark.parametrize("min_count", [None, 1])
def test_min_healthy_documented_example_cross_zone_off(min_count: int | None) -> None:
    plan = Driver([MinHealthy(min_count=min_count, min_percent=50)]).step(0, DOC_EXAMPLE)
    assert plan.dns == {"a": True, "b": False}  # B at 40% < 50%: out of DNS
    assert plan.zone_mode == {"a": ZoneMode.NORMAL, "b": ZoneMode.FAIL_OPEN}
    # B routes to all 10 of its targets, unhealthy ones included
    assert plan.routable["b"] == tuple(sorted(f"b{i}" for i in range(10)))
    assert plan.routable["a"] == tuple(sorted(f"a{i}" for i in range(10)))


@pytest.mark.parametrize("min_count", [None, 1])
def test_min_healthy_documented_example_cross_zone_on(min_count: int | None) -> None:
    plan = Driver([MinHealthy(min_count=min_count, min_percent=50)], cross_zone=True).step(0, DOC_EXAMPLE)
    assert plan.dns == {"a": True, "b": True}  # 14/20 = 70% >= 50%: nothing happens
    assert set(plan.zone_mode.values()) == {ZoneMode.NORMAL}
    healthy = tuple(sorted([f"a{i}" for i in range(10)] + [f"b{i}" for i in range(6, 10)]))
    assert plan.routable == {"a": healthy, "b": healthy}  # traffic goes to the 14 healthy targets


def test_min_healthy_separate_actions_and_count_threshold() -> None:
    dns_only = MinHealthy(min_count=3, actions=frozenset({"dns-failover"}))
    plan = Driver([dns_only]).step(0, {"a": "HHUU", "b": "HHHU"})
    assert plan.dns == {"a": False, "b": True}
    assert plan.zone_mode["a"] == ZoneMode.NORMAL
    routing_only = MinHealthy(min_count=3, actions=frozenset({"routing-failover"}))
    plan = Driver([routing_only]).step(0, {"a": "HHUU", "b": "HHHU"})
    assert plan.dns == {"a": True, "b": True}
    assert plan.zone_mode == {"a": ZoneMode.FAIL_OPEN, "b": ZoneMode.NORMAL}


def test_min_healthy_all_zones_breached_keeps_all_in_dns() -> None:
    plan = Driver([MinHealthy(min_percent=80)]).step(0, {"a": "HHUU", "b": "HUUU"})
    assert plan.dns == {"a": True, "b": True}
    assert plan.zone_mode == {"a": ZoneMode.FAIL_OPEN, "b": ZoneMode.FAIL_OPEN}


def test_dns_failover_removes_zones_without_healthy_targets() -> None:
    drv = Driver([DnsFailover()])
    assert drv.step(0, {"a": "UU", "b": "HU", "c": "II"}).dns == {"a": False, "b": True, "c": False}
    assert drv.step(1, {"a": "UU", "b": "UU", "c": "UU"}).dns == {"a": True, "b": True, "c": True}
    assert Driver([DnsFailover(min_healthy=2)]).step(0, {"a": "HU", "b": "HH"}).dns == {"a": False, "b": True}


def test_dns_failover_with_cross_zone_keeps_every_zone() -> None:
    plan = Driver([DnsFailover()], cross_zone=True).step(0, {"a": "UU", "b": "HU"})
    assert plan.dns == {"a": True, "b": True}


@pytest.mark.parametrize("reverse", [False, True])
def test_operator_switch_disables_dns_failover_at_run_time(reverse: bool) -> None:
    """09:36 on 2025-10-20: disabling automatic failover put every zone back, whatever removed it."""
    dns = DnsFailover()
    policies: list[Policy] = [dns, MinHealthy(min_percent=60, actions=frozenset({"dns-failover"}))]
    drv = Driver(policies[::-1] if reverse else policies)
    fleet = {"a": "UUU", "b": "HUU", "c": "HHH"}
    assert drv.step(0, fleet).dns == {"a": False, "b": False, "c": True}
    set_policy_param(drv.engine.policies, "dns-failover", "enabled", False)
    assert drv.step(1, fleet).dns == {"a": True, "b": True, "c": True}
    dns.set_param("enabled", "true")
    assert drv.step(2, fleet).dns == {"a": False, "b": False, "c": True}


def test_two_dns_removers_agree_in_either_order() -> None:
    # One rule fails every zone (so it removes none); the other fails zone a only.
    for policies in (
        [DnsFailover(min_healthy=5), MinHealthy(min_count=2, actions=frozenset({"dns-failover"}))],
        [MinHealthy(min_count=2, actions=frozenset({"dns-failover"})), DnsFailover(min_healthy=5)],
    ):
        assert Driver(policies).step(0, {"a": "HU", "b": "HH"}).dns == {"a": False, "b": True}


# ---------------------------------------------------------------------------------------------------------
# max-ejection: Envoy conformance vectors (docs/sources.md#envoy)


def _eject_all(policy: MaxEjection, n: int) -> tuple[set[str], RoutingPlan]:
    drv = Driver([policy])
    ids = [f"a{i}" for i in range(n)]
    drv.step(0, {"a": "H" * n})
    plan = drv.step(10, {"a": "U" * n})
    return out_of_service(plan, ids), plan


def test_envoy_vector_b_max_50_percent_of_three_ejects_one() -> None:
    """Envoy `MaxEjectionPercentage` test (test/common/upstream/outlier_detection_impl_test.cc), with
    the PR #27909 check in `DetectorImpl::ejectHost`: 100*(1+1)/3 = 67 > 50 stops at one."""
    ejected, plan = _eject_all(MaxEjection(max_percent=50), 3)
    assert ejected == {"a0"}
    assert plan.withheld == {"max-ejection": 2}  # vector (f): refused ejections are counted


def test_envoy_vector_b_before_semantics_ejects_two() -> None:
    """envoyproxy/envoy#26877: the pre-#27909 check (0 < 50, 33 < 50, 67) ejects 2 of 3."""
    ejected, _ = _eject_all(MaxEjection(max_percent=50, semantics="before"), 3)
    assert ejected == {"a0", "a1"}


def test_envoy_vector_c_67_percent_of_three() -> None:
    """envoyproxy/envoy#27066: at 67% the candidate-inclusive check allows 2 of 3; the old one all 3."""
    assert _eject_all(MaxEjection(max_percent=67), 3)[0] == {"a0", "a1"}
    assert _eject_all(MaxEjection(max_percent=67, semantics="before"), 3)[0] == {"a0", "a1", "a2"}


def test_envoy_vector_d_single_host() -> None:
    """A 1-host cluster with a cap below 100% ejects nothing unless `always_eject_one_host` (PR #34796)."""
    assert _eject_all(MaxEjection(max_percent=99), 1)[0] == set()
    assert _eject_all(MaxEjection(max_percent=99, always_eject_one_host=True), 1)[0] == {"a0"}


def test_default_ten_percent_ejects_nothing_below_ten_hosts() -> None:
    """PR #27909: with the default 10% and fewer than 10 hosts nothing is ejected; 20 hosts allow 2."""
    for n in range(1, 10):
        assert _eject_all(MaxEjection(), n)[0] == set()
    assert _eject_all(MaxEjection(), 10)[0] == {"a0"}
    assert len(_eject_all(MaxEjection(), 20)[0]) == 2
    assert len(_eject_all(MaxEjection(semantics="before"), 20)[0]) == 2  # 0 < 10, 5 < 10, 10 is not < 10
    assert len(_eject_all(MaxEjection(always_eject_one_host=True), 5)[0]) == 1


def test_max_ejection_order_persistence_and_release() -> None:
    m = MaxEjection(max_percent=50)
    drv = Driver([m])
    ids = ["a0", "a1", "a2", "a3"]
    drv.step(0, {"a": "HHHH"})
    plan = drv.step(5, {"a": "HHHU"})  # a3 fails first
    assert out_of_service(plan, ids) == {"a3"}
    plan = drv.step(6, {"a": "UUHU"})  # a0 and a1 fail later: 2 of 4 allowed -> a0 (same since, lower id)
    assert out_of_service(plan, ids) == {"a3", "a0"}
    assert plan.withheld == {"max-ejection": 1}
    assert "a1" in plan.in_service
    plan = drv.step(7, {"a": "UUHU"})  # admitted ejections stay while unhealthy
    assert out_of_service(plan, ids) == {"a3", "a0"}
    plan = drv.step(8, {"a": "UUHH"})  # a3 recovers: a slot frees for a1
    assert out_of_service(plan, ids) == {"a0", "a1"}
    assert plan.withheld == {}


def test_max_ejection_ignores_targets_never_in_service() -> None:
    drv = Driver([MaxEjection(max_percent=10)])
    plan = drv.step(0, {"a": "UUII"})
    assert plan.in_service == frozenset()
    assert plan.withheld == {}


@settings(max_examples=120, deadline=None)
@given(
    st.integers(min_value=1, max_value=12),
    st.sampled_from(["before", "inclusive"]),
    st.sampled_from([0.0, 10.0, 25.0, 33.0, 50.0, 67.0, 100.0]),
    st.booleans(),
    st.lists(st.lists(st.booleans(), min_size=12, max_size=12), min_size=1, max_size=25),
)
def test_max_ejection_never_ejects_more_than_its_share(
    n: int, semantics: str, max_percent: float, always_one: bool, steps: list[list[bool]]
) -> None:
    m = MaxEjection(max_percent=max_percent, semantics=semantics, always_eject_one_host=always_one)  # type: ignore[arg-type]
    drv = Driver([m])
    ever_in: set[str] = set()
    for i, healthy in enumerate(steps):
        plan = drv.step(i, {"a": "".join("H" if h else "U" for h in healthy[:n])})
        ejected = {t for t in ever_in if t not in plan.in_service}
        e = len(ejected)
        if e:
            within = (
                100 * e <= max_percent * n + 1e-9
                if semantics == "inclusive"
                else 100 * (e - 1) < max_percent * n - 1e-9
            )
            assert within or (always_one and e == 1), (e, n)
        if plan.withheld:  # it withholds only what the cap forbids
            assert not m.allows(e, n)
        ever_in |= plan.in_service


# ---------------------------------------------------------------------------------------------------------
# base: shares of targets that served, or of every registered target


def test_target_view_served() -> None:
    assert not TargetView("a0", "a", INIT, 0.0).served  # untracked: judged by its state
    assert TargetView("a0", "a", U, 0.0).served
    assert not TargetView("a0", "a", U, 0.0, ever_healthy=False).served  # failed its first checks
    assert TargetView("a0", "a", H, 0.0, ever_healthy=False).served  # healthy now is in service now
    assert TargetView("a0", "a", U, 0.0, ever_healthy=True).served
    snap = Snapshot(0, ("a",), (TargetView("a0", "a", H, 0.0), TargetView("a1", "a", INIT, 0.0),
                                TargetView("a2", "a", U, 0.0, ever_healthy=False), TargetView("a3", "a", DRAIN, 0.0)))
    assert [t.id for t in snap.served()] == ["a0"]
    assert [t.id for t in snap.registered()] == ["a0", "a1", "a2"]


NEW_FLEET = "H" * 12 + "I" * 18  # 12 serving targets next to 18 new ones, as in aws-2025-10-20


@pytest.mark.parametrize(("base", "ejected"), [("served", True), ("registered", False)])
def test_velocity_counts_only_targets_that_served(base: str, ejected: bool) -> None:
    """With 18 new targets counted, the floor is 15 of 30 > 12 in service: the failing target is withheld.
    Counting the 12 that serve, the floor is 6 and the budget max(1, 1.2): it leaves."""
    v = Velocity(base=base)  # type: ignore[arg-type]
    drv = Driver([v])
    drv.step(0, {"a": NEW_FLEET})
    plan = drv.step(10, {"a": "U" + NEW_FLEET[1:]})
    assert ("a0" not in plan.in_service) is ejected
    assert plan.withheld == ({} if ejected else {"velocity": 1})


def test_velocity_counts_new_targets_once_they_serve_and_never_those_that_failed_first() -> None:
    v = Velocity(max_removed_percent=10, window_s=1000, floor_percent=50, min_budget=0)
    drv = Driver([v])
    drv.step(0, {"a": "HHHHHHHHHH" + "IIIIIIIIII"})  # 10 served: budget 1
    plan = drv.step(1, {"a": "UHHHHHHHHH" + "IIIIIIIIII"})
    assert "a0" not in plan.in_service  # 1 of budget 1
    plan = drv.step(2, {"a": "UUHHHHHHHH" + "IIIIIIIIII"})
    assert "a1" in plan.in_service and plan.withheld == {"velocity": 1}
    # Ten new targets fail their first checks: never in service, they neither add budget nor raise the floor.
    plan = drv.step(3, {"a": "UUHHHHHHHH" + "UUUUUUUUUU"})
    assert "a1" in plan.in_service and plan.withheld == {"velocity": 1}
    # Once they pass, 20 have served: budget 2, so a1 may go now.
    plan = drv.step(4, {"a": "UUHHHHHHHH" + "HHHHHHHHHH"})
    assert "a1" not in plan.in_service and plan.withheld == {}


@pytest.mark.parametrize(("base", "out"), [("served", 1), ("registered", 2)])
def test_max_ejection_cap_is_a_share_of_targets_that_served(base: str, out: int) -> None:
    m = MaxEjection(max_percent=10, base=base)  # type: ignore[arg-type]
    drv = Driver([m])
    drv.step(0, {"a": "H" * 10 + "I" * 10})
    plan = drv.step(1, {"a": "UU" + "H" * 8 + "I" * 10})
    assert len(out_of_service(plan, ["a0", "a1"])) == out
    assert plan.withheld == ({"max-ejection": 1} if out == 1 else {})


@pytest.mark.parametrize(("base", "mode"), [("served", ZoneMode.NORMAL), ("registered", ZoneMode.PANIC)])
def test_panic_share_of_targets_that_served(base: str, mode: ZoneMode) -> None:
    """4 serving targets and 6 new ones: 100% of those that served, 40% of those registered."""
    plan = Driver([Panic(base=base)]).step(0, {"a": "HHHH" + "IIIIII"})  # type: ignore[arg-type]
    assert plan.zone_mode["a"] == mode


def test_min_healthy_keeps_aws_rule_over_registered_targets() -> None:
    plan = Driver([MinHealthy(min_percent=50, actions=frozenset({"routing-failover"}))]).step(
        0, {"a": "HHHH" + "IIIIII"}
    )
    assert plan.zone_mode["a"] == ZoneMode.FAIL_OPEN  # 4 of 10 registered < 50%


# ---------------------------------------------------------------------------------------------------------
# velocity


def test_velocity_limits_ejections_per_window_and_forgets_old_removals() -> None:
    v = Velocity(max_removed_percent=20, window_s=60, floor_percent=0)  # 2 of 10 per minute
    drv = Driver([v])
    ids = [f"a{i}" for i in range(10)]
    drv.step(0, {"a": "H" * 10})
    plan = drv.step(10, {"a": "U" * 5 + "H" * 5})
    assert out_of_service(plan, ids) == {"a0", "a1"}
    assert plan.withheld == {"velocity": 3}
    plan = drv.step(69, {"a": "U" * 5 + "H" * 5})  # 59 s later: still in the window
    assert out_of_service(plan, ids) == {"a0", "a1"}
    plan = drv.step(70, {"a": "U" * 5 + "H" * 5})  # the first removals left the window
    assert out_of_service(plan, ids) == {"a0", "a1", "a2", "a3"}


def test_velocity_restorations_are_free() -> None:
    v = Velocity(max_removed_percent=10, window_s=300, floor_percent=0)  # 1 of 10 per 5 minutes
    drv = Driver([v])
    ids = [f"a{i}" for i in range(10)]
    drv.step(0, {"a": "H" * 10})
    assert out_of_service(drv.step(1, {"a": "U" + "H" * 9}), ids) == {"a0"}
    assert out_of_service(drv.step(2, {"a": "H" * 10}), ids) == set()  # back: costs nothing, refunds nothing
    plan = drv.step(3, {"a": "U" + "H" * 9})
    assert out_of_service(plan, ids) == set()
    assert plan.withheld == {"velocity": 1}


def test_velocity_floor() -> None:
    v = Velocity(max_removed_percent=100, floor_percent=50)
    drv = Driver([v])
    drv.step(0, {"a": "HHHH"})
    plan = drv.step(1, {"a": "UUUU"})
    assert len(plan.in_service) == 2
    assert plan.withheld == {"velocity": 2}


def test_velocity_min_budget_lets_a_small_fleet_shed_one() -> None:
    ids = ["a0", "a1", "a2"]
    for min_budget, expected in ((1, {"a0"}), (0, set())):
        drv = Driver([Velocity(min_budget=min_budget)])  # 10% of 3 is 0.3 targets
        drv.step(0, {"a": "HHH"})
        assert out_of_service(drv.step(1, {"a": "UHH"}), ids) == expected


def test_velocity_withholds_a_zone_removal_that_costs_too_much() -> None:
    """The outage's failure: DNS failover taking out a zone that still held in-service targets."""
    v = Velocity(max_removed_percent=20, floor_percent=0)  # 2 of 10 targets per window
    drv = Driver([DnsFailover(min_healthy=4), v])
    zones = {"a": "HHHHH", "b": "HHHHH"}
    drv.step(0, zones)
    plan = drv.step(1, {"a": "HHHUU", "b": "HHHHH"})  # 2 ejections use the whole budget ...
    assert out_of_service(plan, ["a3", "a4"]) == {"a3", "a4"}
    # ... so the zone, still holding 3 in-service targets, stays published
    assert plan.dns == {"a": True, "b": True}
    assert plan.withheld == {"velocity": 1}


def test_velocity_lets_an_empty_zone_go() -> None:
    v = Velocity(max_removed_percent=10, floor_percent=90)
    drv = Driver([DnsFailover(), v])
    drv.step(0, {"a": "IIII", "b": "HHHH"})
    plan = drv.step(1, {"a": "UUUU", "b": "HHHH"})  # zone a never held capacity: free to leave DNS
    assert plan.dns == {"a": False, "b": True}
    assert plan.withheld == {}


def test_velocity_zone_removal_within_budget() -> None:
    v = Velocity(max_removed_percent=50, floor_percent=0)
    drv = Driver([DnsFailover(min_healthy=3), v])
    drv.step(0, {"a": "HHHH", "b": "HHHH"})
    plan = drv.step(1, {"a": "UUHH", "b": "HHHH"})  # 2 ejections + zone a (2 in service) = 4 = budget
    assert plan.dns == {"a": False, "b": True}
    assert plan.withheld == {}


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from([0.0, 10.0, 25.0, 50.0]),  # max_removed_percent
    st.sampled_from([5.0, 30.0, 300.0]),  # window_s
    st.sampled_from([0.0, 30.0, 50.0, 90.0]),  # floor_percent
    st.integers(min_value=0, max_value=2),  # min_budget
    st.booleans(),  # with dns-failover
    st.lists(
        st.tuples(
            st.sampled_from([0.5, 1.0, 5.0, 20.0, 100.0]), st.lists(st.booleans(), min_size=12, max_size=12)
        ),
        min_size=1,
        max_size=30,
    ),
)
def test_velocity_never_exceeds_budget_or_breaks_floor(
    pct: float,
    window: float,
    floor: float,
    min_budget: int,
    with_dns: bool,
    steps: list[tuple[float, list[bool]]],
) -> None:
    v = Velocity(max_removed_percent=pct, window_s=window, floor_percent=floor, min_budget=min_budget)
    policies: list[Policy] = [DnsFailover(min_healthy=2), v] if with_dns else [v]
    drv = Driver(policies)
    n = 12
    budget = max(min_budget, pct * n / 100)
    floor_count = floor * n / 100
    log: list[tuple[float, int]] = []
    prev: RoutingPlan | None = None
    now = 0.0
    for dt, healthy in steps:
        now += dt
        letters = "".join("H" if h else "U" for h in healthy)
        plan = drv.step(now, {"a": letters[:4], "b": letters[4:8], "c": letters[8:]})
        if prev is not None:
            removed_targets = len(prev.in_service - plan.in_service)
            if removed_targets:
                log.append((now, removed_targets))
                assert len(plan.in_service) >= floor_count - 1e-9
            zone_cost = 0
            for z in ("a", "b", "c"):
                if prev.dns[z] and not plan.dns[z]:
                    zone_cost += sum(1 for t in plan.in_service if t.startswith(z))
            if zone_cost:
                log.append((now, zone_cost))
                published = sum(1 for t in plan.in_service if plan.dns[t[0]])
                assert published >= floor_count - 1e-9
            assert sum(c for at, c in log if at > now - window) <= budget + 1e-9
        prev = plan


# ---------------------------------------------------------------------------------------------------------
# why a removal was withheld


def test_velocity_names_the_floor_or_the_budget() -> None:
    v = Velocity(max_removed_percent=20, window_s=60, floor_percent=80)  # of 10: budget 2, floor 8
    drv = Driver([v])
    drv.step(0, {"a": "H" * 10})
    plan = drv.step(1, {"a": "UUU" + "H" * 7})  # 2 fit; the third is over the budget and below the floor
    assert plan.withheld_reasons == {("velocity", WithholdReason.FLOOR): 1}
    v2 = Velocity(max_removed_percent=20, window_s=60, floor_percent=0)
    drv = Driver([v2])
    drv.step(0, {"a": "H" * 10})
    plan = drv.step(1, {"a": "UUU" + "H" * 7})
    assert plan.withheld_reasons == {("velocity", WithholdReason.BUDGET): 1}
    assert ("velocity", "a2", WithholdReason.BUDGET) in plan.withheld_subjects


def test_velocity_names_the_reason_of_a_withheld_zone() -> None:
    v = Velocity(max_removed_percent=10, floor_percent=0)  # of 12: a budget of 1.2
    drv = Driver([DnsFailover(min_healthy=4), v])
    drv.step(0, {"a": "HHHH", "b": "HHHH", "c": "HHHH"})
    plan = drv.step(1, {"a": "HHHH", "b": "HHHH", "c": "UHHH"})  # c0 goes (1 of 1.2); c would leave DNS, cost 3
    assert plan.dns["c"]
    assert ("velocity", "zone:c", WithholdReason.BUDGET) in plan.withheld_subjects


def test_max_ejection_and_passive_reasons() -> None:
    plan = _eject_all(MaxEjection(max_percent=50), 4)[1]
    assert plan.withheld_reasons == {("max-ejection", WithholdReason.CAP): 2}
    serving = PassiveStats(successes=5, last_success_at=9.0, recent_success_times=(7.0, 8.0, 9.0))
    drv = Driver([PassiveChecks()])
    drv.step(0, {"a": "HH"})
    plan = drv.step(10, {"a": "UH"}, {"a0": serving})
    assert plan.withheld_reasons == {("passive", WithholdReason.KEEP_SERVING): 1}


def test_a_policy_that_gives_no_reason_is_counted_as_other() -> None:
    d = Decision(in_service=set(), zone_mode={}, dns={})
    d.withhold("mine", "a0")
    assert d.withheld_reasons == {("mine", WithholdReason.OTHER): 1}
    assert d.withheld_subjects == {("mine", "a0", WithholdReason.OTHER)}


# ---------------------------------------------------------------------------------------------------------
# flap damping


def test_flap_damping_suppresses_a_flapper_and_readmits_it_after_decay() -> None:
    f = FlapDamping()
    drv = Driver([f, Panic()])
    up, down = {"a": "HHHH"}, {"a": "HHHU"}
    drv.step(0, up)
    drv.step(1, down)  # 1000
    plan = drv.step(2, up)  # ~1988: not yet above 2000
    assert "a3" in plan.in_service
    plan = drv.step(3, down)  # ~2966: suppressed
    assert f.is_suppressed("a3")
    plan = drv.step(4, up)  # healthy again but held out, and out of the panic denominator
    assert "a3" not in plan.in_service
    assert "a3" in plan.excluded and plan.zone_mode["a"] == ZoneMode.NORMAL
    assert plan.routable["a"] == ("a0", "a1", "a2")
    # the figure (~3900 at t=4) halves every 60 s: below 750 after ~143 s more
    assert "a3" not in drv.step(100, up).in_service
    plan = drv.step(150, up)
    assert "a3" in plan.in_service and not f.is_suppressed("a3") and "a3" not in plan.excluded


def test_flap_damping_counts_a_round_trip_between_steps() -> None:
    f = FlapDamping()
    snaps = [
        Snapshot(0, ("a",), (TargetView("a0", "a", H, 0.0),)),
        Snapshot(10, ("a",), (TargetView("a0", "a", H, 9.0),)),  # went down and up since the last step
    ]
    engine = PolicyEngine([f])
    for s in snaps:
        engine.step(s)
    assert f.merit("a0", 10) == pytest.approx(2000)


def test_flap_damping_ignores_steady_and_new_targets() -> None:
    f = FlapDamping()
    drv = Driver([f])
    drv.step(0, {"a": "II"})
    drv.step(1, {"a": "HU"})  # first verdicts are not flaps
    for t in range(2, 50):
        plan = drv.step(t, {"a": "HU"})
    assert f.merit("a0", 50) == 0 and f.merit("a1", 50) == 0
    assert plan.in_service == {"a0"}


def test_flap_damping_ceiling_bounds_suppression_time() -> None:
    f = FlapDamping(max_suppress_s=120)  # ceiling = 750 * 2^2 = 3000
    drv = Driver([f])
    drv.step(0, {"a": "H"})
    for t in range(1, 41):  # flaps every second, ending healthy at t=40
        drv.step(t, {"a": "U" if t % 2 else "H"})
    assert f.merit("a0", 40) == pytest.approx(3000)  # capped: without the ceiling it would be ~28000
    assert f.is_suppressed("a0")
    drv.step(40 + 119, {"a": "H"})
    assert f.is_suppressed("a0")
    assert "a0" in drv.step(40 + 121, {"a": "H"}).in_service  # back within max_suppress_s of the last flap


# ---------------------------------------------------------------------------------------------------------
# composition


def _all_policies() -> list[Policy]:
    return [
        FailOpen(),
        DnsFailover(min_healthy=2),
        MinHealthy(min_percent=40),
        Panic(threshold_percent=30),
        MaxEjection(max_percent=30),
        Velocity(max_removed_percent=25, window_s=20, floor_percent=30),
        FlapDamping(half_life_s=10),
        PassiveChecks(consecutive_failures=2, base_ejection_s=5),
    ]


passive_choice = st.sampled_from(
    [
        PassiveStats(),
        PassiveStats(consecutive_failures=3, failures=3),
        PassiveStats(successes=5, recent_success_times=(0.0, 0.0, 0.0)),
    ]
)


@settings(max_examples=60, deadline=None)
@given(
    st.randoms(use_true_random=False),
    st.booleans(),
    st.lists(
        st.tuples(
            st.sampled_from([0.5, 2.0, 7.0, 30.0]),
            st.lists(st.sampled_from("HHUI"), min_size=9, max_size=9),
            st.lists(passive_choice, min_size=9, max_size=9),
        ),
        min_size=1,
        max_size=20,
    ),
)
def test_composition_order_does_not_matter(
    rnd: random.Random, cross_zone: bool, steps: list[tuple[float, list[str], list[PassiveStats]]]
) -> None:
    first = _all_policies()
    second = _all_policies()
    rnd.shuffle(second)
    a, b = Driver(first, cross_zone), Driver(second, cross_zone)
    now = 0.0
    for dt, letters, passive in steps:
        now += dt
        zones = {"a": "".join(letters[:3]), "b": "".join(letters[3:6]), "c": "".join(letters[6:])}
        stats = {}
        for i, s in enumerate(passive):
            times = tuple(now for _ in s.recent_success_times)  # recent relative to this step
            stats[f"{'abc'[i // 3]}{i % 3}"] = PassiveStats(
                s.consecutive_failures, s.successes, s.failures, recent_success_times=times
            )
        assert a.step(now, zones, stats) == b.step(now, zones, stats)


def test_cross_phase_pairs_mean_the_same() -> None:
    for spec, rev in [
        ("velocity+fail-open", "fail-open+velocity"),
        ("max-ejection+dns-failover", "dns-failover+max-ejection"),
        ("flap-damping+max-ejection", "max-ejection+flap-damping"),
    ]:
        a, b = Driver(parse_policy_spec(spec)), Driver(parse_policy_spec(rev))
        for t, fleet in enumerate(
            [{"a": "HHH", "b": "HHH"}, {"a": "UUU", "b": "HUH"}, {"a": "UUU", "b": "UUU"}]
        ):
            assert a.step(t, fleet) == b.step(t, fleet)


# ---------------------------------------------------------------------------------------------------------
# Data-path confirmation: limiters let a failure through when real traffic agrees with the probes


def _dead(at: float, failures: int = 3) -> PassiveStats:
    """What the data path shows of a target whose last `failures` connections failed, the latest at `at`."""
    return PassiveStats(consecutive_failures=failures, successes=10, failures=failures, last_failure_at=at)


@pytest.mark.parametrize(
    ("state", "stats", "now", "failures", "expected"),
    [
        (U, _dead(10.0), 10.0, 3, True),
        (U, _dead(10.0), 40.0, 3, True),  # exactly the window old
        (U, _dead(10.0), 40.5, 3, False),  # stale evidence no longer counts
        (U, _dead(10.0, failures=2), 10.0, 3, False),  # too few in a row
        (H, _dead(10.0), 10.0, 3, False),  # probes say healthy: nothing to confirm
        (INIT, _dead(10.0), 10.0, 3, False),  # never admitted: nothing to confirm
        (U, PassiveStats(), 10.0, 3, False),  # no traffic, no evidence
        (U, _dead(10.0), 10.0, 0, False),  # switched off
    ],
)
def test_confirmed_down_needs_unhealthy_probes_and_recent_failed_connections(
    state: TargetState, stats: PassiveStats, now: float, failures: int, expected: bool
) -> None:
    t = TargetView("a0", "a", state, 0.0, stats)
    assert confirmed_down(t, now, failures, window_s=30.0) is expected


def test_velocity_lets_a_confirmed_failure_through_free_and_below_the_floor() -> None:
    v = Velocity(max_removed_percent=10, floor_percent=80)  # 1 of 10 per window, keep 8 in service
    drv = Driver([v])
    ids = [f"a{i}" for i in range(10)]
    drv.step(0, {"a": "H" * 10})
    # a0..a2 fail their probes and real traffic to them fails too; a3 only fails its probes
    passive = {tid: _dead(4.0) for tid in ("a0", "a1", "a2")}
    plan = drv.step(5, {"a": "UUUU" + "H" * 6}, passive)
    assert out_of_service(plan, ids) == {"a0", "a1", "a2"}  # below the floor of 8: they are gone anyway
    assert plan.withheld == {"velocity": 1}  # a3 would break the floor
    assert v.used(5) == 0  # the confirmed three were not charged
    v.set_param("floor_percent", 0)
    plan = drv.step(6, {"a": "UUUU" + "H" * 6}, passive)
    assert out_of_service(plan, ids) == {"a0", "a1", "a2", "a3"}  # a3 takes the one unit of budget
    plan = drv.step(7, {"a": "UUUUU" + "H" * 5}, passive)  # a4 fails probes only: the budget is spent
    assert "a4" in plan.in_service and plan.withheld == {"velocity": 1}


def test_velocity_without_confirmation_holds_the_same_failures() -> None:
    drv = Driver([Velocity(max_removed_percent=10, floor_percent=80, confirm_failures=0)])
    ids = [f"a{i}" for i in range(10)]
    drv.step(0, {"a": "H" * 10})
    passive = {tid: _dead(4.0) for tid in ("a0", "a1", "a2")}
    plan = drv.step(5, {"a": "UUU" + "H" * 7}, passive)
    assert out_of_service(plan, ids) == {"a0"}
    assert plan.withheld == {"velocity": 2}


def test_velocity_lets_a_dead_zone_leave_dns() -> None:
    """zone-outage: every target of zone a dies; the data path confirms it, so with DNS failover the zone
    leaves DNS at once (it holds no in-service target any more, so its removal costs nothing)."""
    drv = Driver([FailOpen(), DnsFailover(), Velocity()])
    drv.step(0, {"a": "HHHH", "b": "HHHH", "c": "HHHH"})
    passive = {f"a{i}": _dead(9.0) for i in range(4)}
    plan = drv.step(10, {"a": "UUUU", "b": "HHHH", "c": "HHHH"}, passive)
    assert plan.dns == {"a": False, "b": True, "c": True}
    assert plan.withheld == {}


def test_max_ejection_does_not_count_confirmed_failures_against_its_cap() -> None:
    m = MaxEjection(max_percent=25)  # 1 of 4 ejections by probes alone
    drv = Driver([m])
    ids = ["a0", "a1", "a2", "a3"]
    drv.step(0, {"a": "HHHH"})
    plan = drv.step(5, {"a": "UUUH"}, {"a0": _dead(4.0), "a1": _dead(4.0)})
    assert out_of_service(plan, ids) == {"a0", "a1", "a2"}  # a2 is the cap's one ejection
    assert plan.withheld == {}
    plan = drv.step(6, {"a": "UUUU"}, {"a0": _dead(4.0), "a1": _dead(4.0)})
    assert "a3" in plan.in_service and plan.withheld == {"max-ejection": 1}


def test_panic_routes_to_every_target_except_the_confirmed_dead() -> None:
    plan = Driver([Panic()]).step(10, {"a": "HUUU"}, {"a1": _dead(9.0)})
    assert plan.zone_mode["a"] == ZoneMode.PANIC
    assert plan.routable["a"] == ("a0", "a2", "a3")  # a2, a3 fail probes but may still serve
    plan = Driver([Panic(confirm_failures=0)]).step(10, {"a": "HUUU"}, {"a1": _dead(9.0)})
    assert plan.routable["a"] == ("a0", "a1", "a2", "a3")  # Envoy exactly


def test_panic_does_not_route_to_a_dead_zone() -> None:
    passive = {f"a{i}": _dead(9.0) for i in range(4)}
    plan = Driver([Panic()]).step(10, {"a": "UUUU", "b": "HHHH"}, passive)
    assert plan.routable["a"] == ()
    assert plan.routable["b"] == ("b0", "b1", "b2", "b3")
