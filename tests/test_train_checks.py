"""What the trainer refuses and how it stops: settings that would do nothing, a non-finite loss
(stopping before the weights change, keeping the last good checkpoint), the start-up summary, and
`--help-recipe`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from mmemb.cli import cli
from mmemb.errors import ConfigError
from mmemb.train import TrainingError, train
from mmemb.train.checkpoint import list_checkpoints
from mmemb.train.testing import prepare_synthetic, tiny_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny" / "llava-onevision")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_synthetic(tmp_path_factory.mktemp("data") / "train", n=24, negatives=2)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"negatives": 0}, r"train\.negatives is 0 but dataset .* has 2 hard negative"),
        ({"negatives": 3}, r"train\.negatives is 3 but dataset .* has only 2"),
        ({"grad_cache": {"query_chunk": 5, "candidate_chunk": 2}},
         r"grad_cache\.query_chunk 5 is larger than train\.batch_size 4"),
        ({"grad_cache": {"query_chunk": 2, "candidate_chunk": 13}},
         r"candidate_chunk 13 is larger than the 12 candidates"),
        ({"save_every": 50}, r"save_every 50 is more than train\.steps 10"),
        ({"eval_every": 5}, r"eval_every is set but data\.eval lists no evaluation data"),
        ({"deepspeed": {"zero_optimization": {"stage": 2}}},
         r"train\.deepspeed is set but train\.engine is 'torch'"),
    ],
    ids=["negatives-ignored", "too-many-negatives", "query-chunk", "candidate-chunk",
         "save-every", "eval-every", "deepspeed-unused"],
)
def test_refuses_settings_that_do_nothing(tmp_path: Path, data: Path, settings: dict[str, Any],
                                          message: str) -> None:
    loaded = tiny_recipe(TINY, data, tmp_path / "run", **{"negatives": 2, **settings})
    with pytest.raises(ConfigError, match=message):
        train(loaded, echo=lambda s: None, evaluate=False)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    lines: list[str] = []
    loaded = tiny_recipe(TINY, data, out, steps=2, negatives=2)
    train(loaded, echo=lines.append, evaluate=False)
    assert any("global batch 4 queries x (1 positive + 2 hard negatives) = 12 candidates: 11 "
               "negatives per query" in x for x in lines)
    assert any("engine=torch" in x and "precision=fp32" in x and "trainable=" in x for x in lines)
    assert "grad_cache: off" in lines
    good = list_checkpoints(out / "checkpoints")
    assert [p.name for p in good] == ["step-00000002"]
    before = load_file(str(good[0] / "model.safetensors"))
    # The loss turns NaN at step 3 (made so in the step's loss check: a resume must keep the
    # recipe, so no setting can be changed to cause it).
    import mmemb.train.trainer as trainer

    real_step = trainer.compute_step

    def nan_step(*args: Any, check_loss: Any, **kwargs: Any) -> Any:
        return real_step(*args, check_loss=lambda loss: check_loss(loss * float("nan")), **kwargs)

    monkeypatch.setattr(trainer, "compute_step", nan_step)
    bad = tiny_recipe(TINY, data, out, steps=4, negatives=2)
    with pytest.raises(TrainingError, match=r"step 3: the loss is nan .*Last good checkpoint: .*"
                                            r"step-00000002"):
        train(bad, echo=lambda s: None, evaluate=False, resume="latest")
    assert list_checkpoints(out / "checkpoints") == good
    after = load_file(str(good[0] / "model.safetensors"))
    assert all((before[k] == after[k]).all() for k in before)


def test_help_recipe_shows_the_launch_header() -> None:
    result = CliRunner().invoke(
        cli, ["train", str(ROOT / "recipes" / "llava_ov_7b.yaml"), "--help-recipe"],
        catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "torchrun --nproc-per-node 8" in result.output
    assert "deepspeed --num_gpus 8" in result.output and "srun" in result.output
    assert "# resolved settings" in result.output and "engine: deepspeed" in result.output


def test_periodic_evaluation_and_tensorboard_fallback(tmp_path: Path, data: Path) -> None:
    eval_dir = tmp_path / "eval"
    from mmemb.data.prepare import prepare

    prepare("synthetic", {"n": 8, "seed": 9, "negatives": 2}, eval_dir)
    out = tmp_path / "run"
    lines: list[str] = []
    loaded = tiny_recipe(TINY, data, out, steps=3, negatives=2, eval_every=2, eval_dir=eval_dir,
                         tensorboard=True)
    result = train(loaded, echo=lines.append, evaluate=False)
    assert (out / "eval_step2" / "results.json").is_file()
    assert any(x.startswith("step 2: eval ") for x in lines)
    assert result.checkpoint is not None and result.checkpoint.name == "step-00000003"
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        assert not (out / "tensorboard").exists()  # optional: JSON lines only
    else:
        assert list((out / "tensorboard").glob("events.out.tfevents.*"))
