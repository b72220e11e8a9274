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
   run: every run of a compare has the same timeline. They are drawn in a strip above the panels, sharing their
   time axis: each stage a bar with its name, each event its label and a dotted line through every panel. Every
   label's extent is measured with the renderer and labels go to lanes (`assign_lanes`) so that no two overlap.
5. A run's plot (run.png) has a panel per layer of the cascade the run recorded, from timeseries.csv, top to
   bottom as the failure travels: the lease store's DNS record, host leases by state, the host recovery queue
   (depth, leases re-established and items timed out, both cumulative), the network manager's backlog, the load
   balancer's zones in DNS; then targets (routed, and could serve: the ground truth) and request success. A layer
   the run has no series for has no panel (a scenario without a control plane shows the last three).
"""

from __future__ import annotations

import bisect
import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.table import Table

from scenarios.compare import TABLE_METRICS
from scenarios.controlplane import LEASE_STORE_NAME
from scenarios.recorder import Row, Selector, pivot

if TYPE_CHECKING:  # matplotlib is imported when a plot is drawn, not when the CLI starts
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.text import Text

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
_LABEL_CHARS = 40
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


def assign_lanes(spans: Sequence[tuple[float, float]], gap: float = 0.0) -> list[int]:
    """A lane (0, 1, ...) for each `(start, end)` span, in input order, such that spans in one lane are at least
    `gap` apart: each span, in order of start, takes the lowest lane free by then (first fit, which uses as few
    lanes as the most spans that overlap at one time)."""
    lanes: list[int] = [0] * len(spans)
    ends: list[float] = []  # per lane, where its last span ends
    for i in sorted(range(len(spans)), key=lambda k: (spans[k][0], k)):
        start, end = spans[i]
        lane = next((j for j, e in enumerate(ends) if e + gap <= start), len(ends))
        if lane == len(ends):
            ends.append(end)
        else:
            ends[lane] = end
        lanes[i] = lane
    return lanes


@dataclass(frozen=True)
class Layer:
    """One panel of a run's plot: lines, each a `pivot` column of the recorded series (rule 5)."""

    title: str
    unit: str
    lines: tuple[tuple[str, Selector], ...]


_NAN = math.nan
LAYERS: tuple[Layer, ...] = (
    Layer("lease store DNS record", "addresses", (
        ("addresses", Selector("lbsim_dns_record_addresses", {"endpoint": LEASE_STORE_NAME}, default=_NAN)),)),
    Layer("host leases", "hosts", tuple(
        (state, Selector("lbsim_host_leases", {"state": state}, default=_NAN))
        for state in ("leased", "expired", "recovering"))),
    Layer("host recovery queue", "items", (
        ("depth", Selector("lbsim_host_recovery_queue_depth", default=_NAN)),
        ("re-established (total)", Selector("lbsim_host_recovery_goodput_total", default=_NAN)),
        ("timed out (total)", Selector("lbsim_host_recovery_timeouts_total", default=_NAN)))),
    Layer("network manager", "items", (("backlog", Selector("lbsim_netmanager_backlog", default=_NAN)),)),
    Layer("load balancer DNS", "zones", (("zones in DNS", Selector("lbsim_zones_in_dns", default=_NAN)),)),
)


@dataclass
class LayerData:
    """A layer's lines as recorded: only those the run has samples for (NaN where a scrape had none)."""

    layer: Layer
    times: list[float]
    lines: dict[str, list[float]]


def read_layers(run_dir: Path, layers: Sequence[Layer] = LAYERS) -> list[LayerData]:
    """The layers a run recorded (rule 5), in order; a layer with none of its series is left out."""
    ts = run_dir / "timeseries.csv"
    if not ts.is_file():
        return []
    columns = {f"{i}:{name}": sel for i, layer in enumerate(layers) for name, sel in layer.lines}
    wanted = {sel.metric for sel in columns.values()}
    with ts.open(newline="") as f:
        rows = [Row(float(r["t"]), r["component"], r["metric"], r["labels"], float(r["value"]))
                for r in csv.DictReader(f) if r.get("metric") in wanted]
    table = pivot(rows, columns)
    times = [r["t"] for r in table]
    out: list[LayerData] = []
    for i, layer in enumerate(layers):
        lines = {name: [r[f"{i}:{name}"] for r in table] for name, _ in layer.lines}
        lines = {name: v for name, v in lines.items() if any(x == x for x in v)}  # NaN throughout: not recorded
        if lines:
            out.append(LayerData(layer, times, lines))
    return out


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
    can_serve: list[tuple[float, float]] = field(default_factory=list)  # (t, targets that could serve): truth


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
                elif row.get("metric") == "lbsim_truth_targets" and row.get("labels") == "set=can_serve":
                    data.can_serve.append((float(row["t"]), float(row["value"])))
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


def plot(groups: Mapping[str, Sequence[RunData]], out_path: Path, title: str,
         layers: Sequence[LayerData] = ()) -> Path:
    """Save `figure(...)` as a PNG at `out_path` and return it."""
    fig = figure(groups, title, layers)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    return out_path


# Heights in inches: a lane of the label strip, a layer's panel, the targets and success panels.
_LANE_IN = 0.17
_LAYER_IN = 1.25
_MAIN_IN = 1.9


def figure(groups: Mapping[str, Sequence[RunData]], title: str, layers: Sequence[LayerData] = ()) -> Figure:
    """Panels over one sim-time axis: the label strip (stages and timeline events of the first policy's first run,
    rule 4), one panel per recorded layer (rule 5), then routable targets and request success, one line per
    policy (rules 2-3)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 1.0 + _LAYER_IN * len(layers) + 2 * _MAIN_IN), layout="constrained")
    FigureCanvasAgg(fig)  # a canvas of its own: no pyplot, no global figure state
    heights = [0.5] + [_LAYER_IN] * len(layers) + [_MAIN_IN, _MAIN_IN]
    grid = fig.add_gridspec(len(heights), 1, height_ratios=heights)
    strip = fig.add_subplot(grid[0])
    panels = [fig.add_subplot(grid[i], sharex=strip) for i in range(1, len(heights))]
    targets, success = panels[-2], panels[-1]
    first = next((runs[0] for runs in groups.values() if runs), None)
    duration = max((float(r.summary.get("duration_s") or 0.0) for runs in groups.values() for r in runs),
                   default=0.0)
    for ax, data in zip(panels, layers, strict=False):
        for name, values in data.lines.items():
            ax.plot(data.times, values, drawstyle="steps-post", label=name, linewidth=1.4)
        ax.set_title(data.layer.title, loc="left", fontsize=9)
        ax.set_ylabel(data.layer.unit)
        ax.set_ylim(bottom=0)
        ax.legend(loc="best", fontsize=7)
    span = duration
    for n, (policy, runs) in enumerate(groups.items()):
        if not runs:
            continue
        times, routed = mean_series([(r.times, r.routed) for r in runs])
        # Policies often agree for a while: dashes and thinner lines on top keep every one visible.
        style = _LINESTYLES[n % len(_LINESTYLES)]
        width = max(0.9, 2.2 - 0.4 * n)
        (line,) = targets.plot(times, routed, drawstyle="steps-post", label=policy, linewidth=width, linestyle=style)
        span = duration or max(times, default=1.0)
        # 10 s smooths out single timeouts on a long run without hiding a short run's whole shape.
        t, rate = success_rate([q for r in runs for q in r.requests], span, 1.0, min(10.0, max(1.0, span / 30)))
        success.plot(t, [math.nan if v is None else 100 * v for v in rate], color=line.get_color(),
                     label=policy, linewidth=width, linestyle=style)
    if len(groups) == 1 and first is not None and first.can_serve:
        truth_t, truth_v = zip(*first.can_serve, strict=True)
        targets.plot(truth_t, truth_v, drawstyle="steps-post", color="0.45", linewidth=1.0, linestyle="--",
                     label="could serve (ground truth)")
    targets.set_title("targets routed" + (" and could serve" if len(groups) == 1 else ""), loc="left", fontsize=9)
    targets.set_ylabel("targets")
    targets.set_ylim(bottom=0)
    targets.legend(loc="lower left", fontsize=8)
    success.set_title("request success", loc="left", fontsize=9)
    success.set_ylabel("success (%)")
    success.set_ylim(-2, 102)
    success.set_xlabel("sim time (s)")
    strip.set_xlim(0, span or 1.0)
    fig.suptitle(title)
    lanes = 0
    if first is not None:
        for t_ev, _ in first.timeline:
            for ax in (strip, *panels):
                ax.axvline(t_ev, color="0.3", linestyle=":", linewidth=1)
        lanes = _label_strip(fig, strip, first.summary.get("stages") or [], first.timeline)
    strip.set_ylim(max(lanes, 1) - 0.4, -0.6)  # lane 0 on top
    strip.set_yticks([])
    strip.tick_params(axis="x", labelbottom=False)
    for side in ("top", "right", "left"):
        strip.spines[side].set_visible(False)
    for ax in panels[:-1]:
        ax.tick_params(axis="x", labelbottom=False)
    heights[0] = max(0.3, _LANE_IN * lanes + 0.1)
    grid.set_height_ratios(heights)
    fig.set_figheight(1.0 + sum(heights))
    return fig


def _label_strip(fig: Figure, strip: Axes, stages: Sequence[Mapping[str, Any]],
                 events: Sequence[tuple[float, str]]) -> int:
    """Stages as bars with their names, then timeline events' labels, in lanes where no two labels' measured
    extents overlap (rule 4). Returns the number of lanes used."""
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    x0, x1 = strip.get_xlim()
    pad = 0.004 * (x1 - x0)
    # Data units per display pixel along x, from the strip's current geometry.
    per_px = (x1 - x0) / max(1.0, strip.get_window_extent(renderer).width)

    def width(text: Text) -> float:
        return float(text.get_window_extent(renderer).width) * per_px

    stage_spans: list[tuple[float, float]] = []
    stage_items: list[tuple[Text, float, float, str]] = []
    for i, stage in enumerate(stages):
        start, end = float(stage["start_s"]), float(stage["end_s"])
        label = strip.text(start + pad, 0, short_label(str(stage["name"])), fontsize=7, va="center", ha="left",
                           color="0.15", zorder=3)
        w = width(label)
        x = min(start + pad, x1 - w - pad)  # a name that would run off the right end starts earlier
        label.set_x(x)
        stage_spans.append((min(start, x), max(end, x + w)))
        stage_items.append((label, start, end, f"C{(i % 7) + 3}"))
    event_spans: list[tuple[float, float]] = []
    event_labels: list[Text] = []
    for t_ev, note in events:
        # On white, so another event's dotted line does not run through the text.
        label = strip.text(t_ev + pad, 0, short_label(note), fontsize=7, va="center", ha="left", color="0.25",
                           bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.3}, zorder=3)
        w = width(label)
        if t_ev + pad + w > x1:  # at the right end: the label goes left of its line
            label.set_x(t_ev - pad)
            label.set_horizontalalignment("right")
            event_spans.append((t_ev - pad - w, t_ev))
        else:
            event_spans.append((t_ev, t_ev + pad + w))
        event_labels.append(label)
    gap = 2 * pad
    stage_lanes = assign_lanes(stage_spans, gap)
    used = max(stage_lanes, default=-1) + 1
    for (label, start, end, color), lane in zip(stage_items, stage_lanes, strict=True):
        strip.broken_barh([(start, max(end - start, pad))], (lane - 0.38, 0.76), color=color, alpha=0.35,
                          linewidth=0)
        label.set_y(lane)
    event_lanes = assign_lanes(event_spans, gap)
    for label, lane in zip(event_labels, event_lanes, strict=True):
        label.set_y(used + lane)
    return used + max(event_lanes, default=-1) + 1


def run_figure(run_dir: Path) -> Figure:
    """A run's plot (rules 4-5), not yet saved."""
    run = read_run(run_dir)
    s = run.summary
    title = f"{s.get('scenario')} / {s.get('policy')} / seed {s.get('seed')}"
    return figure({str(s.get("policy")): [run]}, title, read_layers(run_dir))


def plot_run(run_dir: Path, out_path: Path | None = None) -> Path:
    out_path = out_path or run_dir / "run.png"
    run_figure(run_dir).savefig(out_path, dpi=110)
    return out_path


def plot_compare(compare_dir: Path, doc: Mapping[str, Any], out_path: Path | None = None) -> Path:
    groups = {p: [read_run(d) for d in dirs if is_run_dir(d)] for p, dirs in compare_runs(compare_dir, doc).items()}
    seeds = ", ".join(str(s) for s in doc.get("seeds", []))
    return plot(groups, out_path or compare_dir / "compare.png", f"{doc.get('scenario')}: seeds {seeds}")
