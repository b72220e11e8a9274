"""Scenario files: the built-ins load, and mistakes are reported with file, field and what is allowed."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from backends.controlplane import hostmanager, netmanager
from lb.balancer import BalancerSettings
from lb.checker import CheckConfig, CheckerCapacity, CheckSettings
from scenarios.schema import (
    Event,
    Scenario,
    ScenarioError,
    builtin_names,
    event_conflict,
    load_scenario,
    parse_scenario,
    selections_overlap,
)
from scenarios.system import balancer_config

SECONDS = "a number of sim seconds, e.g. 10 or 0.5; strings like '10s' are not accepted"
CP = "control_plane: {}\n"


def test_builtins_load() -> None:
    names = builtin_names()
    assert {"zone-outage", "flapping-new-targets"} <= set(names)
    for name in names:
        sc, source = load_scenario(name)
        assert sc.name == name and source == f"built-in:{name}"
        assert sc.timeline, "every built-in scenario has a timeline"


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize(
    ("text", "field", "allowed"),
    [
        ("name: x\nhealth_check: {protocol: udp}\n", "health_check.protocol", "'http'"),
        ("name: x\nhealth_check: {interval_s: 2, timeout_s: 3}\n", "health_check", "smaller than interval_s"),
        ("name: x\nspeeed: 3\n", "speeed", "unknown field"),
        ("name: x\ntimeline: [{at: 5, path: {state: melt}}]\n", "timeline.0.path.state", "'blackhole'"),
        ("name: x\ntimeline: [{at: 5}]\n", "timeline.0", "exactly one action"),
        ("name: x\nduration_s: 10\ntimeline: [{at: 50, zone: a, path: {state: open}}]\n", "timeline.0.at",
         "after duration_s = 10"),
        ("name: x\nzones: [a, a]\n", "zones", "unique"),
        ("name: x\nhealth_check: {success_codes: 2xx}\n", "health_check.success_codes", "integers or ranges"),
        ("name: x\ntimeline: [{at: 1, register: {count: 2}}]\n", "timeline.0", "needs `zone`"),
        ("name: x\ncontrol_plane: {}\ntimeline: [{at: 1, control: {component: dynamo, action: restore}}]\n",
         "timeline.0.control.component", "'lease_store'"),
        ("name: x\ncontrol_plane: {}\ntimeline: [{at: 1, control: {component: dns, action: explode}}]\n",
         "timeline.0.control", "must be one of ['delay-enactor'"),
        ("name: x\ncontrol_plane: {network_manager: {rate_per_s: -2}}\n", "control_plane.network_manager.rate_per_s",
         "greater than or equal to 0"),  # 0 is a stalled network manager
        ("name: x\ntimeline: [{at: 5, backend: {mode: slow}}]\n", "timeline.0.backend", "mode slow needs latency_s"),
        ("name: x\ntimeline: [{at: 5, backend: {mode: hang, status: 500}}]\n", "timeline.0.backend",
         "mode hang does not take status (it takes capacity_per_s, deep_ok, error_rate, work_latency_s)"),
        ("name: x\ntimeline: [{at: 5, backend: {mode: slow, latency_s: -1}}]\n", "timeline.0.backend.latency_s",
         "greater than or equal to 0"),
        ("name: x\ncontrol_plane: {network_manager: {hard_cap: 0}}\n", "control_plane.network_manager.hard_cap",
         "greater than or equal to 1"),
        ("name: x\ncontrol_plane: {host_manager: {hard_cap: 0}}\n", "control_plane.host_manager.hard_cap",
         "greater than or equal to 1"),
        ("name: x\ncontrol_plane: {}\ntimeline: [{at: 1, control: {component: network_manager, action: set-rate, "
         "rate_per_s: -1}}]\n", "timeline.0.control.rate_per_s", "greater than or equal to 0"),
        ("name: x\ncontrol_plane: {}\ntimeline: [{at: -5, control: {component: dns, action: restore}}]\n",
         "timeline.0.at", "greater than or equal to 0"),
        ("name: x\ncontrol_plane: {}\ntimeline: [{at: 1, control: {component: dns, action: delay-enactor, "
         "enactor: a}}]\n", "timeline.0.control", "needs delay_s"),
        ("name: x\ncontrol_plane: {}\ntimeline: [{at: 1, control: {component: dns, action: restore, count: 3}}]\n",
         "timeline.0.control", "takes no parameters, not count"),
        ("name: x\ncontrol_plane: {}\ntimeline: [{at: 1, control: {component: dns, action: delay-enactor, "
         "enactor: z, delay_s: 9}}]\n", "timeline.0.control.enactor", "not one of the enactors ['a', 'b', 'c']"),
        ("name: x\ntimeline: [{at: 1, control: {component: dns, action: restore}}]\n", "timeline.0.control",
         "no `control_plane` section"),
        # one duration syntax: numbers of sim seconds; strings and booleans are rejected where numbers go
        ("name: x\nduration_s: 10s\n", "duration_s", SECONDS),
        ("name: x\nhealth_check: {interval_s: '10'}\n", "health_check.interval_s", SECONDS),
        ("name: x\ntimeline: [{at: 10 ms, zone: a, path: {state: open}}]\n", "timeline.0.at", SECONDS),
        ("name: x\ntraffic: {timeout_s: true}\n", "traffic.timeout_s", "a number of sim seconds, e.g. 10 or 0.5, not "
         "true/false"),
        ("name: x\ntargets_per_zone: '3'\n", "targets_per_zone", "a whole number"),
        ("name: x\ntraffic: {rate_per_s: 20/s}\n", "traffic.rate_per_s", "a number per sim second"),
        ("name: x\nduration_s: 1e3\n", "duration_s", "YAML reads 1e3 as text: write 1000"),
        ("name: x\ntimeline: [{at: 1, zone: a, path: {state: latency, latency_s: .inf}}]\n",
         "timeline.0.path.latency_s", "and finite"),
        ("name: x\nload_balancer: {cross_zone: 1}\n", "load_balancer.cross_zone", "true or false"),
        # out of range
        ("name: x\nhealth_check: {healthy_threshold: 11}\n", "health_check.healthy_threshold", "from 1 to 10"),
        ("name: x\nhealth_check: {unhealthy_threshold: 0}\n", "health_check.unhealthy_threshold", "AWS allows 2-10"),
        ("name: x\nsample_interval_s: 0\n", "sample_interval_s", "greater than 0"),
        ("name: x\nhealth_check: {interval_s: -5}\n", "health_check.interval_s", "greater than 0"),
        ("name: x\ntimeline: [{at: 1, zone: a, path: {state: loss, loss: 1.5}}]\n", "timeline.0.path.loss",
         "less than or equal to 1"),
        ("name: x\ntimeline: [{at: 1, zone: a, path: {state: flap, loss: 0.4, period_s: -2}}]\n",
         "timeline.0.path.period_s", "greater than or equal to 0"),
        ("name: x\ncontrol_plane: {network_manager: {partial_period_s: -1}}\n",
         "control_plane.network_manager.partial_period_s", "greater than or equal to 0"),
        ("name: x\ncontrol_plane: {network_manager: {partial_period_s: 0.0000001}}\n",
         "control_plane.network_manager", "period_s: must be 0 or at least 0.001 sim s"),
        # a path parameter its state does not take, or one it needs, caught on load rather than mid-run
        ("name: x\ntimeline: [{at: 1, zone: a, path: {state: open, period_s: 2}}]\n", "timeline.0.path",
         "path state open does not take period_s (it takes no parameters)"),
        ("name: x\ntimeline: [{at: 1, zone: a, path: {state: flap, period_s: 2}}]\n", "timeline.0.path",
         "path state flap needs loss"),
        ("name: x\ntimeline: [{at: 1, zone: a, backend: {mode: unhealthy, error_rate: -0.1}}]\n",
         "timeline.0.backend.error_rate", "greater than or equal to 0"),
        # unknown fields and values, with a suggestion
        ("name: x\nhealth_check: {intervall_s: 3}\n", "health_check.intervall_s", "did you mean `interval_s`?"),
        ("name: x\ntimeline: [{at: 1, zone: a, regster: {count: 1}}]\n", "timeline.0.regster",
         "did you mean `register`?"),
        ("name: x\ntraffic: {qqq: 1}\n", "traffic.qqq", "allowed here: rate_per_s, timeout_s"),
        ("name: x\ntimeline: [{at: 1, zone: a, path: {state: blackhol}}]\n", "timeline.0.path.state",
         "did you mean `blackhole`?"),
        # events at the same time in conflict
        ("name: x\ntimeline: [{at: 5, zone: a, path: {state: blackhole}}, {at: 5, path: {state: open}}]\n",
         "timeline.1", "timeline[0] and timeline[1] happen at 5 and both change `path`"),
        ("name: x\ntimeline: [{at: 5, targets: [a-0, b-1], backend: {mode: hang}}, {at: 6, zone: b, deregister: "
         "true}, {at: 5, targets: [b-1], backend: {mode: crash}}]\n", "timeline.2",
         "timeline[0] and timeline[2] happen at 5 and both change `backend`"),
        ("name: x\ntimeline: [{at: 5, zone: c, deregister: true}, {at: 5, targets: [c-2], deregister: true}]\n",
         "timeline.1", "both deregister"),
        ("name: x\n" + CP + "timeline: [{at: 9, control: {component: host_manager, action: throttle, per_s: 2}}, "
         "{at: 9, control: {component: host_manager, action: throttle, per_s: 3}}]\n", "timeline.1",
         "timeline[0] and timeline[1] happen at 9 and both do `host_manager throttle`"),
        ("name: x\ntimeline: [{at: 3, set_policy: {policy: dns-failover, param: enabled, value: false}}, "
         "{at: 3, set_policy: {policy: dns-failover, param: enabled, value: true}}]\n", "timeline.1",
         "both set `dns-failover.enabled`"),
        # policies: built-in names and parameters only, checked on load
        ("name: x\npolicy: [fail-open, bogus]\n", "policy.1", "unknown policy 'bogus'; policies: dns-failover"),
        ("name: x\npolicy: ['velocity(windo_s=60)']\n", "policy.0", "allowed: max_removed_percent, window_s"),
        ("name: x\npolicy: [{name: min-healthy, min_pct: 50}]\n", "policy.0", "allowed: min_count, min_percent"),
        ("name: x\npolicy: [{name: panic, threshold_percent: 150}]\n", "policy.0",
         "panic.threshold_percent: input should be less than or equal to 100, got 150"),
        ("name: x\npolicy: ['my.policies:Mine']\n", "policy.0", "lbsim compare SCENARIO --allow-import --policy "
         "my.policies:Mine"),
        ("name: x\npolicy: [scenario+velocity]\n", "policy.0", "only for `--policy` on the command line"),
        ("name: x\npolicy: [{window_s: 60}]\n", "policy.0", "needs a `name`"),
        ("name: x\npolicy: [3]\n", "policy.0", "a policy spec like 'fail-open+dns-failover'"),
        ("name: x\ntimeline: [{at: 3, set_policy: {policy: dns-failover, param: enabld, value: false}}]\n",
         "timeline.0.set_policy.param", "allowed: enabled, min_healthy; did you mean `enabled`?"),
        ("name: x\ntimeline: [{at: 3, set_policy: {policy: dns-failover, param: enabled, value: maybe}}]\n",
         "timeline.0.set_policy.value", "dns-failover.enabled: input should be true or false, got 'maybe'"),
        ("name: x\ntimeline: [{at: 3, set_policy: {policy: aws, param: enabled, value: false}}]\n",
         "timeline.0.set_policy.policy", "preset; name one of its policies: fail-open, dns-failover"),
        # an empty fleet
        ("name: x\ntargets_per_zone: 0\n", "targets_per_zone", "the scenario has no targets"),
        # target ids of this scenario
        ("name: x\ntimeline: [{at: 1, targets: [a-0, z-9, a-x], path: {state: open}}]\n", "timeline.0.targets",
         "['z-9', 'a-x'] are not target ids of this scenario: ids look like <zone>-<n> with a zone of"),
        ("name: x\ntimeline: [{at: 1, targets: [a-i3], path: {state: open}}]\n", "timeline.0.targets",
         "ids look like <zone>-<n> with"),
        ("name: x\n" + CP + "timeline: [{at: 1, targets: [q-i3], path: {state: open}}]\n", "timeline.0.targets",
         "<zone>-<n> or <zone>-i<n> (an instance)"),
        ("name: x\ntimeline: [{at: 1, zone: b, targets: [a-1], path: {state: open}}]\n", "timeline.0.targets",
         "not in zone 'b'"),
        ("name: x\ntimeline: [{at: 1, targets: [], path: {state: open}}]\n", "timeline.0.targets", "at least 1 item"),
        ("name: x\ntimeline: [{at: 1, zone: d, path: {state: open}}]\n", "timeline.0.zone",
         "not one of the zones ['a', 'b', 'c']"),
        # shapes
        ("name: x\nhealth_check:\n", "health_check", "must be a mapping"),
        ("name: x\npolicy: aws\n", "policy", "must be a list"),
    ],
)
def test_errors_name_file_field_and_allowed(tmp_path: Path, text: str, field: str, allowed: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ScenarioError) as ei:
        load_scenario(path)
    msg = str(ei.value)
    assert path in msg and field in msg and allowed in msg, msg


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        ("name: [unclosed\n", "2:1", "expected ',' or ']'"),
        ("name: x\nhealth_check:\n\tinterval_s: 3\n", "3:1", "YAML indents with spaces, not tabs"),
        ("name: x\n  speed: 2\n", "2:8", "check the indentation"),
        ("name: x\nspeed: 3\nduration_s: 9\nspeed: 4\n", "4:1", "key 'speed' is given twice (first at line 2, "
         "column 1)"),
        ("name: x\nhealth_check: {interval_s: 5, interval_s: 6}\n", "2:31",
         "key 'interval_s' is given twice (first at line 2, column 16)"),
    ],
)
def test_invalid_yaml_names_file_line_and_column(tmp_path: Path, text: str, where: str, what: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ScenarioError) as ei:
        load_scenario(path)
    msg = str(ei.value)
    assert msg.startswith(f"{path}:{where}: not valid YAML: ") and what in msg and "\n" not in msg, msg


def test_not_a_mapping_nor_text(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="must be a YAML mapping"):
        load_scenario(write(tmp_path, "- a\n- b\n"))
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(ScenarioError, match="not a text file"):
        load_scenario(str(binary))


def test_several_mistakes_give_one_line_each(tmp_path: Path) -> None:
    fields = write(tmp_path, "name: x\nspeeed: 3\nduration_s: 10s\nhealth_check: {healthy_threshold: 20}\n"
                             "traffic: {rate_per_s: -1}\n")
    with pytest.raises(ScenarioError) as ei:
        load_scenario(fields)
    lines = str(ei.value).splitlines()
    assert lines[0] == f"{fields}: invalid scenario"
    named = sorted(line.split(":")[0].strip() for line in lines[1:])
    assert named == ["duration_s", "health_check.healthy_threshold", "speeed", "traffic.rate_per_s"], lines
    # Mistakes found by looking at the whole scenario are reported together too, in file order.
    whole = write(tmp_path, "name: x\nduration_s: 20\ntargets_per_zone: 0\npolicy: [bogus]\ntimeline:\n"
                            "  - {at: 30, zone: q, backend: {mode: hang}}\n"
                            "  - {at: 5, targets: [z-1], deregister: true}\n")
    with pytest.raises(ScenarioError) as ei:
        load_scenario(whole)
    lines = str(ei.value).splitlines()
    assert [line.split(":")[0].strip() for line in lines[1:]] == [
        "targets_per_zone", "policy.0", "timeline.0.at", "timeline.0.zone", "timeline.1.targets"], lines


def test_validate_subprocess_exits_2_with_the_message_on_stderr_only(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\nhealth_check: {interval_s: 10s}\n")
    r = subprocess.run([sys.executable, "-m", "scenarios.cli", "validate", path], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, r
    assert r.stdout == ""
    err = r.stderr.replace("\n", "")  # rich may wrap at 80 columns off a terminal
    assert path in err and "health_check.interval_s" in err and SECONDS in err, r.stderr
    assert "Traceback" not in r.stderr


BASE: dict[str, Any] = {"name": "x", "duration_s": 100}


def test_numbers_accept_ints_floats_and_yaml_exponents(tmp_path: Path) -> None:
    sc, _ = load_scenario(write(tmp_path, "name: x\nduration_s: 1.5e+2\nspeed: 20\nhealth_check: {interval_s: 3, "
                                          "timeout_s: 0.5, healthy_threshold: 1}\n"))
    assert sc.duration_s == 150.0 and sc.speed == 20.0 and sc.health_check.interval_s == 3.0
    # A threshold of 1 is allowed, but outside what AWS accepts, and said so.
    assert any("healthy_threshold=1" in n and "2-10" in n for n in sc.health_check.aws_notes())


def test_a_fleet_may_start_empty_if_something_adds_targets() -> None:
    register = parse_scenario({**BASE, "targets_per_zone": 0,
                               "timeline": [{"at": 1, "zone": "a", "register": {"count": 2}}]}, "f")
    assert register.targets_per_zone == 0
    launched = parse_scenario({**BASE, "targets_per_zone": 0, "control_plane": {"instances": {"desired_per_zone": 2}},
                               "timeline": [{"at": 1, "targets": ["a-i0"], "path": {"state": "open"}}]}, "f")
    assert launched.timeline[0].targets == ["a-i0"]


def test_the_control_plane_specs_are_the_components_own_configs() -> None:
    """One rule each: a scenario's control_plane sections are the components' settings models, and the
    component's full config is built from them without losing a value."""
    sections = {"network_manager": {"hard_cap": 7, "partial_s": 3}, "host_manager": {"hosts": 9, "lease_ttl_s": 130}}
    cp = parse_scenario({**BASE, "control_plane": sections}, "f").control_plane
    assert cp is not None
    assert isinstance(cp.host_manager, hostmanager.HostManagerSettings)
    assert isinstance(cp.network_manager, netmanager.NetworkManagerSettings)
    assert cp.host_manager.hard_cap == hostmanager.DEFAULT_HARD_CAP
    hm = hostmanager.HostManagerConfig.from_settings(cp.host_manager, key_prefix="k-")
    assert (hm.hosts, hm.lease_ttl_s, hm.key_prefix) == (9, 130, "k-")
    assert dict(hm).items() >= dict(cp.host_manager).items()
    nm = netmanager.NetworkManagerConfig.from_settings(cp.network_manager)
    assert (nm.hard_cap, nm.partial_s, nm.tick_s) == (7, 3, netmanager.NetworkManagerConfig().tick_s)
    # The component's rule, in the scenario's words: a path, a field and what is allowed.
    with pytest.raises(ScenarioError, match=r"control_plane.host_manager: lease_ttl_s \* \(1 - ttl_spread\)"):
        parse_scenario({**BASE, "control_plane": {"host_manager": {"lease_ttl_s": 60}}}, "f")
    with pytest.raises(ValueError, match="lease_ttl_s"):
        hostmanager.HostManagerConfig(lease_ttl_s=60)


def test_the_load_balancer_specs_are_the_lbs_own_configs() -> None:
    """One rule each: health_check, checker and load_balancer are the load balancer's configuration models, and
    the run's BalancerConfig is built from them whole, without losing a value."""
    sc = parse_scenario({**BASE, "zones": ["a", "b"],
                         "health_check": {"interval_s": 4, "timeout_s": 1, "success_codes": "200,204-206", "quorum": 2},
                         "checker": {"max_per_second": math.inf, "burst": 5, "transition_cost": 2},
                         "load_balancer": {"idle_timeout_s": None, "selection": "round-robin"}}, "f")
    assert isinstance(sc.health_check, CheckSettings) and isinstance(sc.checker, CheckerCapacity)
    assert isinstance(sc.load_balancer, BalancerSettings)
    config = balancer_config(sc)
    assert config.zones == ("a", "b") and config.capacity == sc.checker
    assert dict(config.check).items() >= dict(sc.health_check).items()
    assert dict(config).items() >= dict(sc.load_balancer).items()
    assert config.check.success_codes == frozenset({200, 204, 205, 206}) and config.check.quorum == 2
    assert config.capacity.max_per_second == math.inf and config.capacity.burst == 5  # .inf: no rate limit
    assert config.idle_timeout_s is None and config.selection == "round-robin"
    # Written out as the file spells it, so a run directory's scenario.yaml loads again.
    resolved = sc.model_dump(mode="json")
    assert resolved["health_check"]["success_codes"] == "200,204-206"
    assert parse_scenario(resolved, "f") == sc
    # The load balancer's rules, in the scenario's words (the probe's own: run used to refuse this path later).
    with pytest.raises(ScenarioError, match=r"health_check.path: must be '/' followed by visible ASCII"):
        parse_scenario({**BASE, "health_check": {"path": "/\u00e9"}}, "f")
    with pytest.raises(ScenarioError, match=r"checker.max_per_second: must be a number per sim second.*or .inf for no"):
        parse_scenario({**BASE, "checker": {"max_per_second": math.nan}}, "f")
    with pytest.raises(ScenarioError, match=r"checker.max_per_second: must be a number per sim second.*'20/s'"):
        parse_scenario({**BASE, "checker": {"max_per_second": "20/s"}}, "f")
    with pytest.raises(ScenarioError, match=r"checker.burst: must be greater than or equal to 1"):
        parse_scenario({**BASE, "checker": {"burst": 0.5}}, "f")
    with pytest.raises(ValueError, match="AWS allows 2-10"):
        CheckConfig(healthy_threshold=11)
    # The health board's quorum rule, which needs the zones: run used to refuse this with a traceback.
    with pytest.raises(ScenarioError, match=r"health_check.quorum: quorum must be between 1 and the 2 nodes"):
        parse_scenario({**BASE, "zones": ["a", "b"], "health_check": {"quorum": 3}}, "f")
    with pytest.raises(ValueError, match="interval_s"):
        CheckConfig(interval_s="10s")  # type: ignore[arg-type]


def test_the_json_schema_states_every_bound_in_json_schema_terms() -> None:
    """Editors and generators read `exclusiveMinimum`, not pydantic's `gt`: a bound under the wrong name is
    silently ignored, and the schema then accepts what `validate` refuses."""
    schema = Scenario.model_json_schema()
    text = json.dumps(schema)
    for pydantic_name in ('"gt"', '"ge"', '"lt"', '"le"'):
        assert pydantic_name not in text
    validator = jsonschema.Draft202012Validator(schema)
    for name in builtin_names():
        text = resources.files("scenarios.library").joinpath(f"{name}.yaml").read_text(encoding="utf-8")
        assert not list(validator.iter_errors(yaml.safe_load(text))), name
    for bad in [{"health_check": {"interval_s": 0}}, {"traffic": {"rate_per_s": 5001}},
                {"control_plane": {"host_manager": {"hosts": 0}}}, {"health_check": {"jitter": 1}}]:
        assert list(validator.iter_errors({"name": "x", **bad})), bad


def test_zone_names_with_dashes_and_digits_make_target_ids() -> None:
    sc = parse_scenario({**BASE, "zones": ["use1-az1", "use1-az2"],
                         "timeline": [{"at": 1, "targets": ["use1-az1-0", "use1-az2-12"], "deregister": True}]}, "f")
    assert sc.timeline[0].targets == ["use1-az1-0", "use1-az2-12"]


def test_set_policy_of_a_name_that_is_not_built_in_is_left_to_the_run() -> None:
    """A run may have the user's own policy of that name (`lbsim compare --allow-import`); ScenarioRun checks."""
    sc = parse_scenario({**BASE, "timeline": [{"at": 1, "set_policy": {"policy": "mine", "param": "p", "value": 1}}]},
                        "f")
    assert sc.timeline[0].set_policy is not None and sc.timeline[0].set_policy.policy == "mine"


def test_set_policy_values_are_checked_on_the_scenarios_own_policies_in_time_order() -> None:
    entries = [{"name": "min-healthy", "min_percent": 60, "actions": ["dns-failover"]}]
    ok = parse_scenario({**BASE, "policy": entries, "timeline": [
        {"at": 2, "set_policy": {"policy": "min-healthy", "param": "min_percent", "value": 80}},
        {"at": 4, "set_policy": {"policy": "min-healthy", "param": "min_percent", "value": 40}}]}, "f")
    assert len(ok.timeline) == 2
    with pytest.raises(ScenarioError, match=r"timeline\.0\.set_policy\.value: min-healthy\.min_percent: input should "
                                            r"be less than or equal to 100"):
        parse_scenario({**BASE, "policy": entries, "timeline": [
            {"at": 2, "set_policy": {"policy": "min-healthy", "param": "min_percent", "value": 101}}]}, "f")


def ev(**kw: Any) -> Event:
    return Event.model_validate({"at": 5, **kw})


def test_selections_overlap_by_zone_and_targets() -> None:
    path = {"state": "open"}
    assert selections_overlap(ev(zone="a", path=path), ev(path=path))
    assert not selections_overlap(ev(zone="a", path=path), ev(zone="b", path=path))
    assert selections_overlap(ev(zone="a", count=1, path=path), ev(zone="a", count=2, path=path))
    assert selections_overlap(ev(targets=["a-0", "b-1"], path=path), ev(targets=["b-1"], path=path))
    assert not selections_overlap(ev(targets=["a-0"], path=path), ev(targets=["a-1"], path=path))
    assert selections_overlap(ev(targets=["a-i4"], path=path), ev(zone="a", path=path))
    assert not selections_overlap(ev(targets=["a-0"], path=path), ev(zone="b", path=path))


def test_which_events_at_the_same_time_conflict() -> None:
    path, backend = {"state": "blackhole"}, {"mode": "hang"}
    assert event_conflict(ev(zone="a", path=path), ev(zone="a", path=path)) is not None
    # A path and a backend change to the same target are two faults at once (gray-failure does it).
    assert event_conflict(ev(targets=["a-0"], path=path), ev(targets=["a-0"], backend=backend)) is None
    assert event_conflict(ev(zone="a", path=path), ev(zone="a", register={"count": 2})) is None
    assert event_conflict(ev(zone="a", path=path), Event.model_validate({"at": 6, "zone": "a", "path": path})) is None

    def control(**c: Any) -> Event:
        return ev(control=c)

    delay = {"component": "dns", "action": "delay-enactor", "delay_s": 3}
    assert event_conflict(control(**delay, enactor="a"), control(**delay, enactor="a")) is not None
    assert event_conflict(control(**delay, enactor="a"), control(**delay, enactor="b")) is None
    launch = {"component": "instances", "action": "launch", "count": 2}
    assert event_conflict(control(**launch, zone="a"), control(**launch, zone="b")) is None
    assert event_conflict(control(component="host_manager", action="restart"),
                          control(component="host_manager", action="throttle", per_s=2)) is None
    sp = {"policy": "dns-failover", "param": "enabled", "value": False}
    assert event_conflict(ev(set_policy=sp), ev(set_policy={**sp, "param": "min_healthy", "value": 1})) is None
    assert event_conflict(ev(set_policy=sp), ev(set_policy=sp)) is not None


def test_unknown_name_lists_builtins() -> None:
    with pytest.raises(ScenarioError, match="zone-outage"):
        load_scenario("no-such-scenario")


def test_aws_notes_for_compressed_intervals() -> None:
    sc, _ = load_scenario("zone-outage")
    notes = sc.health_check.aws_notes()
    assert any("interval_s=2" in n and "5-300" in n for n in notes)


def test_checker_events_change_the_transition_cost_and_conflict_at_the_same_time(tmp_path: Path) -> None:
    ok = write(tmp_path, "name: x\ntimeline: [{at: 5, checker: {transition_cost: 2}}]\n")
    sc, _ = load_scenario(ok)
    assert sc.timeline[0].action == "checker" and sc.timeline[0].checker is not None
    assert sc.timeline[0].checker.transition_cost == 2
    for text, needle in [
        ("name: x\ntimeline: [{at: 5, checker: {transition_cost: -1}}]\n", "timeline.0.checker.transition_cost"),
        ("name: x\ntimeline: [{at: 5, checker: {transition_cost: 1}}, {at: 5, checker: {transition_cost: 2}}]\n",
         "both change the checker"),
    ]:
        with pytest.raises(ScenarioError) as ei:
            load_scenario(write(tmp_path, text))
        assert needle in str(ei.value), str(ei.value)


def test_ground_truth_flap_threshold_is_a_share_above_zero() -> None:
    assert parse_scenario(dict(BASE), "f").ground_truth.flap_can_serve_below == 0.5
    gt = parse_scenario({**BASE, "ground_truth": {"flap_can_serve_below": 0.3}}, "f").ground_truth
    assert gt.flap_can_serve_below == 0.3
    for bad in (0, 1.5):
        with pytest.raises(ScenarioError, match=r"(?s)f: .*ground_truth\.flap_can_serve_below"):
            parse_scenario({**BASE, "ground_truth": {"flap_can_serve_below": bad}}, "f")


def test_control_actions_set_values_by_the_components_own_rules(tmp_path: Path) -> None:
    """An action may set what the component's settings allow, and no more: a stalled network manager (rate 0)
    can be configured and set alike; a throttle must be positive, said once."""
    sc = parse_scenario({**BASE, "control_plane": {"network_manager": {"rate_per_s": 0}}, "timeline": [
        {"at": 1, "control": {"component": "network_manager", "action": "set-rate", "rate_per_s": 0}}]}, "f")
    assert sc.timeline[0].control is not None and sc.timeline[0].control.params() == {"rate_per_s": 0}
    with pytest.raises(ScenarioError) as ei:
        parse_scenario({**BASE, "control_plane": {}, "timeline": [
            {"at": 1, "control": {"component": "host_manager", "action": "throttle", "per_s": -1}}]}, "f")
    assert str(ei.value).splitlines()[1:] == ["  timeline.0.control.per_s: must be greater than 0 (got -1)"]
