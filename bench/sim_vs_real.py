"""How faithfully the sim world reproduces the real one: each scenario's outcome metrics and stages in both worlds.

For every built-in scenario (or `--scenarios a,b`), with its `should_win` policies and `naive`, it runs two
`lbsim compare` children from the scenario's own seed: `--world sim` over `--sim-seeds` seeds (default 5, 2 jobs)
and `--world real` over `--real-seeds` seeds (default 3, one run at a time, so no run competes for the CPU).
Their directories go to `--out DIR/SCENARIO/{sim,real}` (default: a temporary directory, removed at the end).

Metrics: every numeric summary.json metric that compare aggregates (availability, worst_minute_availability,
capacity_lost_target_seconds, false_ejection_target_seconds, missed_ejection_target_seconds, ejections, flaps,
dns_failovers, withheld_by_reason.*, ...); run.json's figures (wall_s, loop lag, fidelity_ok) and what names a
run rather than measures it (speed, duration_s, complete) are left out. The means are compare's own
(`scenarios.compare.aggregate`, what compare.json holds); the spread comes from each run's summary.json.

The band: a sim mean is inside when |sim mean - real mean| <= max(2 x real standard error, 10% of the real range),
i.e. within 2 standard errors of the real mean or within 10% of the real range (max - min) of it, whichever is
wider. The standard error is the sample standard deviation over sqrt(n) of the real runs that have the metric (0
with one run), so with a zero real range and zero standard error only an equal mean is inside. A metric that
only one world reports (a time to detect with no failure detected) is outside. `latency_p99_s` and
`checker_lateness_p99_s` are timing metrics: the sim network's latency and a checker that is never late differ
from loopback by design, so they are shown but listed apart (`timing_outside`), not in `metrics_outside`.

Stages (scenarios with a control plane, `aws-2025-10-20`): per policy and stage, the sim runs' start times
against the median start of the real runs that had the stage; a stage is inside when every sim run has it and
starts within 10 sim s of that median. A stage that only one world shows is outside (real median null, or no
sim starts).

    python3 bench/sim_vs_real.py                                   # all built-ins: about 50 minutes (see below)
    python3 bench/sim_vs_real.py --scenarios zone-outage --sim-seeds 2 --real-seeds 1    # about 1 minute
    python3 bench/sim_vs_real.py --estimate                        # the estimate only, runs nothing

How long: a real run takes its duration_s / speed of wall time plus ~3 s start-up (aws-2025-10-20: 480 s at
speed 5, 99 s); a sim run ~3 s for a 150-s scenario, ~20 s for aws-2025-10-20. All built-ins with the default
seeds: 69 real runs (~36 min) and 115 sim runs (~10 min at 2 jobs), about 50 minutes on the 2-core CI machine
(`--estimate` prints it per scenario).

Prints, per scenario and policy, the over-seeds table and a per-seed listing, then as its LAST line one JSON
object: {"metrics_outside": [[scenario, policy, metric], ...], "timing_outside": [...], "stages_outside":
[[stage, sim_starts, real_median, policy], ...], "scenarios": [...], "wall_s": total, "machine": "..."}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout as `python3 bench/...`

from scenarios.compare import aggregate
from scenarios.schema import Scenario, builtin_names, load_scenario
from scenarios.stages import STAGE_NAMES
from worlds.real import Stopwatch

LBSIM = [sys.executable, "-m", "scenarios.cli"]
# Aggregated by compare but not outcomes: run.json's figures and what names the run.
NOT_OUTCOMES = frozenset({"speed", "duration_s", "complete", "wall_s", "loop_lag_p99_s", "fidelity_ok"})
TIMING_METRICS = frozenset({"latency_p99_s", "checker_lateness_p99_s"})
STAGE_TOLERANCE_S = 10.0
STARTUP_S = 3.0  # a child's start-up, measured: `lbsim run zone-outage --world sim` takes ~5 s for 3.3 s of run
SIM_S_PER_WALL_S = 25.0  # aws-2025-10-20: 480 sim s in ~20 s wall; 150-s scenarios ~3 s

Values = list[float | None]  # one per run, None where the run did not report the metric


# ---------------------------------------------------------------------------------------------------------
# The band, the metric rows and the stages (pure)


@dataclass(frozen=True, slots=True)
class Band:
    real_mean: float
    stderr: float
    real_min: float
    real_max: float
    width: float  # max(2 x stderr, 10% of the range)
    inside: bool


def band(sim_mean: float, real: Sequence[float]) -> Band:
    """Whether `sim_mean` is within max(2 standard errors, 10% of the range) of the mean of `real` (not empty)."""
    if not real:
        raise ValueError("no real values")
    n = len(real)
    mean = math.fsum(real) / n
    stderr = statistics.stdev(real) / math.sqrt(n) if n > 1 else 0.0
    lo, hi = min(real), max(real)
    width = max(2 * stderr, 0.1 * (hi - lo))
    # Means of the same values computed in another order may differ in the last bits: that is not a difference.
    slack = 1e-9 * max(1.0, abs(mean), abs(sim_mean))
    return Band(mean, stderr, lo, hi, width, abs(sim_mean - mean) <= width + slack)


def run_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """One run's outcome metrics, flattened the way compare flattens them (`withheld_by_reason.budget`)."""
    return {k: v["mean"] for k, v in aggregate([summary]).items() if k not in NOT_OUTCOMES}


@dataclass(frozen=True, slots=True)
class MetricRow:
    metric: str
    sim: Values  # per sim run, in seed order
    real: Values
    sim_mean: float | None  # compare's mean over the runs that reported it; None if none did
    band: Band | None  # None when either world has no value

    @property
    def inside(self) -> bool:
        return self.band is not None and self.band.inside

    @property
    def all_zero(self) -> bool:
        return all(v == 0 for v in (*self.sim, *self.real))


def metric_rows(sim_summaries: Sequence[Mapping[str, Any]],
                real_summaries: Sequence[Mapping[str, Any]]) -> list[MetricRow]:
    """Every outcome metric either world reports, in first-seen order, with its per-run values and band."""
    sim_runs = [run_metrics(s) for s in sim_summaries]
    real_runs = [run_metrics(s) for s in real_summaries]
    sim_agg = aggregate(sim_summaries)  # the means compare.json holds
    names = list(dict.fromkeys(k for r in (*real_runs, *sim_runs) for k in r))
    rows = []
    for name in names:
        sim: Values = [r.get(name) for r in sim_runs]
        real: Values = [r.get(name) for r in real_runs]
        sim_mean = sim_agg[name]["mean"] if name in sim_agg else None
        present = [v for v in real if v is not None]
        rows.append(MetricRow(name, sim, real, sim_mean,
                              band(sim_mean, present) if sim_mean is not None and present else None))
    return rows


@dataclass(frozen=True, slots=True)
class StageRow:
    name: str
    sim: Values  # each sim run's start of the stage (None: the run did not have it)
    real: Values
    real_median: float | None  # over the real runs that had it

    @property
    def diffs(self) -> Values:
        m = self.real_median
        return [None if s is None or m is None else s - m for s in self.sim]

    @property
    def inside(self) -> bool:
        return self.real_median is not None and all(
            d is not None and abs(d) <= STAGE_TOLERANCE_S + 1e-9 for d in self.diffs)


def _starts(stages: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    return {str(g["name"]): float(g["start_s"]) for g in stages}


def stage_rows(sim_stages: Sequence[Sequence[Mapping[str, Any]]],
               real_stages: Sequence[Sequence[Mapping[str, Any]]]) -> list[StageRow]:
    """Each stage any run of either world had (summary.json `stages`, one list per run), in the cascade's order."""
    sim = [_starts(s) for s in sim_stages]
    real = [_starts(s) for s in real_stages]
    seen = {name for run in (*sim, *real) for name in run}
    order = [n for n in STAGE_NAMES if n in seen] + sorted(seen - set(STAGE_NAMES))
    rows = []
    for name in order:
        real_starts = [r[name] for r in real if name in r]
        rows.append(StageRow(name, [r.get(name) for r in sim], [r.get(name) for r in real],
                             statistics.median(real_starts) if real_starts else None))
    return rows


def policies_of(sc: Scenario) -> list[str]:
    """naive (the baseline) and the scenario's should_win policies."""
    return list(dict.fromkeys(["naive", *sc.should_win]))


def estimate_s(sc: Scenario, sim_seeds: int, real_seeds: int, sim_jobs: int) -> tuple[float, float]:
    """Rough wall time of a scenario's real and sim compares (from its duration_s / speed; see the docstring)."""
    n = len(policies_of(sc))
    real = n * real_seeds * (sc.duration_s / sc.speed + STARTUP_S)
    sim = n * sim_seeds * (sc.duration_s / SIM_S_PER_WALL_S + STARTUP_S) / max(1, sim_jobs)
    return real, sim


# ---------------------------------------------------------------------------------------------------------
# Running compares (the shell)


def run_compare(scenario: str, sc: Scenario, world: str, seeds: int, jobs: int, out: Path) -> dict[str, Any]:
    """One `lbsim compare` child; its progress goes to our stderr, its tables to out/compare.log."""
    argv = [*LBSIM, "compare", scenario, "--world", world, "--seeds", str(seeds), "--seed", str(sc.seed),
            "--jobs", str(jobs), "--out", str(out)]
    for p in policies_of(sc):
        argv += ["-p", p]
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{world}-compare.log"
    with log.open("w") as f:
        proc = subprocess.run(argv, stdout=f, stderr=None, check=False)
    doc_path = out / "compare.json"
    if not doc_path.is_file():
        raise SystemExit(f"lbsim compare {scenario} --world {world} wrote no compare.json (exit {proc.returncode}); "
                         f"see {log}")
    doc: dict[str, Any] = json.loads(doc_path.read_text())
    if proc.returncode != 0 or not doc.get("complete"):
        print(f"warning: {scenario} --world {world}: compare exited {proc.returncode}, complete="
              f"{doc.get('complete')}; using the runs that wrote a summary", file=sys.stderr)
    return doc


def summaries(doc: Mapping[str, Any], root: Path, policy: str) -> list[dict[str, Any]]:
    """The summary.json of each run of `policy` in a compare (its runs that wrote one), in seed order."""
    runs = sorted((r for r in doc["runs"] if r["policy"] == policy), key=lambda r: r["seed"])
    return [json.loads((root / r["dir"] / "summary.json").read_text()) for r in runs]


def seed_list(runs: Sequence[Mapping[str, Any]]) -> str:
    return " ".join(str(r.get("seed")) for r in runs) or "none"


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v == 0:
        return "0"
    if abs(v) >= 1000 or float(v).is_integer():
        return f"{v:.0f}"
    return f"{v:.4g}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  ") -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = [indent + "  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines += [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def print_metrics(rows: Sequence[MetricRow], seeds: str) -> None:
    shown = [r for r in rows if not r.all_zero]
    body = []
    for r in shown:
        b = r.band
        verdict = "yes" if r.inside else "no"
        if r.metric in TIMING_METRICS:
            verdict += " (timing)"
        body.append([r.metric, fmt(r.sim_mean), fmt(b.real_mean if b else None), fmt(b.stderr if b else None),
                     f"{fmt(b.real_min)}..{fmt(b.real_max)}" if b else "-", verdict])
    print(table(["metric", "sim mean", "real mean", "real stderr", "real range", "in band"], body))
    zero = [r.metric for r in rows if r.all_zero]
    if zero:
        print(f"  0 in every run of both worlds (in band): {', '.join(zero)}")
    print(f"  per seed ({seeds}):")
    width = max((len(r.metric) for r in shown), default=0)
    for r in shown:
        print(f"    {r.metric.ljust(width)}  {' '.join(fmt(v) for v in r.sim)} | {' '.join(fmt(v) for v in r.real)}")


def print_stages(rows: Sequence[StageRow]) -> None:
    body = []
    for r in rows:
        have_sim = sum(v is not None for v in r.sim)
        have_real = sum(v is not None for v in r.real)
        body.append([r.name, f"{have_sim}/{len(r.sim)}", " ".join(fmt(v) for v in r.sim),
                     f"{have_real}/{len(r.real)}", fmt(r.real_median),
                     " ".join(f"{d:+.1f}" if d is not None else "-" for d in r.diffs),
                     "yes" if r.inside else "no"])
    print(table(["stage", "sim runs", "sim starts (s)", "real runs", "real median", "sim - real median",
                 f"within {STAGE_TOLERANCE_S:g} s"], body))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", default="", help="comma-separated scenarios (default: every built-in)")
    ap.add_argument("--sim-seeds", type=int, default=5, help="sim runs per policy (default 5)")
    ap.add_argument("--real-seeds", type=int, default=3, help="real runs per policy (default 3)")
    ap.add_argument("--sim-jobs", type=int, default=2, help="sim runs at a time (default 2; real runs one at a time)")
    ap.add_argument("--out", type=Path, default=None, help="keep the compare directories here (default: a temp dir)")
    ap.add_argument("--estimate", action="store_true", help="print how long it would take, run nothing")
    args = ap.parse_args(argv)
    if args.sim_seeds < 1 or args.real_seeds < 1 or args.sim_jobs < 1:
        ap.error("--sim-seeds, --real-seeds and --sim-jobs must be >= 1")
    names = [s for s in args.scenarios.split(",") if s] or builtin_names()
    unknown = sorted(set(names) - set(builtin_names()))
    if unknown:
        ap.error(f"not built-in scenarios: {', '.join(unknown)} (built-ins: {', '.join(builtin_names())})")
    scenarios = {n: load_scenario(n)[0] for n in names}
    total_real = total_sim = 0.0
    for n, sc in scenarios.items():
        real_s, sim_s = estimate_s(sc, args.sim_seeds, args.real_seeds, args.sim_jobs)
        total_real, total_sim = total_real + real_s, total_sim + sim_s
        if args.estimate:
            print(f"{n}: {len(policies_of(sc))} policies, real ~{real_s / 60:.1f} min, sim ~{sim_s / 60:.1f} min")
    print(f"estimated wall time: ~{(total_real + total_sim) / 60:.0f} min (real ~{total_real / 60:.0f}, "
          f"sim ~{total_sim / 60:.0f})", flush=True)
    if args.estimate:
        return 0
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    watch = Stopwatch()
    metrics_outside: list[list[str]] = []
    timing_outside: list[list[str]] = []
    stages_outside: list[list[Any]] = []
    with tempfile.TemporaryDirectory(prefix="lbsim-bench-svr-") as tmp:
        root = args.out if args.out is not None else Path(tmp)
        for name, sc in scenarios.items():
            sim_dir, real_dir = root / name / "sim", root / name / "real"
            print(f"\n{name}: sim {args.sim_seeds} seeds, real {args.real_seeds} seeds from seed {sc.seed}, "
                  f"policies {', '.join(policies_of(sc))}", flush=True)
            sim_doc = run_compare(name, sc, "sim", args.sim_seeds, args.sim_jobs, sim_dir)
            real_doc = run_compare(name, sc, "real", args.real_seeds, 1, real_dir)
            for policy in policies_of(sc):
                sims, reals = summaries(sim_doc, sim_dir, policy), summaries(real_doc, real_dir, policy)
                print(f"\n== {name} / {policy}: {len(sims)} sim runs, {len(reals)} real runs")
                rows = metric_rows(sims, reals)
                print_metrics(rows, f"sim seeds {seed_list(sims)} | real seeds {seed_list(reals)}")
                for r in rows:
                    if not r.inside:
                        (timing_outside if r.metric in TIMING_METRICS else metrics_outside).append(
                            [name, policy, r.metric])
                if any(s.get("stages") for s in (*sims, *reals)):
                    srows = stage_rows([s.get("stages", []) for s in sims], [s.get("stages", []) for s in reals])
                    print_stages(srows)
                    stages_outside += [[r.name, [v for v in r.sim if v is not None], r.real_median, policy]
                                       for r in srows if not r.inside]
    wall = watch.elapsed()
    print(f"\n{len(metrics_outside)} metrics outside the band ({len(timing_outside)} timing metrics apart), "
          f"{len(stages_outside)} stages outside; {wall:.0f} s wall")
    print(json.dumps({"metrics_outside": metrics_outside, "timing_outside": timing_outside,
                      "stages_outside": stages_outside, "scenarios": names, "wall_s": round(wall, 1),
                      "machine": machine}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
