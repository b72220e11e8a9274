"""Scenario files: the built-ins load, and mistakes are reported with file, field and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from scenarios.schema import ScenarioError, builtin_names, load_scenario


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
        ("name: x\nduration_s: 10\ntimeline: [{at: 50, zone: a, path: {state: open}}]\n", "(top level)",
         "after duration_s"),
        ("name: x\nzones: [a, a]\n", "zones", "unique"),
        ("name: x\nhealth_check: {success_codes: 2xx}\n", "health_check.success_codes", "integers or ranges"),
        ("name: x\ntimeline: [{at: 1, register: {count: 2}}]\n", "timeline.0", "needs `zone`"),
        ("name: x\ncontrol_plane: {}\ntimeline: [{at: 1, control: {component: dynamo, action: restore}}]\n",
         "timeline.0.control.component", "'lease_store'"),
        ("name: x\ncontrol_plane: {}\ntimeline: [{at: 1, control: {component: dns, action: explode}}]\n",
         "timeline.0.control", "must be one of ['delay-enactor'"),
        ("name: x\ncontrol_plane: {network_manager: {rate_per_s: -2}}\n", "control_plane.network_manager.rate_per_s",
         "greater than 0"),
        ("name: x\ncontrol_plane: {}\ntimeline: [{at: 1, control: {component: network_manager, action: set-rate, "
         "rate_per_s: -1}}]\n", "timeline.0.control.rate_per_s", "greater than 0"),
        ("name: x\ncontrol_plane: {}\ntimeline: [{at: -5, control: {component: dns, action: restore}}]\n",
         "timeline.0.at", "greater than or equal to 0"),
        ("name: x\ncontrol_plane: {}\ntimeline: [{at: 1, control: {component: dns, action: delay-enactor, "
         "enactor: a}}]\n", "timeline.0.control", "needs delay_s"),
        ("name: x\ncontrol_plane: {}\ntimeline: [{at: 1, control: {component: dns, action: restore, count: 3}}]\n",
         "timeline.0.control", "takes no parameters, not count"),
        ("name: x\ncontrol_plane: {}\ntimeline: [{at: 1, control: {component: dns, action: delay-enactor, "
         "enactor: z, delay_s: 9}}]\n", "(top level)", "not one of the enactors ['a', 'b', 'c']"),
        ("name: x\ntimeline: [{at: 1, control: {component: dns, action: restore}}]\n", "(top level)",
         "no `control_plane` section"),
    ],
)
def test_errors_name_file_field_and_allowed(tmp_path: Path, text: str, field: str, allowed: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ScenarioError) as ei:
        load_scenario(path)
    msg = str(ei.value)
    assert path in msg and field in msg and allowed in msg, msg


def test_not_yaml_and_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="not valid YAML"):
        load_scenario(write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(ScenarioError, match="must be a YAML mapping"):
        load_scenario(write(tmp_path, "- a\n- b\n"))


def test_unknown_name_lists_builtins() -> None:
    with pytest.raises(ScenarioError, match="zone-outage"):
        load_scenario("no-such-scenario")


def test_aws_notes_for_compressed_intervals() -> None:
    sc, _ = load_scenario("zone-outage")
    notes = sc.health_check.aws_notes()
    assert any("interval_s=2" in n and "5-300" in n for n in notes)
