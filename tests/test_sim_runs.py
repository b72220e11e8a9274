"""Whole scenarios in the simulated world: byte-identical reruns, the 2025-10-20 cascade, and every claim.

A sim run is a pure function of its scenario, policy and seed, so these assert exact things: the same bytes from
two runs in two processes with different hash seeds, and the eight stages of `aws-2025-10-20` in causal order.
The `should_win` claims of every built-in scenario run here over five seeds each (in the real world, over one
seed, they are `slow` tests: see tests/test_should_win.py).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from support import LBSIM

from scenarios.outcomes import beats
from scenarios.schema import builtin_names, load_scenario
from scenarios.stages import STAGE_NAMES

CLAIMS = [name for name in builtin_names() if load_scenario(name)[0].should_win]
DETERMINISTIC_FILES = ("summary.json", "events.jsonl", "timeseries.csv", "requests.csv")
# Which stage each stage follows from (scenarios/stages.py): none may start before its cause.
CAUSES = {
    "leases-expiring": "dns-record-empty",
    "host-manager-collapse": "leases-expiring",
    "leases-restored": "host-manager-collapse",
    "network-backlog": "leases-restored",
    "health-check-flapping": "network-backlog",
    "dns-failover-capacity-removed": "network-backlog",
}


def sim_run(scenario: str, out: Path, *args: str, hash_seed: str = "0") -> dict[str, object]:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    proc = subprocess.run([*LBSIM, "run", scenario, "--world", "sim", "--quiet", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary: dict[str, object] = json.loads((out / "summary.json").read_text())
    return summary


@pytest.mark.timeout(600)
def test_two_sim_runs_of_a_seed_write_the_same_bytes(tmp_path: Path) -> None:
    """Different processes, different hash seeds (set iteration order), the same files, byte for byte."""
    first = sim_run("aws-2025-10-20", tmp_path / "a", "--seed", "3", hash_seed="1")
    sim_run("aws-2025-10-20", tmp_path / "b", "--seed", "3", hash_seed="2")
    assert first["world"] == "sim" and first["complete"] is True and first["speed"] is None
    for name in DETERMINISTIC_FILES:
        a = (tmp_path / "a" / name).read_bytes()
        b = (tmp_path / "b" / name).read_bytes()
        assert a == b, f"{name} differs between two sim runs of one seed"
        assert len(a) > 100, f"{name} is (nearly) empty"


@pytest.mark.timeout(600)
def test_the_2025_10_20_cascade_shows_its_eight_stages_in_causal_order(tmp_path: Path) -> None:
    summary = sim_run("aws-2025-10-20", tmp_path / "run")
    stages = {s["name"]: s for s in summary["stages"]}  # type: ignore[union-attr]
    assert sorted(stages) == sorted(STAGE_NAMES)
    for stage, cause in CAUSES.items():
        assert stages[stage]["start_s"] >= stages[cause]["start_s"], f"{stage} started before {cause}"
    others = [s for name, s in stages.items() if name != "recovered"]
    assert stages["recovered"]["start_s"] >= max(s["end_s"] for s in others)


@pytest.mark.parametrize("name", [name for name in builtin_names() if name not in CLAIMS])
def test_the_built_ins_that_claim_nothing_run_in_the_sim_world_too(name: str, tmp_path: Path) -> None:
    """The claims below run every other built-in in the sim world; these two complete there as well."""
    summary = sim_run(name, tmp_path / "run")
    assert summary["complete"] is True and summary["world"] == "sim"
    assert summary["requests_total"] > 0  # type: ignore[operator]


@pytest.mark.timeout(900)  # 15 runs of up to 20 s each, two at a time, on a loaded machine
@pytest.mark.parametrize("name", CLAIMS)
def test_should_win_beats_naive_on_the_headline_over_five_seeds(name: str, tmp_path: Path) -> None:
    sc, _ = load_scenario(name)
    out = tmp_path / "cmp"
    args = [*LBSIM, "compare", name, "--world", "sim", "-p", "naive",
            *[a for p in sc.should_win for a in ("-p", p)], "--seeds", "5", "--jobs", "2", "--out", str(out)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "compare.json").read_text())
    assert doc["complete"] is True and doc["world"] == "sim" and len(doc["seeds"]) == 5
    base = doc["policies"]["naive"][sc.headline]["mean"]
    for policy in sc.should_win:
        value = doc["policies"][policy][sc.headline]["mean"]
        assert beats(sc.headline, value, base), f"{name}: {policy} {sc.headline} {value} vs naive {base} (5 seeds)"
