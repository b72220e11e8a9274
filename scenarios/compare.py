"""Runs one scenario per policy and seed in child processes and aggregates their summaries for `lbsim compare`.

Rules:
1. Every run is a child `python -m scenarios.cli run ... --quiet` with its own ephemeral ports, at most `jobs` at a
   time; every policy gets the same seeds, so the policies are compared on the same faults and traffic.
2. A child is started in its own process group, so a terminal's Ctrl-C reaches only compare, which forwards one
   SIGINT per signal it gets to every running child (the child then writes its partial results), waits a bounded
   time and kills what is left. Nothing is launched after a stop; no child outlives `CompareRunner.run`.
3. A failing child (exit code other than 0 and 130) is reported with the tail of its stderr; the others go on.
4. compare.json aggregates every numeric summary metric, run.json's included (mean, min, max over the runs
   that wrote a summary). Booleans (`complete`, `fidelity_ok`) count as 0/1, so a min of 0 says some run was
   not; None (a p99 of no requests) is left out; strings and lists (`policy`, `policies`, `stages`) and `seed`
   are skipped; a mapping of counts (`withheld_by_reason`) is aggregated per key, as `withheld_by_reason.budget`
   and so on.
5. Policies come as a spec (`naive`, `scenario+velocity`), a YAML file of policy entries (a scenario's
   `policy:` list, or one mapping), or `module.path:ClassName` -- the last imports and so runs user code, and
   only with `allow_import`.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import math
import os
import re
import signal
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lb.aio import cancel_and_wait
from lb.policies import PolicyError, load_policy_class, register_policy
from lb.policy import Policy
from worlds.real import Stopwatch

# The metrics of the printed table and of the "versus" sentences: (summary key, words, unit). A "points" metric
# is a share, compared in percentage points.
TABLE_METRICS: list[tuple[str, str, str]] = [
    ("availability", "availability", "points"),
    ("worst_minute_availability", "worst sim-minute availability", "points"),
    ("min_routable_fraction", "lowest routable share", "points"),
    ("capacity_lost_target_seconds", "capacity lost", "target-s"),
    ("false_ejection_target_seconds", "false ejections", "target-s"),
    ("missed_ejection_target_seconds", "missed ejections", "target-s"),
    ("dns_failovers", "DNS failovers", ""),
    ("flaps", "flaps", ""),
    ("time_to_detect_s", "time to detect", "s"),
]

# Exit codes of an interrupted child: 130 from lbsim's own handler, -SIGINT if the signal came before it was set.
INTERRUPTED_CODES = frozenset({130, -signal.SIGINT})

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
# Characters a parameter value cannot hold in a spec: they would split or end it.
_SPEC_SPECIALS = set(",()[]+=|")
_STDERR_TAIL_CHARS = 4000
# Numeric summary keys that name a run rather than measure it.
_NOT_METRICS = frozenset({"seed"})


# ---------------------------------------------------------------------------------------------------------
# Policies as the user gives them


@dataclass(frozen=True, slots=True)
class PolicyChoice:
    """One policy column of a compare: its label, the spec the child's `--policy` gets, modules it imports."""

    label: str
    spec: str
    imports: tuple[str, ...] = ()


def _spec_value(where: str, value: Any) -> str:
    if value is None:
        return "off"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list | tuple | set | frozenset):
        return "[" + ",".join(_spec_value(where, v) for v in value) + "]"
    text = str(value).strip()
    if not text or _SPEC_SPECIALS & set(text) or any(c.isspace() for c in text):
        raise PolicyError(f"{where}: value {value!r} cannot be written in a policy spec")
    return text


def entries_to_spec(entries: Sequence[str | Mapping[str, Any]], where: str = "policy file") -> str:
    """A scenario-style policy list (`["aws", {"name": "velocity", "window_s": 60}]`) as one spec string,
    `aws+velocity(window_s=60)`, which is what `lbsim run --policy` reads."""
    terms: list[str] = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            if not entry.strip():
                raise PolicyError(f"{where}: entry {i} is empty")
            terms.append(entry.strip())
            continue
        if not isinstance(entry, Mapping):
            raise PolicyError(f"{where}: entry {i} must be a spec string or a mapping with a `name`, got {entry!r}")
        params = dict(entry)
        name = params.pop("name", None)
        if not isinstance(name, str) or not name.strip() or any(c in _SPEC_SPECIALS or c.isspace() for c in name):
            raise PolicyError(f"{where}: entry {i} needs a `name` that is a policy name, got {name!r}")
        args = ",".join(f"{k}={_spec_value(f'{where}: {name}.{k}', v)}" for k, v in params.items())
        terms.append(f"{name.strip()}({args})" if args else name.strip())
    if not terms:
        raise PolicyError(f"{where}: no policies in it")
    return "+".join(terms)


def import_policy(path: str) -> type[Policy]:
    """Import `module.path:ClassName` (this RUNS the module) and register the class under its `name`.

    The working directory goes on `sys.path` first, as for `python -m`, so a module beside the user's scenario
    loads the same way in compare and in its children."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    cls = load_policy_class(path)
    register_policy(cls)
    return cls


def resolve_policy(arg: str, *, allow_import: bool) -> PolicyChoice:
    """Turn one `--policy` of compare into what a child run gets; PolicyError says what is wrong."""
    path = Path(arg)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise PolicyError(f"{arg}: no such policy file")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise PolicyError(f"{arg}: not valid YAML: {e}") from None
        entries = [data] if isinstance(data, Mapping) else data
        if not isinstance(entries, list):
            raise PolicyError(f"{arg}: must hold a list of policy entries (like a scenario's `policy:`) or one "
                              "mapping with a `name`")
        return PolicyChoice(path.stem, entries_to_spec(entries, arg))
    if _IMPORT_PATH.match(arg):
        if not allow_import:
            raise PolicyError(f"{arg!r} is a Python import path: loading it imports and so runs that module's code; "
                              "pass --allow-import if you trust it")
        cls = import_policy(arg)
        return PolicyChoice(cls.name, cls.name, (arg,))
    return PolicyChoice(arg, arg)


def slugs(labels: Iterable[str]) -> dict[str, str]:
    """A distinct, filesystem-safe directory name per policy label."""
    out: dict[str, str] = {}
    taken: set[str] = set()
    for label in labels:
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-.")[:60] or "policy"
        slug, n = base, 2
        while slug in taken:
            slug, n = f"{base}-{n}", n + 1
        taken.add(slug)
        out[label] = slug
    return out


# ---------------------------------------------------------------------------------------------------------
# Aggregation and the "versus" sentences (pure)


def _numbers(summary: Mapping[str, Any]) -> list[tuple[str, float]]:
    """A summary's numeric metrics; a mapping of counts (`withheld_by_reason`) gives one per key (`KEY.NAME`)."""
    out: list[tuple[str, float]] = []
    for key, v in summary.items():
        if isinstance(v, Mapping):
            out += [(f"{key}.{k}", x) for k, x in _numbers(v)]
        elif isinstance(v, bool) or (isinstance(v, int | float) and math.isfinite(v)):
            out.append((key, float(v)))
    return out


def aggregate(summaries: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean, min and max of every numeric metric over `summaries` (rule 4), in first-seen key order."""
    values: dict[str, list[float]] = {}
    for s in summaries:
        for key, v in _numbers(s):
            if key not in _NOT_METRICS:
                values.setdefault(key, []).append(float(v))
    return {k: {"mean": sum(vs) / len(vs), "min": min(vs), "max": max(vs)} for k, vs in values.items()}


@dataclass(frozen=True, slots=True)
class RunRecord:
    policy: str
    seed: int
    dir: str  # relative to the compare directory, so the directory can be moved
    summary: dict[str, Any]


def compare_document(scenario: str, seeds: Sequence[int], complete: bool, policies: Sequence[str],
                     runs: Sequence[RunRecord], world: str = "real") -> dict[str, Any]:
    """compare.json: every policy in the order given (an empty mapping if none of its runs wrote a summary)."""
    return {
        "scenario": scenario,
        "world": world,
        "seeds": list(seeds),
        "complete": complete,
        "policies": {p: aggregate([r.summary for r in runs if r.policy == p]) for p in policies},
        "runs": [{"policy": r.policy, "seed": r.seed, "dir": r.dir} for r in runs],
    }


def write_compare_csv(doc: Mapping[str, Any], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["policy", "metric", "mean", "min", "max"])
        for policy, metrics in doc["policies"].items():
            for metric, agg in metrics.items():
                w.writerow([policy, metric, agg["mean"], agg["min"], agg["max"]])


def _signed(x: float) -> str:
    if abs(x) >= 100:
        return f"{x:+.0f}"
    if abs(x) >= 1:
        return f"{x:+.1f}"
    return f"{x:+.2g}"


def difference(metric: str, words: str, unit: str, base: float, other: float) -> str | None:
    """`capacity lost -1234 target-s (-62%)` or `availability +0.8 points`; None if there is no difference."""
    diff = other - base
    if abs(diff) < 1e-9:
        return None
    if unit == "points":
        return f"{words} {_signed(100 * diff)} points"
    text = f"{words} {_signed(diff)}" + (f" {unit}" if unit else "")
    if base != 0:
        text += f" ({100 * diff / abs(base):+.0f}%)"
    return text


def versus_lines(doc: Mapping[str, Any]) -> list[str]:
    """One sentence per policy after the first (the baseline) saying how its means differ from the baseline's."""
    policies: Mapping[str, Mapping[str, Mapping[str, float]]] = doc["policies"]
    names = list(policies)
    if len(names) < 2:
        return []
    baseline = names[0]
    lines = []
    for name in names[1:]:
        parts = []
        for key, words, unit in TABLE_METRICS:
            b, o = policies[baseline].get(key), policies[name].get(key)
            if b is None or o is None:
                continue
            part = difference(key, words, unit, b["mean"], o["mean"])
            if part is not None:
                parts.append(part)
        if not policies[name] or not policies[baseline]:
            lines.append(f"{name} vs {baseline}: no results to compare")
        else:
            lines.append(f"{name} vs {baseline}: " + (", ".join(parts) or "no difference in these metrics"))
    return lines


# ---------------------------------------------------------------------------------------------------------
# Child processes (the shell)


@dataclass(frozen=True, slots=True)
class Job:
    policy: PolicyChoice
    seed: int
    dir: Path


@dataclass(frozen=True, slots=True)
class JobResult:
    job: Job
    returncode: int | None  # None: never launched (compare was stopped first)
    wall_s: float
    stderr_tail: str
    summary: dict[str, Any] | None

    @property
    def failed(self) -> bool:
        return self.returncode is not None and self.returncode != 0 and self.returncode not in INTERRUPTED_CODES

    def how_it_ended(self) -> str:
        """`exit code N`, or `killed by SIGKILL` for a run a signal ended (the OOM killer, a user's kill -9)."""
        rc = self.returncode
        if rc is not None and rc < 0:
            try:
                return f"killed by {signal.Signals(-rc).name}"
            except ValueError:
                return f"killed by signal {-rc}"
        return f"exit code {rc}"


def child_argv(job: Job, scenario: str, *, speed: float | None = None, overrides: Sequence[str] = (),
               loop: str | None = None, world: str = "real") -> list[str]:
    argv = [sys.executable, "-m", "scenarios.cli", "run", scenario, "--policy", job.policy.spec,
            "--seed", str(job.seed), "--out", str(job.dir), "--quiet", "--world", world]
    for path in job.policy.imports:
        argv += ["--import-policy", path]
    if speed is not None:
        argv += ["--speed", repr(speed)]
    if loop is not None:
        argv += ["--loop", loop]
    for o in overrides:
        argv += ["--set", o]
    return argv


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """A run's summary.json with its run.json figures (`loop_lag_p99_s`, `fidelity_ok`) added; None without one."""
    try:
        data = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    try:
        info = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        info = None  # a run that stopped before writing it, or one written before run.json existed
    if isinstance(info, dict):
        data.update({k: v for k, v in info.items() if k not in data})
    return data


class CompareRunner:
    """Runs `jobs` as child processes, at most `parallel` at a time (rules 1-3)."""

    def __init__(self, jobs: Sequence[Job], argv: Callable[[Job], list[str]], *, parallel: int = 1,
                 on_done: Callable[[JobResult], None] | None = None, stop_timeout_s: float = 20.0) -> None:
        self.jobs = list(jobs)
        self._argv = argv
        self._parallel = max(1, parallel)
        self._on_done = on_done
        # Bounds a child's clean stop: its own shutdown is bounded by ~8 s (see tests/test_cli.py EXIT_LIMIT_S).
        self.stop_timeout_s = stop_timeout_s
        self._stop = asyncio.Event()
        self._procs: set[asyncio.subprocess.Process] = set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def interrupt(self) -> None:
        """Stop launching and pass one SIGINT to every running child (call again to pass another)."""
        self._stop.set()
        for proc in list(self._procs):
            self._signal(proc, signal.SIGINT)

    @staticmethod
    def _signal(proc: asyncio.subprocess.Process, sig: int) -> None:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)  # the child leads its own group: reaches anything it started too

    async def run(self) -> list[JobResult]:
        """Run every job (or until `interrupt`); return one result per job, in job order."""
        sem = asyncio.Semaphore(self._parallel)
        tasks = [asyncio.create_task(self._one(job, sem), name=f"run-{job.dir.name}") for job in self.jobs]
        everything = asyncio.gather(*tasks)
        stop = asyncio.create_task(self._stop.wait())
        try:
            waiting: set[asyncio.Future[Any]] = {everything, stop}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if not everything.done():
                try:
                    await asyncio.wait_for(asyncio.shield(everything), self.stop_timeout_s)
                except TimeoutError:
                    for proc in list(self._procs):
                        self._signal(proc, signal.SIGKILL)
            return list(await everything)
        finally:
            await cancel_and_wait([stop, *tasks])
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await everything

    async def _one(self, job: Job, sem: asyncio.Semaphore) -> JobResult:
        async with sem:
            if self._stop.is_set():
                return JobResult(job, None, 0.0, "", None)
            job.dir.mkdir(parents=True, exist_ok=True)
            watch = Stopwatch()
            proc = await asyncio.create_subprocess_exec(
                *self._argv(job), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE, **_own_group(),
            )
            self._procs.add(proc)
            try:
                if self._stop.is_set():  # stopped while it was being started: it missed the forwarded signal
                    self._signal(proc, signal.SIGINT)
                assert proc.stderr is not None
                tail = await _read_tail(proc.stderr)
                rc = await proc.wait()
            finally:
                if proc.returncode is None:  # cancelled: leave nothing running behind
                    self._signal(proc, signal.SIGKILL)
                    with contextlib.suppress(ProcessLookupError):
                        await asyncio.shield(proc.wait())
                self._procs.discard(proc)
            result = JobResult(job, rc, watch.elapsed(), tail, read_summary(job.dir))
        if self._on_done is not None:
            self._on_done(result)
        return result


def _own_group() -> dict[str, Any]:
    """Start a child in its own process group: `process_group` where the loop has it (asyncio's); uvloop has only
    `preexec_fn`, which runs setpgid in the forked child before exec."""
    if isinstance(asyncio.get_running_loop(), asyncio.BaseEventLoop):
        return {"process_group": 0}
    return {"preexec_fn": os.setpgrp}


async def _read_tail(stream: asyncio.StreamReader) -> str:
    """Everything the child writes to stderr, keeping only the end (a chatty child must not grow memory)."""
    tail = b""
    while chunk := await stream.read(65536):
        tail = (tail + chunk)[-_STDERR_TAIL_CHARS:]
    return tail.decode(errors="replace")
