"""The run directory writer and the results split: summary.json keeps sim-time results, run.json the machine's."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from scenarios.journal import RunState
from scenarios.outcomes import Sample
from scenarios.results import run_info, summary
from scenarios.schema import parse_scenario
from scenarios.traffic import RequestResult
from scenarios.writer import write_run_dir

# Its shortest timeout is 1 s, so a loop lag of 0.1 s or more makes a run unfaithful.
SCENARIO = parse_scenario({"name": "w", "speed": 4, "duration_s": 10, "zones": ["a"], "targets_per_zone": 1,
                           "health_check": {"interval_s": 2, "timeout_s": 1}, "traffic": {"timeout_s": 1}}, "test")


def recorded() -> RunState:
    st = RunState()
    st.add_event({"t": 1.0, "kind": "ejected", "subject": "a-0"})
    st.add_request(RequestResult(0.5, 0.01, True, ""))
    st.add_request(RequestResult(1.5, 2.0, False, "timeout"))
    one = frozenset({"a-0"})
    st.add_sample(Sample(0.0, one, one, one, one, one), {"zones_in_dns": 1.0})
    st.loop_lag.extend([0.001, 0.2])
    return st


def test_summary_holds_no_loop_figures_and_names_its_world() -> None:
    st = recorded()
    s = summary(SCENARIO, st, policy="naive", policies=[], seed=3, speed=4.0, world="real", end_sim=10.0,
                complete=True)
    info = run_info(SCENARIO, st, world="real", wall_s=1.5)
    assert s["world"] == info["world"] == "real"
    assert set(s) & set(info) == {"world"}
    assert info["loop_lag_p99_s"] == 0.2 and info["wall_s"] == 1.5
    assert info["fidelity_ok"] is False
    assert s["requests_total"] == 2 and s["requests_failed"] == 1


def test_the_run_directory_holds_every_file_and_can_be_written_twice(tmp_path: Path) -> None:
    st = recorded()
    s = summary(SCENARIO, st, policy="naive", policies=[], seed=3, speed=4.0, world="real", end_sim=10.0,
                complete=False)
    info = run_info(SCENARIO, st, world="real", wall_s=1.5)
    for _ in range(2):  # a second write (serve on exit, after a failure) finds the request spool as it was
        write_run_dir(tmp_path, resolved={"name": "w"}, summary=s, run_info=info, state=st, recorder=None)
        assert json.loads((tmp_path / "summary.json").read_text()) == s
        assert json.loads((tmp_path / "run.json").read_text()) == info
        assert (tmp_path / "scenario.yaml").read_text() == "name: w\n"
        lines = (tmp_path / "events.jsonl").read_text().splitlines()
        assert [json.loads(x) for x in lines] == [{"t": 1.0, "kind": "ejected", "subject": "a-0"}]
        assert (tmp_path / "requests.csv").read_text() == (
            "started,latency_s,ok,error\n0.5000,0.01000,1,\n1.5000,2.00000,0,timeout\n")
        with (tmp_path / "samples.csv").open(newline="") as f:
            rows = list(csv.DictReader(f))
        assert [(r["t"], r["routed"], r["zones_in_dns"]) for r in rows] == [("0.0", "1", "1.0")]
        assert not (tmp_path / "timeseries.csv").exists()  # no recorder, no scraped series
    st.request_log.close()
