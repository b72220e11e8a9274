"""`lbsim ... --help` reads cleanly for every command: no type artefacts of the help renderer (`<bool>` beside a
flag, `<str>`, `<list[str]>`, a braced `{scenario}` in the usage line), and every visible option is listed."""

from __future__ import annotations

import re
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from scenarios.cli import app

# A type label as typer 0.29 renders it: <bool>, <int range>, <list[str]>, <uvloop|asyncio>.
TYPE_LABEL = re.compile(r"<[a-z][\w\[\]| ,]*>")


def command_paths() -> list[tuple[str, ...]]:
    """Every command and group of the CLI, as the arguments that reach it."""
    paths: list[tuple[str, ...]] = []

    def walk(cmd: Any, path: tuple[str, ...]) -> None:
        paths.append(path)
        for name, sub in sorted(getattr(cmd, "commands", {}).items()):
            walk(sub, (*path, name))

    walk(typer.main.get_command(app), ())
    return paths


def visible_options(path: tuple[str, ...]) -> list[str]:
    cmd: Any = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return [opt for p in cmd.params if not getattr(p, "hidden", False) for opt in p.opts if opt.startswith("--")]


@pytest.mark.parametrize("path", command_paths(), ids=lambda p: " ".join(p) or "lbsim")
def test_help_has_no_type_artefacts(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    text = result.output
    assert "--help" in text and "Show this message and exit." in text
    assert TYPE_LABEL.search(text) is None, TYPE_LABEL.findall(text)
    assert "bool" not in text.lower()
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert "{" not in usage, usage
    for option in visible_options(path):
        assert option in text, f"{option} missing from `{' '.join(path)} --help`"
    help_row = next(line for line in text.splitlines() if "--help" in line and "Show this message" in line)
    # Nothing between the flag and its description: a flag takes no value.
    assert re.search(r"--help\s+Show this message", help_row), help_row


def test_a_flag_shows_no_value_and_an_option_its_metavar() -> None:
    text = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"}).output
    assert re.search(r"--force\s+Write into", text)
    assert re.search(r"--out\s+DIR\s+Run directory", text)
    assert re.search(r"Usage: .* run \[OPTIONS\] SCENARIO", text)
