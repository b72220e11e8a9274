"""How often the DNS enactor race empties a record when it is left to emerge, with each protection off and on.

Runs the DNS service's own pure core (`backends/controlplane/dnsautomation.py`, the code `DnsService` drives on
the sim clock) on a virtual clock, in the `emergent` race mode: every enactor write hangs with probability
`--delay-probability` for an exponential time of mean `--delay-mean-s` (at most `--delay-max-s`), drawn from
`random.Random(seed)`. Nobody restores, so a run whose record was emptied stays stuck. For each protection set
and seed it runs `--duration-s` sim seconds and records whether a record was ever emptied and whether the store
ended inconsistent (enactors refusing to work). It also checks the forced mode's guarantee: an injected delay of
`keep_generations + 3` planner intervals empties the record in every run.

    python3 bench/dns_race.py --seeds 200

Prints a table, then, as its LAST line, one JSON object: {"emptied_share": {protection: share}, ...}.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout as `python3 bench/...`

from backends.controlplane.dnsautomation import AutomationConfig, DnsAutomation, RaceConfig, RaceMode
from backends.controlplane.dnsplan import Protections

# The three endpoints a scenario's control plane serves (scenarios/controlplane.py). The forced mode writes them
# in this (sorted) order, the lease store's own name last; the emergent mode draws each pass's order.
ENDPOINTS = {
    "leasestore-fips.cp.lbsim": {"10.0.1.1": 1},
    "leasestore-ipv6.cp.lbsim": {"10.0.1.1": 1},
    "leasestore.cp.lbsim": {"10.0.1.1": 1},
}
PROTECTIONS: dict[str, Protections] = {
    "none": Protections(),
    "cas": Protections(cas=True),
    "keep_active": Protections(keep_active=True),
    "guard": Protections(guard=True),
}


@dataclass(frozen=True, slots=True)
class Outcome:
    emptied: bool
    stuck: bool
    first_emptied_at: float | None
    endpoints: frozenset[str]  # the endpoints whose record was emptied


def run_emergent(seed: int, protections: Protections, race: RaceConfig, duration_s: float) -> Outcome:
    auto = DnsAutomation(AutomationConfig(protections=protections, race=race), ENDPOINTS, 0.0, random.Random(seed))
    _run(auto, 0.0, duration_s)
    endpoints = frozenset(e.endpoint for e in auto.store.events if e.kind == "emptied" and e.endpoint is not None)
    return Outcome(auto.records_emptied > 0, auto.store.inconsistent, auto.first_emptied_at, endpoints)


def _run(auto: DnsAutomation, start: float, end: float) -> None:
    """Run to `end`, or stop early once the store is inconsistent: with nobody to restore it, the enactors
    refuse everything from then on, so nothing more can be emptied."""
    t = start
    while t < end and not auto.store.inconsistent:
        t = min(t + auto.config.planner_interval_s, end)
        auto.run_until(t)


def run_forced(delay_at_s: float) -> bool:
    """The forced mode: enactor a's next write is delayed keep_generations + 3 planner intervals."""
    config = AutomationConfig()
    auto = DnsAutomation(config, ENDPOINTS, 0.0)
    auto.run_until(delay_at_s)
    delay_s = (config.keep_generations + 3) * config.planner_interval_s
    auto.delay_enactor("a", delay_s, delay_at_s)
    _run(auto, delay_at_s, delay_at_s + 2 * delay_s)  # the race is over within one delay plus a few intervals
    return auto.records_emptied > 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=200, help="runs per protection (seeds 0..N-1)")
    ap.add_argument("--duration-s", type=float, default=600.0, help="sim seconds per run")
    default = RaceConfig()  # the scenario schema's defaults too
    ap.add_argument("--delay-probability", type=float, default=default.delay_probability)
    ap.add_argument("--delay-mean-s", type=float, default=default.delay_mean_s)
    ap.add_argument("--delay-max-s", type=float, default=default.delay_max_s)
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.duration_s <= 0:
        ap.error("need --seeds >= 1 and --duration-s > 0")
    race = RaceConfig(mode=RaceMode.EMERGENT, delay_probability=args.delay_probability, delay_mean_s=args.delay_mean_s,
                      delay_max_s=args.delay_max_s)
    started = time.perf_counter()
    seeds = range(args.seeds)
    emptied: dict[str, float] = {}
    stuck: dict[str, float] = {}
    rows: list[tuple[str, str, str, str]] = []
    by_endpoint: dict[str, float] = {}
    for name, protections in PROTECTIONS.items():
        outcomes = [run_emergent(seed, protections, race, args.duration_s) for seed in seeds]
        if name == "none":
            by_endpoint = {e: sum(e in o.endpoints for o in outcomes) / len(outcomes) for e in sorted(ENDPOINTS)}
        emptied[name] = sum(o.emptied for o in outcomes) / len(outcomes)
        stuck[name] = sum(o.stuck for o in outcomes) / len(outcomes)
        times = [o.first_emptied_at for o in outcomes if o.first_emptied_at is not None]
        median = f"{statistics.median(times):.0f}" if times else "-"
        rows.append((name, f"{emptied[name]:.1%}", f"{stuck[name]:.1%}", median))
    forced = [run_forced(20.0 + 0.37 * seed) for seed in seeds]
    forced_share = sum(forced) / len(forced)
    elapsed = time.perf_counter() - started

    print(
        f"emergent race: {args.seeds} seeds x {args.duration_s:.0f} sim s, a write hangs with p = "
        f"{race.delay_probability} for Exp(mean {race.delay_mean_s} s) <= {race.delay_max_s} s; planner every 5 s, "
        "3 enactors, 3 endpoints, keep 3 generations"
    )
    header = ("protection", "record emptied", "store stuck", "median t of first empty (s)")
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(4)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    print("runs that emptied each endpoint's record, without protection (each pass draws its order): "
          + ", ".join(f"{e} {share:.1%}" for e, share in by_endpoint.items()))
    print(f"forced race (delay of 30 s injected between t = 20 and t = {20 + 0.37 * (args.seeds - 1):.0f}): "
          f"record emptied in {forced_share:.1%} of {args.seeds} runs")
    print(f"({elapsed:.1f} s wall)")
    result: dict[str, Any] = {
        "seeds": args.seeds,
        "duration_s": args.duration_s,
        "race": {"delay_probability": race.delay_probability, "delay_mean_s": race.delay_mean_s,
                 "delay_max_s": race.delay_max_s},
        "emptied_share": emptied,
        "stuck_share": stuck,
        "emptied_endpoint_share": by_endpoint,
        "forced_emptied_share": forced_share,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
