"""The shared test helper for system programs: found, skipped with the Debian package named, or failed in CI."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import require_binary


def test_a_program_on_path_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    program = tmp_path / "lbsim-fake-tool"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CI", raising=False)
    assert require_binary("lbsim-fake-tool", package="fake") == str(program)


def test_a_missing_program_skips_and_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"install the Debian package dnsutils"):
        require_binary("dig", package="dnsutils")


def test_a_missing_program_fails_in_ci(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match=r"Debian package prometheus.*CI is set"):
        require_binary("prometheus", package="prometheus")
