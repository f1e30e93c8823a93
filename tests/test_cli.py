"""The command line: verbs, help, error reporting, plugin listing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mmemb.cli import VERBS, cli

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "quickstart.yaml")


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_help_lists_the_eight_verbs() -> None:
    code, out, _ = run("--help")
    assert code == 0
    listed = [line.split()[0] for line in out.split("Commands:")[1].strip().splitlines()]
    assert listed == ["prepare", "mine", "train", "eval", "export", "encode", "validate", "plugins"]


@pytest.mark.parametrize("verb", [v for v in VERBS if v != "mine"])
def test_every_verb_has_help_with_an_example(verb: str) -> None:
    code, out, err = run(verb, "--help")
    assert code == 0, err
    assert "Example" in out


def test_unknown_pooler_is_one_clear_line_and_exit_1() -> None:
    code, out, err = run("validate", QUICKSTART, "model.pooler=lasttoken")
    assert code == 1
    lines = [ln for ln in err.splitlines() if ln.strip()]
    pooler_lines = [ln for ln in lines if "pooler" in ln]
    assert len(pooler_lines) == 1, err
    line = pooler_lines[0]
    assert "unknown pooler 'lasttoken'. Did you mean 'last_token'?" in line
    assert "Known poolers:" in line and "mean" in line and "cls" in line
    assert "Traceback" not in err and "Traceback" not in out


def test_traceback_flag_shows_the_exception() -> None:
    result = CliRunner().invoke(
        cli, ["--traceback", "validate", QUICKSTART, "model.pooler=lasttoken"]
    )
    assert result.exit_code == 1
    assert type(result.exception).__name__ == "ConfigError"


def test_plugins_list_shows_kinds_and_providers() -> None:
    code, out, _ = run("plugins", "list")
    assert code == 0
    for kind in [
        "backbones:",
        "poolers:",
        "reweighters:",
        "losses:",
        "sources:",
        "eval_tasks:",
        "exporters:",
        "miners:",
        "tiny_models:",
    ]:
        assert kind in out
    ega = next(ln for ln in out.splitlines() if ln.strip().startswith("ega "))
    assert "[mmemb]" in ega


def test_console_script_runs_as_a_module() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mmemb", "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert out.startswith("mmemb, version ")
