"""Signals in every phase of a real `python -m mmemb train` subprocess: Ctrl-C (SIGINT) writes a
checkpoint at the next step boundary and exits 130; SIGTERM/SIGUSR1 exit 75 while preparing data,
building the model, evaluating or saving; the printed command (the one that was run, overrides
included, plus `--resume auto`) continues the run when run unchanged."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from cli_runs import (
    command,
    finish,
    metrics_steps,
    printed_resume_command,
    run,
    stalled,
    start,
    wait_until,
    write_recipe,
)

from mmemb.train import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE, read_metrics
from mmemb.train.checkpoint import list_checkpoints


def test_ctrl_c_checkpoints_at_the_step_boundary_and_the_printed_command_resumes(
    tmp_path: Path,
) -> None:
    recipe = write_recipe(tmp_path, steps=6)
    out = tmp_path / "elsewhere"  # an override the resume command must keep
    proc = start(command(recipe, "train.steps=30", f"output_dir={out}"))
    wait_until(proc, lambda: len(metrics_steps(out)) >= 2)
    proc.send_signal(signal.SIGINT)
    output = finish(proc)
    assert proc.returncode == INTERRUPTED_EXIT_CODE, output
    assert "Aborted!" not in output
    stopped = metrics_steps(out)[-1]
    assert f"stopped by SIGINT after step {stopped}" in output
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [f"step-{stopped:08d}"]
    resume = printed_resume_command(output)
    assert resume[1:] == ["-m", "mmemb", "train", str(recipe), "train.steps=30",
                          f"output_dir={out}", "--resume", "auto"]

    again = run(resume)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resumed from {out / 'checkpoints'}/step-{stopped:08d} at step {stopped}" in (
        again.stdout)
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 31))
    assert not (tmp_path / "run").exists()  # nothing went to the recipe's own output_dir


@pytest.mark.parametrize(
    ("phase", "target", "message"),
    [
        ("start", "mmemb.recipe:load_recipe", "while starting"),
        ("prepare", "mmemb.data.prepare:ShardWriter.write", "while preparing data"),
        ("model", "mmemb.train.trainer:build_model", "while building the model"),
        ("eval", "mmemb.train.trainer:evaluate_encoder", "while evaluating after training"),
        ("save", "mmemb.train.trainer:save_encoder", "while saving the model"),
    ],
)
def test_sigterm_in_any_phase_exits_75_and_the_rerun_completes(
    tmp_path: Path, phase: str, target: str, message: str
) -> None:
    recipe = write_recipe(tmp_path, prepared=phase != "prepare", steps=3)
    out = tmp_path / "run"
    ready = tmp_path / "ready"
    # the 3rd sample written: the staging directory already holds a partial shard
    proc = stalled(target, ready, command(recipe), nth=3 if phase == "prepare" else 1)
    wait_until(proc, ready.exists)
    proc.send_signal(signal.SIGTERM)
    output = finish(proc)
    assert proc.returncode == PREEMPTED_EXIT_CODE, output
    assert f"stopped by SIGTERM {message}" in output
    assert "Traceback" not in output
    resume = printed_resume_command(output)
    assert resume[-2:] == ["--resume", "auto"]
    if phase in ("eval", "save"):  # the steps ran: the final checkpoint was written
        assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000003"]
    assert not (out / "model").exists()

    if phase in ("prepare", "save"):  # the two phases that leave files behind
        again = run(resume)
        assert again.returncode == 0, again.stdout + again.stderr
        assert not (tmp_path / "data.partial").exists()
        assert (out / "model" / "mmemb.json").is_file()
        if phase == "save":
            assert "resumed from" in again.stdout and "at step 3" in again.stdout
        assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
