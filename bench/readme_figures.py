"""Regenerates the README's measured figures: runs the command behind each table and writes them to one file.

Every table of measured figures in the README names its command; this script runs those commands, the same way,
and renders what they produced into FIGURES.md in an output directory, table by table, so a reader can put it
beside the README and see what moved on their machine. Run it on a quiet machine: the figures are real-time
measurements.

    python3 bench/readme_figures.py --list                 # the figure sets and their commands
    python3 bench/readme_figures.py --only builtins        # one set (repeatable); default: every set
    python3 bench/readme_figures.py --out runs/figures     # default: runs/readme-figures-TIME

Sets and wall time on a 2-core machine: run-aws (2 min), compare-aws (15 min), builtins (8 min), speed
(20 min), dns-race (seconds), perf (10 min), soak (10 min). Each set's raw output (run and compare directories,
bench logs) stays under the output directory. The last line printed is one JSON object: the output file and,
per set, whether its commands succeeded.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from scenarios.compare import TABLE_METRICS

ROOT = Path(__file__).resolve().parent.parent
LBSIM = [sys.executable, "-m", "scenarios.cli"]
BENCH = [sys.executable]

# The columns of a compare table in FIGURES.md: compare's own table metrics (up to the counts), formatted by unit.
_FORMATS = {"points": "{:.2%}", "target-s": "{:.0f}", "": "{:.1f}"}
COMPARE_COLUMNS: list[tuple[str, str, str]] = [
    (key, f"{words} (target-s)" if unit == "target-s" else words, _FORMATS[unit])
    for key, words, unit in TABLE_METRICS if unit in _FORMATS
]

# The README's "Built-in scenarios" table: each scenario with the policies its row reports (seed 1).
BUILTIN_POLICIES: dict[str, list[str]] = {
    "zone-outage": ["naive", "fail-open", "min-healthy", "flap-damping", "passive", "aws", "velocity",
                    "max-ejection", "aws-velocity", "envoy", "panic", "panic(confirm_failures=0)"],
    "flapping-new-targets": ["naive", "scenario", "velocity", "passive", "flap-damping"],
    "network-backlog-scale-out": ["naive", "scenario", "fail-open", "scenario+velocity", "flap-damping"],
    "checker-overload": ["naive", "aws", "fail-open", "panic", "velocity"],
    "deep-health-dependency": ["naive", "fail-open", "panic", "max-ejection", "velocity"],
    "gray-failure": ["naive", "aws", "passive"],
    "recovery-herd": ["naive", "aws", "fail-open", "panic", "flap-damping"],
}
AWS_COMPARE = ["naive", "scenario", "scenario+velocity", "fail-open", "panic", "velocity"]


@dataclass(frozen=True)
class Step:
    """One command of a figure set, and where its output goes."""

    argv: list[str]
    out: Path | None = None  # a run or compare directory the command writes (given to it as --out)
    log: str | None = None  # a file name under the set's directory for the command's stdout


@dataclass(frozen=True)
class FigureSet:
    name: str
    title: str
    readme: str  # the README section whose table this regenerates
    steps: Callable[[Path], list[Step]]
    render: Callable[[Sequence[Step]], str]


def _compare(scenario: str, policies: Sequence[str], out: Path, *extra: str) -> Step:
    argv = [*LBSIM, "compare", scenario, *[a for p in policies for a in ("-p", p)], "--jobs", "2", *extra]
    return Step([*argv, "--out", str(out)], out=out)


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def compare_table(step: Step) -> str:
    """A compare.json as a markdown table: mean and, with several seeds, [min-max]."""
    assert step.out is not None
    path = step.out / "compare.json"
    if not path.exists():
        return f"(no compare.json in {step.out}: the command failed)\n"
    doc = json.loads(path.read_text())
    seeds = doc["seeds"]
    lines = [f"`{shlex.join(step.argv[2:])}` (seeds {', '.join(map(str, seeds))})", "",
             "| policy | " + " | ".join(h for _, h, _ in COMPARE_COLUMNS) + " |",
             "|---" * (len(COMPARE_COLUMNS) + 1) + "|"]
    for policy, metrics in doc["policies"].items():
        cells = []
        for key, _, spec in COMPARE_COLUMNS:
            m = metrics.get(key)
            if m is None:
                cells.append("-")
            elif len(seeds) > 1 and m["min"] != m["max"]:
                cells.append(f"{fmt(m['mean'], spec)} [{fmt(m['min'], spec)}-{fmt(m['max'], spec)}]")
            else:
                cells.append(fmt(m["mean"], spec))
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_compares(steps: Sequence[Step]) -> str:
    return "\n".join(compare_table(s) for s in steps)


def render_run(steps: Sequence[Step]) -> str:
    (step,) = steps
    assert step.out is not None
    path = step.out / "summary.json"
    if not path.exists():
        return f"(no summary.json in {step.out}: the command failed)\n"
    s = json.loads(path.read_text())
    keys = [k for k, _, _ in COMPARE_COLUMNS] + ["requests_total", "requests_failed", "ejections",
                                                 "checker_lateness_p99_s", "withheld_by_reason"]
    lines = [f"`{shlex.join(step.argv[2:])}`", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {s[k]} |" for k in keys if k in s]
    lines += ["", "| stage | from (sim s) | to (sim s) |", "|---|---|---|"]
    for g in s.get("stages", []):
        lines.append(f"| {g.get('name')} | {g.get('start_s')} | {g.get('end_s')} |")
    return "\n".join(lines) + "\n"


def render_speed(steps: Sequence[Step]) -> str:
    """Mean and standard deviation over seeds at each speed, from each run's summary (compare.json has no sd)."""
    keys = [k for k, _, _ in COMPARE_COLUMNS]
    cols: list[tuple[str, dict[str, tuple[float, float]]]] = []
    for step in steps:
        assert step.out is not None
        summaries = [json.loads(p.read_text()) for p in sorted(step.out.glob("runs/*/summary.json"))]
        stats = {}
        for k in keys:
            vals = [float(x[k]) for x in summaries if isinstance(x.get(k), (int, float))]
            if len(vals) > 1:
                stats[k] = (statistics.fmean(vals), statistics.stdev(vals))
        cols.append((f"`{shlex.join(step.argv[2:])}`", stats))
    lines = ["| metric | " + " | ".join(f"mean (sd): {c}" for c, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for k, _, spec in COMPARE_COLUMNS:
        cells = [f"{fmt(st[k][0], spec)} ({fmt(st[k][1], spec)})" if k in st else "-" for _, st in cols]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_logs(steps: Sequence[Step]) -> str:
    """A bench's last line, one JSON object, as a table of its figures."""
    parts = []
    for step in steps:
        assert step.out is not None and step.log is not None
        path = step.out / step.log
        text = path.read_text().strip().splitlines() if path.exists() else []
        parts.append(f"`{shlex.join(['python3', *step.argv[1:]])}`\n")
        try:
            doc = json.loads(text[-1]) if text else None
        except json.JSONDecodeError:
            doc = None
        if not isinstance(doc, dict):
            parts.append("(no JSON last line: the command failed; see its log)\n")
            continue
        parts.append("| figure | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in _flat(doc)))
    return "\n".join(parts)


def _flat(doc: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for k, v in doc.items():
        if isinstance(v, dict):
            rows += _flat(v, f"{prefix}{k}.")
        else:
            rows.append((f"{prefix}{k}", v))
    return rows


def _bench(out: Path, script: str, *args: str) -> Step:
    return Step([*BENCH, str(ROOT / "bench" / script), *args], out=out, log=f"{Path(script).stem}.log")


SETS: list[FigureSet] = [
    FigureSet("run-aws", "`lbsim run aws-2025-10-20` (seed 1, default speed)",
              'What `lbsim run aws-2025-10-20` shows',
              lambda d: [Step([*LBSIM, "run", "aws-2025-10-20", "--quiet", "--out", str(d / "run")], out=d / "run")],
              render_run),
    FigureSet("compare-aws", "Which protection keeps the capacity (3 seeds)", "Which protection keeps the capacity",
              lambda d: [_compare("aws-2025-10-20", AWS_COMPARE, d / "compare", "--seeds", "3")], render_compares),
    FigureSet("builtins", "Built-in scenarios (seed 1, default speed)", "Built-in scenarios",
              lambda d: [_compare(n, ps, d / n) for n, ps in BUILTIN_POLICIES.items()], render_compares),
    FigureSet("speed", "aws-2025-10-20 at speed 5 and 1.25 (seeds 1-8)", "Which protection keeps the capacity (Speed)",
              lambda d: [_compare("aws-2025-10-20", ["scenario"], d / "speed5", "--seeds", "8", "--speed", "5"),
                         _compare("aws-2025-10-20", ["scenario"], d / "speed1.25", "--seeds", "8", "--speed", "1.25")],
              render_speed),
    FigureSet("dns-race", "The DNS race in emergent mode, over seeds", "The control plane and the 2025-10-20 cascade",
              lambda d: [_bench(d, "dns_race.py", "--seeds", "200")], render_logs),
    FigureSet("perf", "Performance", "Performance",
              lambda d: [_bench(d, "checks.py"), _bench(d, "proxy.py", "--runs", "5")], render_logs),
    FigureSet("soak", "Soak", "Soak", lambda d: [_bench(d, "soak.py", "--out", str(d / "soak.csv"))], render_logs),
]


def run_step(step: Step) -> bool:
    print(f"$ {shlex.join(step.argv)}", flush=True)
    if step.log is not None:
        assert step.out is not None
        step.out.mkdir(parents=True, exist_ok=True)
        with open(step.out / step.log, "w") as f:
            proc = subprocess.run(step.argv, cwd=ROOT, stdout=f, stderr=None, check=False)
    else:
        proc = subprocess.run(step.argv, cwd=ROOT, check=False)
    return proc.returncode == 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--only", action="append", choices=[s.name for s in SETS], help="a figure set (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default runs/readme-figures-TIME)")
    parser.add_argument("--list", action="store_true", help="print the sets and their commands, run nothing")
    args = parser.parse_args(argv)
    chosen = [s for s in SETS if args.only is None or s.name in args.only]
    out: Path = args.out or ROOT / "runs" / f"readme-figures-{datetime.now():%Y%m%d-%H%M%S}"
    if args.list:
        for s in chosen:
            print(f"{s.name}: {s.title} (README: {s.readme})")
            for step in s.steps(out / s.name):
                print(f"  {shlex.join(step.argv)}")
        return 0
    if (out / "FIGURES.md").exists():
        parser.error(f"{out} already holds figures; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    ok: dict[str, bool] = {}
    doc = [f"# README figures, regenerated {datetime.now():%Y-%m-%d %H:%M}", "",
           "Produced by `python3 bench/readme_figures.py`; compare each table with the README section named.", ""]
    for s in chosen:
        t0 = time.monotonic()
        steps = s.steps(out / s.name)
        ok[s.name] = all([run_step(step) for step in steps])
        doc += [f"## {s.title}", "", f"README section: \"{s.readme}\"; {time.monotonic() - t0:.0f} s wall.", "",
                s.render(steps)]
        (out / "FIGURES.md").write_text("\n".join(doc))  # after every set: an interrupted run keeps what it has
    print(json.dumps({"figures": str(out / "FIGURES.md"), "ok": ok}))
    return 0 if all(ok.values()) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
