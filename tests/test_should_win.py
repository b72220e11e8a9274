"""Every built-in scenario's claim holds: each `should_win` policy beats naive on the file's `headline` metric.

A real `lbsim compare` per scenario, on the scenario's own seed and speed, as a user would run it. These are long
runs on real sockets (about 6 minutes in all with two jobs), so they are marked `slow`: the README's test command
leaves them out and `.ci/run` runs them (`python3 -m pytest -q -m slow`).
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

CLAIMS = [name for name in builtin_names() if load_scenario(name)[0].should_win]


def test_every_claim_is_checked() -> None:
    """Only the files that claim nothing are left out: gray-failure (no L4 policy can see it) and
    dns-enactor-race (its point is the DNS protections, which no policy changes)."""
    assert set(builtin_names()) - set(CLAIMS) <= {"gray-failure", "dns-enactor-race"}
    assert len(CLAIMS) >= 6


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("name", CLAIMS)
def test_should_win_beats_naive_on_the_headline(name: str, tmp_path: Path) -> None:
    sc, _ = load_scenario(name)
    # Each run takes duration / speed of wall time; two at a time, with room for start-up and a loaded machine.
    runs = 1 + len(sc.should_win)
    bound = 120 + 3 * runs * sc.duration_s / sc.speed
    out = tmp_path / "cmp"
    args = [*LBSIM, "compare", name, "-p", "naive", *[a for p in sc.should_win for a in ("-p", p)],
            "--jobs", "2", "--out", str(out)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=bound, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "compare.json").read_text())
    assert doc["complete"] is True
    base = doc["policies"]["naive"][sc.headline]["mean"]
    for policy in sc.should_win:
        value = doc["policies"][policy][sc.headline]["mean"]
        late = "" if doc["policies"][policy]["fidelity_ok"]["min"] == 1 else " (a run fell behind: fidelity_ok false)"
        assert beats(sc.headline, value, base), f"{name}: {policy} {sc.headline} {value} vs naive {base}{late}"
