"""The benchmarks' cheap parts, without running a benchmark: missing external programs (wrk: exit 2 with how to
install it; HAProxy: a note, its column skipped) and the soak bench's answer check and memory verdict."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
# The bench scripts import their helpers as `_common`, as when run as `python bench/x.py`.
sys.path.insert(0, str(BENCH))

import _common  # noqa: E402
import soak  # noqa: E402


def test_proxy_bench_without_wrk_exits_2_and_says_how_to_install_it(tmp_path: Path) -> None:
    # PATH = an empty directory: wrk cannot be found. The check comes before any child process is started.
    proc = subprocess.run(
        [sys.executable, str(BENCH / "proxy.py"), "--quick"],
        env={"PATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "wrk is not installed" in proc.stderr
    assert "apt-get install wrk" in proc.stderr
    assert "load:" not in proc.stdout  # nothing was measured


def test_require_tool_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SystemExit) as exc:
        _common.require_tool("wrk", "it generates the load")
    assert exc.value.code == _common.EXIT_MISSING_TOOL == 2
    err = capsys.readouterr().err
    assert "wrk is not installed" in err and "sudo apt-get install wrk" in err


def test_missing_haproxy_is_a_note_not_an_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    # haproxy_path also looks in /usr/sbin (not on a user's PATH), so an empty PATH is not enough to hide it here.
    common: ModuleType = _common
    monkeypatch.setattr(common, "haproxy_path", lambda: None)
    assert common.tool_path("haproxy") is None
    note = common.missing_tool("haproxy", "its column is skipped (null)")
    assert "haproxy is not installed" in note and "its column is skipped" in note
    assert "sudo apt-get install haproxy" in note


@pytest.mark.parametrize(
    ("answer", "kind"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", "ok"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabc", "short"),
        (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n", "status_503"),
        (b"", "empty"),
        (b"garbage", "malformed"),
    ],
)
def test_soak_classifies_answers(answer: bytes, kind: str) -> None:
    assert soak.classify(answer) == kind


def _sample(t: float, rss: float) -> soak.Sample:
    return soak.Sample(t, 100, 0, 0.0, 0, 10.0, 1.0, 2.0, rss, 50, 50.0, 20.0, 12, 0, "")


def test_soak_memory_verdict_leaves_out_the_warm_up() -> None:
    # A big step during warm-up, then flat: flat. Growth is measured from the first sample at or after warm-up.
    flat = [_sample(10, 60.0), _sample(20, 80.0), _sample(30, 80.5), _sample(40, 81.0)]
    v = soak.judge(flat, warmup_s=20, max_growth_pct=5)
    assert v.rss_warm_mib == 80.0 and v.rss_end_mib == 81.0
    assert v.growth_pct == pytest.approx(1.25) and v.text.startswith("memory flat")
    assert v.slope_mib_per_min == pytest.approx(3.0)  # 0.05 MiB/s
    grows = [_sample(10, 60.0), _sample(20, 80.0), _sample(30, 82.0), _sample(40, 84.0)]
    assert soak.judge(grows, warmup_s=20, max_growth_pct=5).text.startswith("memory grows")
    assert soak.judge(flat[:1], warmup_s=5, max_growth_pct=5).growth_pct is None  # one sample: no verdict
