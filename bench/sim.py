"""How much faster the simulated world runs lbsim than the real one, and how far it scales.

1. `aws-2025-10-20` (its own seed and policies) in both worlds, `--rounds` times, one run at a time: wall time of
   each, the real run's CPU time, and the ratio real wall / sim wall per round (median and spread).
2. `zone-outage` in the sim world with N targets for each N of `--targets` (100, 500, 2,000): `--set
   targets_per_zone` over its three zones, and a fourth zone (`--set zones=[a,b,c,d]`) past the schema's 500 per
   zone; sim seconds per wall second over the scenario's 150 s.
3. The same at `--hour-targets` (2,000) for one sim hour (`--set duration_s=3600`): the wall time it takes.

Every run is a real `lbsim run` child process, so start-up is included in its wall time; each child's own
`run.json` gives the run's wall time without start-up (`wall_s`), which is what the ratios use.

    python3 bench/sim.py                      # everything: about 12 minutes on the 2-core CI machine
    python3 bench/sim.py --rounds 1 --targets 100 --hour-targets 0

Prints a table, then, as its LAST line, one JSON object:
{"speedup_vs_real": median, "speedup_rounds": [...], "sim_s_per_wall_s": {"100": x, ...}, "hour": {...}, ...}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout as `python3 bench/...`

from worlds.real import Stopwatch

LBSIM = [sys.executable, "-m", "scenarios.cli"]


def lbsim_run(scenario: str, world: str, out: Path, *extra: str) -> dict[str, Any]:
    """One `lbsim run` child: its wall time (with start-up), CPU time, and its run.json and summary.json."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    watch = Stopwatch()
    proc = subprocess.run([*LBSIM, "run", scenario, "--world", world, "--quiet", "--out", str(out), *extra],
                          capture_output=True, text=True, check=False)
    wall = watch.elapsed()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"lbsim run {scenario} --world {world} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    info = json.loads((out / "run.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"command_wall_s": wall, "run_wall_s": float(info["wall_s"]), "cpu_s": cpu,
            "sim_s": float(summary["duration_s"]), "fidelity_ok": info["fidelity_ok"]}


def fleet_of(n: int) -> tuple[int, list[str]]:
    """About n targets as `--set` options: zone-outage's three zones, more zones past the schema's 500 per zone."""
    zones = max(3, math.ceil(n / 500))
    per_zone = math.ceil(n / zones)
    names = ",".join("abcdefghijklmnopqrstuvwxyz"[:zones])
    return zones * per_zone, ["--set", f"zones=[{names}]", "--set", f"targets_per_zone={per_zone}"]


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} (min {min(values):.1f}, max {max(values):.1f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="aws-2025-10-20 runs per world (default 3)")
    ap.add_argument("--targets", default="100,500,2000", help="target counts for the scaling runs")
    ap.add_argument("--hour-targets", type=int, default=2000, help="targets for the one-sim-hour run; 0 skips it")
    args = ap.parse_args()
    counts = [int(x) for x in args.targets.split(",") if x]
    result: dict[str, Any] = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
                                         f"{platform.python_version()}"}
    with tempfile.TemporaryDirectory(prefix="lbsim-bench-sim-") as tmp:
        root = Path(tmp)
        rounds = []
        for i in range(args.rounds):
            real = lbsim_run("aws-2025-10-20", "real", root / f"real-{i}")
            sim = lbsim_run("aws-2025-10-20", "sim", root / f"sim-{i}")
            rounds.append({"real": real, "sim": sim, "speedup": real["run_wall_s"] / sim["run_wall_s"]})
            print(f"round {i + 1}: real {real['run_wall_s']:.1f} s wall ({real['cpu_s']:.1f} CPU s), "
                  f"sim {sim['run_wall_s']:.1f} s wall: {rounds[-1]['speedup']:.1f}x", flush=True)
        scale: dict[str, Any] = {}
        for n in counts:
            targets, sets = fleet_of(n)
            run = lbsim_run("zone-outage", "sim", root / f"scale-{n}", *sets) | {"targets": targets}
            scale[str(n)] = run
            print(f"{run['targets']} targets: {run['sim_s'] / run['run_wall_s']:.1f} sim s per wall s "
                  f"({run['run_wall_s']:.1f} s wall for {run['sim_s']:.0f} sim s)", flush=True)
        hour = None
        if args.hour_targets:
            targets, sets = fleet_of(args.hour_targets)
            hour = lbsim_run("zone-outage", "sim", root / "hour", *sets, "--set", "duration_s=3600") | {
                "targets": targets}
            print(f"{hour['targets']} targets for one sim hour: {hour['run_wall_s']:.1f} s wall", flush=True)
    if rounds:
        speedups = [r["speedup"] for r in rounds]
        print(f"\naws-2025-10-20, real / sim wall time: {spread(speedups)} over {len(rounds)} rounds")
        result["speedup_vs_real"] = round(statistics.median(speedups), 2)
        result["speedup_rounds"] = [round(x, 2) for x in speedups]
        result["real_wall_s"] = [round(r["real"]["run_wall_s"], 1) for r in rounds]
        result["real_cpu_s"] = [round(r["real"]["cpu_s"], 1) for r in rounds]
        result["sim_wall_s"] = [round(r["sim"]["run_wall_s"], 2) for r in rounds]
    result["sim_s_per_wall_s"] = {n: round(r["sim_s"] / r["run_wall_s"], 1) for n, r in scale.items()}
    if hour is not None:
        result["hour"] = {"targets": hour["targets"], "sim_s": hour["sim_s"],
                          "wall_s": round(hour["run_wall_s"], 1)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
