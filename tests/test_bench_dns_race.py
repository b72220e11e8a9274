"""bench/dns_race.py with a few seeds: it runs the DNS automation's pure core and ends with its JSON shares."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_dns_race_bench_prints_a_table_and_ends_with_the_shares_as_json() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "dns_race.py"), "--seeds", "12", "--duration-s", "300"],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[1].split()[:3] == ["protection", "record", "emptied"]
    result = json.loads(lines[-1])
    assert result["seeds"] == 12 and result["duration_s"] == 300.0
    shares = result["emptied_share"]
    assert set(shares) == {"none", "cas", "keep_active", "guard"}
    # One of seeds 0-11 races within 300 s with the defaults (1 in 12); each protection prevents every empty record.
    assert shares["none"] > 0 and shares["cas"] == shares["keep_active"] == shares["guard"] == 0.0
    assert result["stuck_share"]["guard"] == shares["none"]  # the guard keeps the record, not the control plane
    assert result["forced_emptied_share"] == 1.0  # the forced mode's guarantee
    by_endpoint = result["emptied_endpoint_share"]
    assert list(by_endpoint) == ["leasestore-fips.cp.lbsim", "leasestore-ipv6.cp.lbsim", "leasestore.cp.lbsim"]
    assert max(by_endpoint.values()) <= shares["none"] <= sum(by_endpoint.values())


def test_dns_race_bench_rejects_no_seeds() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "dns_race.py"), "--seeds", "0"],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2 and "--seeds" in proc.stderr
