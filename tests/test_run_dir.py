"""A run owns its output directory: a fresh start never overwrites another run, `--resume` refuses
a checkpoint of a different recipe (listing the keys), `--resume auto` resumes or starts fresh,
nothing newer than the resumed checkpoint is deleted without `--overwrite`, and metrics.jsonl is
only appended to."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from mmemb.train import RunDirError, read_metrics, train
from mmemb.train.checkpoint import list_checkpoints, read_state, remove_checkpoint
from mmemb.train.rundir import plan_run, read_run, recipe_differences, recipe_keys
from mmemb.train.testing import prepare_synthetic, tiny_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny" / "llava-onevision")
SETTINGS: dict[str, Any] = {"steps": 4, "batch_size": 2, "save_every": 2, "keep_last": 3}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_synthetic(tmp_path_factory.mktemp("data") / "train", n=24, negatives=1)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Path:
    """A real run of 4 steps (checkpoints 2 and 4, a model); tests work on copies of it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(tiny_recipe(TINY, data, out, **SETTINGS), echo=lambda s: None, evaluate=False)
    return out


def _copy(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def _plan(out: Path, data: Path, overrides: tuple[str, ...] = (), **kw: Any) -> Any:
    loaded = tiny_recipe(TINY, data, out, overrides=list(overrides), **SETTINGS)
    return plan_run(out, loaded, **{"resume": None, "overwrite": False, **kw})


def test_a_fresh_start_over_another_run_is_refused_in_one_line(
    finished: Path, tmp_path: Path, data: Path
) -> None:
    out = _copy(finished, tmp_path)
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(RunDirError) as info:
        train(tiny_recipe(TINY, data, out, **SETTINGS), echo=lambda s: None, evaluate=False)
    message = str(info.value)
    assert "\n" not in message
    assert "checkpoints up to step 4 and a trained model" in message
    assert "--resume auto" in message and "--overwrite" in message
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing was touched


def test_resume_refuses_a_different_recipe_and_lists_the_keys(
    finished: Path, tmp_path: Path, data: Path
) -> None:
    out = _copy(finished, tmp_path)
    with pytest.raises(RunDirError) as info:
        _plan(out, data, ("model.pooler.name=mean", "loss.reweighter.alpha=2"), resume="auto")
    message = str(info.value)
    assert "Differences (2)" in message
    assert "loss.reweighter.alpha: checkpoint 1.0, now 2" in message
    assert "model.pooler.name: checkpoint 'last_token', now 'mean'" in message
    # allowed: steps and cadence; the plan resumes the newest checkpoint of the run
    plan = _plan(out, data, ("train.steps=8", "train.log_every=1", "train.save_every=4"),
                 resume="auto")
    assert plan.resume_from == out / "checkpoints" / "step-00000004"
    assert plan.run_id == read_run(out)["run_id"] and not plan.finished
    # the same recipe and steps: the run is complete, nothing to do
    assert _plan(out, data, resume="auto").finished


def test_recipe_differences_ignore_the_allow_list_only(data: Path, tmp_path: Path) -> None:
    a = recipe_keys(tiny_recipe(TINY, data, tmp_path / "a", **SETTINGS).recipe)
    b = recipe_keys(tiny_recipe(TINY, data, tmp_path / "b", overrides=[
        "train.steps=99", "train.eval_every=1", "eval.before_training=true", "export.dir=x",
        "train.lr=0.5"], **SETTINGS).recipe)
    assert recipe_differences(a, b) == ["train.lr: checkpoint 0.001, now 0.5"]


def test_resume_auto_starts_fresh_and_latest_needs_a_checkpoint(
    tmp_path: Path, data: Path
) -> None:
    out = tmp_path / "run"
    with pytest.raises(RunDirError, match="--resume latest: .* holds no checkpoint"):
        _plan(out, data, resume="latest")
    plan = _plan(out, data, resume="auto")
    assert plan.resume_from is None and plan.start_step == 0


def test_resuming_an_older_checkpoint_never_deletes_newer_ones_silently(
    finished: Path, tmp_path: Path, data: Path
) -> None:
    out = _copy(finished, tmp_path)
    older = out / "checkpoints" / "step-00000002"
    with pytest.raises(RunDirError, match="would replace .*step-00000004"):
        _plan(out, data, resume=str(older))
    assert (out / "checkpoints" / "step-00000004").is_dir()
    plan = _plan(out, data, resume=str(older), overwrite=True)
    assert plan.resume_from == older
    assert out / "checkpoints" / "step-00000004" in plan.remove and out / "model" in plan.remove


def test_overwrite_replaces_the_old_run(finished: Path, tmp_path: Path, data: Path) -> None:
    out = _copy(finished, tmp_path)
    old_id = read_run(out)["run_id"]
    train(tiny_recipe(TINY, data, out, **{**SETTINGS, "steps": 2}), echo=lambda s: None,
          evaluate=False, overwrite=True)
    run = read_run(out)
    assert run["run_id"] != old_id and run["finished_step"] == 2
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000002"]
    assert read_state(out / "checkpoints" / "step-00000002")["run_id"] == run["run_id"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2] and {r["run"] for r in lines} == {run["run_id"]}


def test_a_resume_after_a_crash_appends_metrics_and_supersedes_the_lost_steps(
    finished: Path, tmp_path: Path, data: Path
) -> None:
    """The process died after writing step 3-4 metrics but before the step-4 checkpoint: the
    resumed run writes steps 3-4 again after an event line; nothing is truncated."""
    out = _copy(finished, tmp_path)
    remove_checkpoint(out / "checkpoints" / "step-00000004")
    shutil.rmtree(out / "model")
    run = read_run(out)
    run.pop("finished_step")
    (out / "run.json").write_text(json.dumps(run))
    before = (out / "metrics.jsonl").read_text()
    lines: list[str] = []
    train(tiny_recipe(TINY, data, out, **SETTINGS), echo=lines.append, evaluate=False,
          resume="auto")
    assert any("resumed from" in x and "step-00000002 at step 2" in x for x in lines)
    text = (out / "metrics.jsonl").read_text()
    assert text.startswith(before)  # appended, never truncated
    records = [json.loads(x) for x in text.splitlines()]
    assert [r.get("step", r.get("event")) for r in records] == [1, 2, 3, 4, "resumed", 3, 4]
    assert records[4]["superseded_steps"] == [3, 4] and records[4]["from_step"] == 2
    effective = read_metrics(out)
    assert [r["step"] for r in effective] == [1, 2, 3, 4]
    assert effective[2] is not None and effective[2] == records[5]
    # exact resume: the re-run steps match the lost ones (bit-identical loss)
    assert records[5]["loss"] == records[2]["loss"] and records[6]["loss"] == records[3]["loss"]
    assert read_run(out)["attempts"] == 2


def test_a_finished_run_rerun_with_resume_auto_does_nothing(
    finished: Path, tmp_path: Path, data: Path
) -> None:
    out = _copy(finished, tmp_path)
    model = (out / "model" / "mmemb.json").stat().st_mtime_ns
    lines: list[str] = []
    result = train(tiny_recipe(TINY, data, out, **SETTINGS), echo=lines.append, evaluate=False,
                   resume="auto")
    assert result.steps == 4 and "already finished at step 4" in lines[-1]
    assert (out / "model" / "mmemb.json").stat().st_mtime_ns == model


def test_a_signal_after_the_last_steps_check_keeps_the_final_checkpoint(
    tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM arriving after the last step's loss check (the loop's last look at the flag) still
    finds the final checkpoint written, stops before the evals and the save, and the rerun with
    --resume auto finishes the run without training again."""
    import signal as signals

    from mmemb.train import Preempted
    from mmemb.train import trainer as trainer_module

    original = trainer_module._Run._check_loss

    def late_signal(self, flag, step):  # type: ignore[no-untyped-def]
        check = original(self, flag, step)

        def wrapped(loss):  # type: ignore[no-untyped-def]
            check(loss)
            if step == self.steps:
                flag.signum = signals.SIGTERM  # just after the step's all-reduce read the flag
        return wrapped

    loaded = tiny_recipe(TINY, data, tmp_path / "run", steps=3, batch_size=4)
    monkeypatch.setattr(trainer_module._Run, "_check_loss", late_signal)
    with pytest.raises(Preempted) as info:
        train(loaded, echo=lambda s: None, evaluate=False)
    assert info.value.checkpoint is not None and info.value.checkpoint.endswith("step-00000003")
    assert not (tmp_path / "run" / "model").exists()
    monkeypatch.setattr(trainer_module._Run, "_check_loss", original)
    lines: list[str] = []
    result = train(loaded, echo=lines.append, evaluate=False, resume="auto")
    assert result.model_dir is not None and (tmp_path / "run" / "model").is_dir()
    assert any("resumed" in line and "step 3" in line for line in lines), lines
