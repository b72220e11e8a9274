"""bench/readme_figures.py: every command it would run is valid, and what the commands write renders as tables."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import readme_figures as rf  # noqa: E402

from scenarios.compare import resolve_policy  # noqa: E402
from scenarios.runner import ScenarioRun  # noqa: E402
from scenarios.schema import builtin_names, load_scenario  # noqa: E402


def test_every_compare_names_a_builtin_scenario_and_valid_policies(tmp_path: Path) -> None:
    compares = [st for s in rf.SETS for st in s.steps(tmp_path) if "compare" in st.argv]
    assert len(compares) >= len(rf.BUILTIN_POLICIES) + 3
    for step in compares:
        name = step.argv[step.argv.index("compare") + 1]
        assert name in builtin_names()
        sc, source = load_scenario(name)
        specs = [step.argv[i + 1] for i, a in enumerate(step.argv) if a == "-p"]
        assert specs
        for spec in specs:  # what compare itself checks before it starts anything
            ScenarioRun(sc, [resolve_policy(spec, allow_import=False).spec], source=source)


def test_list_prints_every_set_and_runs_nothing(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(BENCH / "readme_figures.py"), "--list", "--out", str(tmp_path / "f")],
                          capture_output=True, text=True, timeout=30, check=True)
    for s in rf.SETS:
        assert f"{s.name}: " in proc.stdout
    assert not (tmp_path / "f").exists()


def test_compare_json_renders_mean_and_range(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    out.mkdir()
    metric = {"availability": {"mean": 0.975, "min": 0.97, "max": 0.98},
              "dns_failovers": {"mean": 2.0, "min": 2.0, "max": 2.0}}
    (out / "compare.json").write_text(json.dumps({"seeds": [1, 2], "policies": {"naive": metric}}))
    text = rf.compare_table(rf.Step(["py", "-m", "compare", "x"], out=out))
    row = next(line for line in text.splitlines() if line.startswith("| naive |"))
    assert "97.50% [97.00%-98.00%]" in row  # a spread over seeds is shown
    assert "| 2.0 |" in row  # no range where every seed agreed
    assert "| - |" in row  # a metric compare.json lacks
    assert "(no compare.json" in rf.compare_table(rf.Step(["x"], out=tmp_path / "missing"))
