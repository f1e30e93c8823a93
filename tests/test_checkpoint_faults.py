"""Faults around checkpoints and data, on a real `python -m mmemb train` subprocess: SIGKILL in the
middle of a checkpoint write, a write that fails (a file-size limit), and a shard truncated
while training runs."""

from __future__ import annotations

import json
import resource
import signal
from pathlib import Path

from cli_runs import command, finish, metrics_steps, run, stalled, start, wait_until, write_recipe
from safetensors.torch import load_file

from mmemb.train import read_metrics
from mmemb.train.checkpoint import list_checkpoints, read_state


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one_and_the_rerun_resumes(
    tmp_path: Path,
) -> None:
    recipe = write_recipe(tmp_path, steps=6, save_every=2, keep_last=3)
    out, ready = tmp_path / "run", tmp_path / "ready"
    # stalled on the 2nd checkpoint (step 4), after the engine wrote weights and optimizer
    proc = stalled("mmemb.train.checkpoint:rng_state", ready, command(recipe), nth=2)
    wait_until(proc, ready.exists)
    partial = out / "checkpoints" / ".tmp-step-00000004"
    assert (partial / "model.safetensors").is_file()
    proc.send_signal(signal.SIGKILL)
    finish(proc)
    assert proc.returncode == -signal.SIGKILL

    ckpts = list_checkpoints(out / "checkpoints")
    assert [p.name for p in ckpts] == ["step-00000002"]  # the temp directory does not count
    assert read_state(ckpts[0])["step"] == 2
    assert load_file(str(ckpts[0] / "model.safetensors"))  # loadable

    again = run(command(recipe, "--resume", "auto"))
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resumed from {ckpts[0]} at step 2" in again.stdout
    assert not partial.exists()
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [
        "step-00000002", "step-00000004", "step-00000006"]
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert metrics_steps(out)[:4] == [1, 2, 3, 4]  # the killed run's lines are still there


def _limit_file_size() -> None:
    # 64 KiB: metrics and run.json fit, the tiny model's checkpoint weights do not. SIGXFSZ
    # ignored, so the write fails with EFBIG instead of killing the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_a_checkpoint_write_that_fails_leaves_the_previous_one_intact(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, steps=2)
    out = tmp_path / "run"
    first = run(command(recipe))
    assert first.returncode == 0, first.stdout + first.stderr
    good = out / "checkpoints" / "step-00000002"
    files = {p.relative_to(good): p.read_bytes() for p in good.rglob("*") if p.is_file()}

    limited = run(command(recipe, "train.steps=4", "--resume", "auto"),
                  preexec_fn=_limit_file_size)
    assert limited.returncode == 1, limited.stdout + limited.stderr
    assert "Traceback" not in limited.stderr
    errors = [x for x in limited.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: could not write checkpoint"), errors
    assert "File too large" in errors[0] and f"the previous checkpoint {good} is intact" in (
        errors[0])
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]
    assert {p.relative_to(good): p.read_bytes() for p in good.rglob("*") if p.is_file()} == files
    assert (out / "model" / "mmemb.json").is_file()  # the first run's model is untouched


def test_a_shard_truncated_during_training_is_an_error_naming_it(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, n=48, shard_size=4, steps=200, save_every=1, keep_last=1)
    data, out = tmp_path / "data", tmp_path / "run"
    # one shard scanned at a time, so the stream meets the damage within a few steps
    proc = start(command(recipe, "data.shuffle_buffer=4"))
    wait_until(proc, lambda: len(metrics_steps(out)) >= 2)
    manifest = json.loads((data / "manifest.json").read_text())
    for shard in manifest["shards"]:
        path = data / shard["path"]
        path.write_bytes(path.read_bytes()[: shard["bytes"] // 2])
    output = finish(proc)
    assert proc.returncode == 1, output
    lines = [x for x in output.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, output
    assert "training shard(s) are damaged" in lines[0] and "Traceback" not in output
    assert str(data / manifest["shards"][0]["path"]) in lines[0]
    assert f"manifest.json says {manifest['shards'][0]['bytes']}" in lines[0]
    assert "The last checkpoint is" in lines[0] and "--resume auto" in lines[0]
    assert len(metrics_steps(out)) < 20  # stopped at once, not after skipping the damage


def test_a_resave_killed_between_its_renames_gets_its_old_copy_back(tmp_path: Path) -> None:
    from mmemb.train.checkpoint import STATE_FILE, sweep_stale

    root = tmp_path / "checkpoints"
    trash = root / ".trash-step-00000004"  # step-4 was renamed away, the new copy never arrived
    trash.mkdir(parents=True)
    (trash / STATE_FILE).write_text('{"step": 4}')
    (root / ".tmp-step-00000004").mkdir()  # and the half-written new copy
    leftover = root / ".trash-step-00000002"  # an ordinary leftover: step-2 is there
    leftover.mkdir()
    (leftover / STATE_FILE).write_text('{"step": 2}')
    (root / "step-00000002").mkdir()
    sweep_stale(root)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000004"]
    assert (root / "step-00000004" / STATE_FILE).read_text() == '{"step": 4}'
