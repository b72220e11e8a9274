"""Scenario files generated from the exported JSON Schema: what `lbsim validate` accepts, `lbsim run` runs; what
it refuses, `run` refuses with the same message; neither ever ends in a traceback.

The files come from `lbsim scenarios schema` (hypothesis-jsonschema), narrowed so that every run is short and
small: a few sim seconds, a few targets, no sub-50 ms intervals. Narrowing only removes files, so each one is
still a file the full schema describes. Both commands run in-process through the CLI (typer's runner), as a user
would call them; a run is real (sockets on 127.0.0.1), a couple of sim seconds at a high speed.
"""

from __future__ import annotations

import copy
import itertools
import json
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis_jsonschema import from_schema
from typer.testing import CliRunner

from lb.policies import POLICY_TYPES, PRESETS
from scenarios.cli import app
from scenarios.schema import Scenario

pytestmark = pytest.mark.timeout(120)

MAX_DURATION_S = 3.0
SPEED = (10, 40)
MAX_EXAMPLES = 25
SHORTEST_S = 0.05  # the shortest interval a generated file may ask for (sim s): no busy loops at high speed
MOST = 20  # whole numbers (counts, hosts, workers) range over at most this many values above their minimum


def _narrow(node: Any, name: str = "") -> None:
    """Narrow every number and list of the schema in place (see the module docstring)."""
    if isinstance(node, list):
        for item in node:
            _narrow(item, name)
        return
    if not isinstance(node, dict):
        return
    kind = node.get("type")
    if kind == "number":
        if node.pop("exclusiveMinimum", None) == 0 or name.endswith("_s"):
            node["minimum"] = max(node.get("minimum", 0), SHORTEST_S)
        node["maximum"] = min(node.get("maximum", 1000), 1000)
    elif kind == "integer":
        low = node.get("minimum", 0)
        node["minimum"] = low
        node["maximum"] = min(node.get("maximum", low + MOST), low + (3 if name == "count" else MOST))
    elif kind == "array":
        node["maxItems"] = min(node.get("maxItems", 3), 3)
    for key, value in node.items():
        if key == "properties":
            for prop, sub in value.items():
                _narrow(sub, prop)
        elif key != "enum" and key != "default":
            _narrow(value, name)


def narrowed_schema() -> dict[str, Any]:
    schema = copy.deepcopy(Scenario.model_json_schema())
    _narrow(schema)
    top = schema["properties"]
    top["duration_s"] = {"type": "number", "minimum": 1, "maximum": MAX_DURATION_S}
    top["speed"] = {"type": "number", "minimum": SPEED[0], "maximum": SPEED[1]}
    # Required here, so that no file falls back on the defaults (300 sim s at speed 10: 30 s a run).
    schema["required"] = sorted({*schema.get("required", []), "duration_s", "speed", "timeline"})
    top["zones"] = {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3,
                    "uniqueItems": True}
    top["targets_per_zone"] = {"type": "integer", "minimum": 0, "maximum": 2}
    for key in ("sample_interval_s", "record_interval_s"):
        top[key] = {"type": "number", "minimum": 0.2, "maximum": 2}
    # Policy names rather than free text, which would nearly always be an unknown policy.
    top["policy"] = {"type": "array", "maxItems": 2, "items": {"enum": sorted({*POLICY_TYPES, *PRESETS})}}
    defs = schema["$defs"]
    event = defs["Event"]["properties"]
    event["at"] = {"type": "number", "minimum": 0, "maximum": MAX_DURATION_S + 1}
    # Names of this scenario's zones and targets, mostly, rather than free text that selects nothing.
    event["zone"] = {"anyOf": [{"enum": ["a", "b", "c", "d"]}, {"type": "null"}]}
    event["targets"] = {"anyOf": [{"type": "array", "minItems": 1, "maxItems": 3,
                                   "items": {"type": "string", "pattern": "^[abc]-i?[0-3]$"}}, {"type": "null"}]}
    # One action each, mostly, as the format asks (events without one are refused, and the refusal is checked
    # often enough by the rest).
    actions = ("path", "backend", "register", "control", "checker", "set_policy")
    defs["Event"]["anyOf"] = [{"required": [action]} for action in actions]
    defs["Event"]["maxProperties"] = 3
    for action in actions:  # given, not null
        event[action] = next(branch for branch in event[action]["anyOf"] if branch.get("type") != "null")
    hc = defs["HealthCheckSpec"]["properties"]
    hc["interval_s"] = {"type": "number", "minimum": 0.5, "maximum": 5}
    hc["timeout_s"] = {"type": "number", "minimum": 0.2, "maximum": 2}
    hc["path"] = {"type": "string", "pattern": "^/[a-z/]{0,8}$"}
    hc["success_codes"] = {"enum": ["200", "200-399", "200,204", "500"]}
    defs["TrafficSpec"]["properties"]["rate_per_s"] = {"type": "number", "minimum": 0, "maximum": 50}
    defs["HostManagerSettings"]["properties"]["hosts"] = {"type": "integer", "minimum": 1, "maximum": 12}
    return schema


SCHEMA = narrowed_schema()
_names = itertools.count()


def _error_lines(output: str) -> list[str]:
    """The refusal itself: `run` adds notes and a progress bar around it, `validate` adds notes."""
    return [line for line in output.splitlines() if line.startswith(("error:", "  "))]


# Generated names hold characters no font has; the plot draws them as boxes, and matplotlib says so.
@pytest.mark.filterwarnings("ignore:Glyph .* missing from font")
@settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(from_schema(SCHEMA))
def test_what_validate_accepts_runs_and_what_it_refuses_run_refuses_alike(tmp_path_factory: pytest.TempPathFactory,
                                                                        data: dict[str, Any]) -> None:
    where = tmp_path_factory.mktemp(f"fuzz{next(_names)}")
    path = where / "scenario.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    runner = CliRunner()
    checked = runner.invoke(app, ["validate", str(path)])
    ran = runner.invoke(app, ["run", str(path), "--quiet", "--out", str(where / "run"), "--loop", "asyncio"])
    for result, command in ((checked, "validate"), (ran, "run")):
        shown = f"{command} of {json.dumps(data)[:3000]}:\n{result.output}"
        assert result.exit_code in (0, 2), shown + f"\n{result.exception!r}"
        assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), shown
        assert "Traceback" not in result.output, shown
    if checked.exit_code == 2:
        assert ran.exit_code == 2, f"validate refused, run did not:\n{checked.output}\n{ran.output}"
        assert _error_lines(ran.output) == _error_lines(checked.output), (checked.output, ran.output)
        assert str(path) in checked.output
        assert not (where / "run").exists(), "a refused file must not leave a run directory"
    else:
        assert ran.exit_code == 0, f"validate accepted {json.dumps(data)}, run refused:\n{ran.output}"
        summary = json.loads((where / "run" / "summary.json").read_text())
        assert summary["complete"] and summary["duration_s"] == pytest.approx(data["duration_s"], abs=1e-3)


def test_the_narrowed_schema_still_reaches_runs_and_refusals() -> None:
    """The generator must produce both kinds of file, or the test above would check only one path. Counted on
    the same examples it draws (derandomized), by validation alone, without running anything."""
    from scenarios.schema import ScenarioError, parse_scenario

    outcomes: list[bool] = []

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(from_schema(SCHEMA))
    def draw(data: dict[str, Any]) -> None:
        try:
            parse_scenario(data, "f")
        except ScenarioError:
            outcomes.append(False)
        else:
            outcomes.append(True)

    draw()
    assert any(outcomes) and not all(outcomes), outcomes

