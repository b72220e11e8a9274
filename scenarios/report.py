"""Tables and plots from saved run and compare directories, for `lbsim compare` and `lbsim report`.

Rules:
1. Nothing here runs a scenario: everything is read back from the files a run wrote (timeseries.csv,
   requests.csv, events.jsonl, summary.json) or compare.json.
2. Routable targets are `lbsim_truth_targets{set="routed"}` as the recorder scraped it (timeseries.csv, the tidy
   series), averaged over a policy's seeds on the first run's scrape times (a run's value at a time is its
   latest scrape at or before it).
3. Success rate: the ok share of the requests *started* in each sim-second bucket, smoothed as the ratio of the
   sums over the trailing `smooth_s` (10 s, less on runs shorter than 300 s), plotted at the window's end. Not a
   mean of ratios, so a quiet second weighs little; trailing, so a drop never shows before the event that
   caused it. Seeds are pooled. A window with no requests has no value (a gap in the line),
   not 0 or 1.
4. Timeline events (events.jsonl, kind "timeline") and the first policy's detected stages come from its first
   run: every run of a compare has the same timeline.
"""

from __future__ import annotations

import bisect
import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from scenarios.compare import TABLE_METRICS

_FORMATS: Mapping[str, str] = {"points": "{:.4f}", "target-s": "{:.1f}", "s": "{:.1f}", "": "{:.4g}"}
_SHARE_FORMAT = "{:.3f}"
# Short column headers, so a table of ranges still fits a terminal; the words of TABLE_METRICS otherwise.
_HEADERS: Mapping[str, str] = {
    "worst_minute_availability": "worst\nminute",
    "min_routable_fraction": "lowest\nroutable",
    "false_ejection_target_seconds": "false\nejections",
    "missed_ejection_target_seconds": "missed\nejections",
    "capacity_lost_target_seconds": "capacity\nlost",
    "dns_failovers": "DNS\nfailovers",
}
_LABEL_CHARS = 28
_DASH = "\u2013"
_LINESTYLES: Sequence[Any] = ("-", "--", "-.", (0, (1, 1)), (0, (5, 1, 1, 1, 1, 1)))


class ReportError(ValueError):
    """A directory or file that cannot be re-rendered; the message says which and why."""


# ---------------------------------------------------------------------------------------------------------
# Pure series helpers


def success_rate(requests: Iterable[tuple[float, bool]], duration_s: float, bucket_s: float = 1.0,
                 smooth_s: float = 10.0) -> tuple[list[float], list[float | None]]:
    """Bucket ends and the smoothed success rate up to each (rule 3). Requests outside [0, duration) are ignored."""
    n = max(1, math.ceil(duration_s / bucket_s))
    ok = [0] * n
    total = [0] * n
    for started, good in requests:
        i = int(started // bucket_s)
        if 0 <= i < n:
            total[i] += 1
            ok[i] += int(good)
    width = max(1, round(smooth_s / bucket_s))
    ok_sum = [0]
    total_sum = [0]
    for i in range(n):
        ok_sum.append(ok_sum[-1] + ok[i])
        total_sum.append(total_sum[-1] + total[i])
    times: list[float] = []
    rates: list[float | None] = []
    for i in range(n):
        lo = max(0, i + 1 - width)
        t = total_sum[i + 1] - total_sum[lo]
        times.append((i + 1) * bucket_s)
        rates.append((ok_sum[i + 1] - ok_sum[lo]) / t if t else None)
    return times, rates


def mean_series(runs: Sequence[tuple[Sequence[float], Sequence[float]]]) -> tuple[list[float], list[float]]:
    """The mean of several step series on the first one's times (rule 2)."""
    if not runs:
        return [], []
    grid = list(runs[0][0])
    sums = [0.0] * len(grid)
    used = 0
    for times, values in runs:
        if not times:
            continue
        used += 1
        for j, t in enumerate(grid):
            i = bisect.bisect_right(times, t) - 1
            sums[j] += values[max(0, i)]
    return grid, [s / used for s in sums] if used else []


def short_label(text: str, limit: int = _LABEL_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------------------------------------------
# Reading saved directories


@dataclass
class RunData:
    dir: Path
    summary: dict[str, Any]
    times: list[float] = field(default_factory=list)
    routed: list[float] = field(default_factory=list)
    requests: list[tuple[float, bool]] = field(default_factory=list)
    timeline: list[tuple[float, str]] = field(default_factory=list)


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ReportError(f"{path}: cannot read: {e.strerror or e}") from None
    except ValueError as e:
        raise ReportError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object")
    return data


def read_run(run_dir: Path) -> RunData:
    """A run directory's summary, routable series, requests and timeline events (missing files read as empty)."""
    data = RunData(run_dir, read_json(run_dir / "summary.json"))
    ts = run_dir / "timeseries.csv"
    if ts.is_file():
        with ts.open(newline="") as f:
            for row in csv.DictReader(f):
                if row.get("metric") == "lbsim_truth_targets" and row.get("labels") == "set=routed":
                    data.times.append(float(row["t"]))
                    data.routed.append(float(row["value"]))
    req = run_dir / "requests.csv"
    if req.is_file():
        with req.open(newline="") as f:
            for row in csv.DictReader(f):
                if row.get("started") and row.get("ok"):
                    data.requests.append((float(row["started"]), row["ok"].strip() == "1"))
    ev = run_dir / "events.jsonl"
    if ev.is_file():
        with ev.open() as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    e = json.loads(line)
                except ValueError as err:
                    raise ReportError(f"{ev}: not valid JSON lines: {err}") from None
                if isinstance(e, dict) and e.get("kind") == "timeline":
                    data.timeline.append((float(e.get("t", 0.0)), str(e.get("note") or e.get("subject") or "")))
    return data


def is_run_dir(path: Path) -> bool:
    return (path / "summary.json").is_file()


def is_compare_dir(path: Path) -> bool:
    return (path / "compare.json").is_file()


def compare_runs(compare_dir: Path, doc: Mapping[str, Any]) -> dict[str, list[Path]]:
    """Each policy's run directories as compare.json lists them (relative ones are under `compare_dir`)."""
    out: dict[str, list[Path]] = {p: [] for p in doc.get("policies", {})}
    for r in doc.get("runs", []):
        d = Path(r["dir"])
        out.setdefault(r["policy"], []).append(d if d.is_absolute() else compare_dir / d)
    return out


# ---------------------------------------------------------------------------------------------------------
# Tables


def _cell(agg: Mapping[str, float] | None, fmt: str, ranged: bool) -> str:
    if agg is None:
        return "-"
    text = fmt.format(agg["mean"])
    lo, hi = fmt.format(agg["min"]), fmt.format(agg["max"])
    if ranged and lo != hi:
        text += f"\n[{lo}{_DASH}{hi}]"
    return text


def compare_table(doc: Mapping[str, Any]) -> Table:
    """One row per policy: mean, and [min-max] over seeds when there are several, of the TABLE_METRICS."""
    seeds = list(doc.get("seeds", []))
    ranged = len(seeds) > 1
    title = f"{doc['scenario']}: seeds {', '.join(str(s) for s in seeds)}"
    if ranged:
        title += f" (mean [min{_DASH}max])"
    if not doc.get("complete", True):
        title += " (INCOMPLETE)"
    table = Table(title=escape(title))
    # Folded rather than cut with an ellipsis on a narrow terminal: a number must never be shown truncated.
    table.add_column("policy", overflow="fold")
    for key, words, unit in TABLE_METRICS:
        header = _HEADERS.get(key, words) + (f"\n({unit})" if unit in ("target-s", "s") else "")
        table.add_column(header, justify="right", overflow="fold")
    for policy, metrics in doc["policies"].items():
        cells = []
        for key, _, unit in TABLE_METRICS:
            fmt = _SHARE_FORMAT if key == "min_routable_fraction" else _FORMATS[unit]
            cells.append(_cell(metrics.get(key), fmt, ranged))
        table.add_row(escape(policy), *cells)
    return table


# ---------------------------------------------------------------------------------------------------------
# Plots


def plot(groups: Mapping[str, Sequence[RunData]], out_path: Path, title: str) -> Path:
    """Two panels over sim time: routable targets and request success rate, one line per policy, the timeline's
    events as dotted lines, and the first policy's detected stages shaded (rules 2-4). Returns `out_path`."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(11, 6.5), constrained_layout=True)
    try:
        first = next((runs[0] for runs in groups.values() if runs), None)
        duration = max((float(r.summary.get("duration_s") or 0.0) for runs in groups.values() for r in runs),
                       default=0.0)
        for n, (policy, runs) in enumerate(groups.items()):
            if not runs:
                continue
            times, routed = mean_series([(r.times, r.routed) for r in runs])
            # Policies often agree for a while: dashes and thinner lines on top keep every one visible.
            style = _LINESTYLES[n % len(_LINESTYLES)]
            width = max(0.9, 2.2 - 0.4 * n)
            (line,) = top.plot(times, routed, drawstyle="steps-post", label=policy, linewidth=width, linestyle=style)
            span = duration or max(times, default=1.0)
            # 10 s smooths out single timeouts on a long run without hiding a short run's whole shape.
            t, rate = success_rate([q for r in runs for q in r.requests], span, 1.0, min(10.0, max(1.0, span / 30)))
            bottom.plot(t, [math.nan if v is None else 100 * v for v in rate], color=line.get_color(),
                        label=policy, linewidth=width, linestyle=style)
        if first is not None:
            for i, stage in enumerate(first.summary.get("stages") or []):
                top.axvspan(stage["start_s"], stage["end_s"], color=f"C{(i % 7) + 3}", alpha=0.10, linewidth=0)
                top.annotate(short_label(str(stage["name"])), (stage["start_s"], 0.02),
                             xycoords=("data", "axes fraction"), fontsize=7, color="0.35")
            for t_ev, label in first.timeline:
                for ax in (top, bottom):
                    ax.axvline(t_ev, color="0.3", linestyle=":", linewidth=1)
                top.annotate(short_label(label), (t_ev, 0.98), xycoords=("data", "axes fraction"), rotation=90,
                             va="top", ha="right", fontsize=7, color="0.25")
        top.set_ylabel("routable targets")
        top.set_ylim(bottom=0)
        top.legend(loc="lower left", fontsize=8)
        top.set_title(title)
        bottom.set_ylabel("request success (%)")
        bottom.set_ylim(-2, 102)
        bottom.set_xlabel("sim time (s)")
        if duration:
            bottom.set_xlim(0, duration)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_path, dpi=110)
    finally:
        plt.close(fig)
    return out_path


def plot_run(run_dir: Path, out_path: Path | None = None) -> Path:
    run = read_run(run_dir)
    s = run.summary
    title = f"{s.get('scenario')} / {s.get('policy')} / seed {s.get('seed')}"
    return plot({str(s.get("policy")): [run]}, out_path or run_dir / "run.png", title)


def plot_compare(compare_dir: Path, doc: Mapping[str, Any], out_path: Path | None = None) -> Path:
    groups = {p: [read_run(d) for d in dirs if is_run_dir(d)] for p, dirs in compare_runs(compare_dir, doc).items()}
    seeds = ", ".join(str(s) for s in doc.get("seeds", []))
    return plot(groups, out_path or compare_dir / "compare.png", f"{doc.get('scenario')}: seeds {seeds}")
