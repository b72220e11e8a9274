"""Writes a run directory: scenario.yaml, summary.json, run.json, events.jsonl, samples.csv, timeseries, requests."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from scenarios.journal import RunState
from scenarios.recorder import Recorder


def write_run_dir(out_dir: Path, *, resolved: dict[str, Any], summary: dict[str, Any], run_info: dict[str, Any],
                  state: RunState, recorder: Recorder | None) -> None:
    """Write (or write again) the run directory. `resolved` is the scenario as run (its policy list, speed and
    seed included); `recorder`, if the run had one, adds timeseries.csv (and .parquet where pyarrow is)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "scenario.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "run.json").write_text(json.dumps(run_info, indent=2) + "\n")
    with (out_dir / "events.jsonl").open("w") as f:
        for e in state.events:
            f.write(json.dumps(e) + "\n")
    with (out_dir / "samples.csv").open("w", newline="") as f:
        rows = state.timeseries
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["t"])
        w.writeheader()
        w.writerows(rows)
    if recorder is not None:
        recorder.write_csv(out_dir / "timeseries.csv")
        recorder.write_parquet(out_dir / "timeseries.parquet")  # only where pyarrow is installed
    log = state.request_log
    log.flush()
    log.seek(0)
    with (out_dir / "requests.csv").open("w", newline="") as f:
        f.write("started,latency_s,ok,error\n")
        shutil.copyfileobj(log, f)
    log.seek(0, 2)  # back to the end, should the run be written again
