"""`mmemb validate` reports every problem of a recipe at once, with its line and a count: unknown
keys with the closest valid key, bad values, bad component arguments, missing input files and
image folders, and model weights that cannot be had offline -- before anything is built."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from mmemb import hub
from mmemb.cli import cli
from mmemb.errors import ConfigError
from mmemb.recipe import check_recipe
from mmemb.validate import recipe_problems, validate_recipe

ROOT = Path(__file__).resolve().parents[1]

RECIPE = """\
output_dir: out
data:
  train:
    - shards: shards/a
      source: mmeb_train
      args: {input: MMEB-train/A/original-00000-of-00001.parquet, image_root: MMEB-train}
    - shards: shards/b
      source: mmeb_train
      args:
        input: [present.parquet, MMEB-train/B/*.parquet]
        image_root: MMEB-train
    - shards: shards/c
      source: mmeb_train
      args: {input: present.parquet, image_root: images}
model:
  backbone: {name: llava_onevision, path: tiny/llava-onevision, init: random}
loss:
  temperature: 0.05
  reweighter: {name: ega, alpha: 1.0}
train:
  steps: 5
  batch_size: 2
"""


@pytest.fixture
def recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """RECIPE in a working directory holding `present.parquet` and `images/`, with the tiny
    LLaVA-OneVision config next to the recipe (so the backbone path is local)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "present.parquet").write_bytes(b"")
    (tmp_path / "images").mkdir()
    (tmp_path / "tiny").symlink_to(ROOT / "recipes" / "tiny")
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    return path


def _line(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def test_every_kind_of_problem_in_one_report(recipe: Path) -> None:
    overrides = ["train.stpes=5", "loss.reweighter.alhpa=2", "loss.temprature=1",
                 "train.lr=-1", "model.pooler=lasttoken", "trian.steps=1"]
    with pytest.raises(ConfigError) as err:
        validate_recipe(recipe, overrides)
    problems = err.value.problems
    joined = "\n".join(problems)
    # unknown keys, each with the closest valid key
    assert "(override train.stpes=5): train.stpes: unknown key" in joined
    assert "Did you mean 'train.steps'?" in joined
    assert "loss.reweighter.alhpa: unknown argument for reweighter 'ega'" in joined
    assert "Did you mean 'loss.reweighter.alpha'?" in joined
    assert "Did you mean 'loss.temperature'?" in joined
    assert "trian: unknown key" in joined and "Did you mean 'train'?" in joined
    # a bad value and an unknown component do not hide each other (nor the keys above)
    assert "train.lr: Input should be greater than 0 (got -1)" in joined
    assert "model.pooler.name: unknown pooler 'lasttoken'. Did you mean 'last_token'?" in joined
    # missing inputs, each with its recipe line; present ones are not reported
    a_line = _line(recipe, "MMEB-train/A/")
    assert (f"{recipe}:{a_line}: data.train.0.args.input: "
            "'MMEB-train/A/original-00000-of-00001.parquet' does not exist") in joined
    assert "data.train.1.args.input.1: 'MMEB-train/B/*.parquet' does not exist" in joined
    assert "present.parquet" not in joined and "'images'" not in joined
    # a missing image folder shared by two datasets is named once, with how many share it
    assert joined.count("directory 'MMEB-train' does not exist") == 1
    assert "(and 1 more dataset(s) with this image_root)" in joined
    assert "(--input)" not in joined
    assert len(problems) == 9, problems
    assert str(err.value).splitlines()[0] == (
        f"{recipe}: 9 problem(s); nothing was built or run. Fix them and run `mmemb validate` "
        "again."
    )


def test_prepared_datasets_need_no_inputs(recipe: Path) -> None:
    for name in ("a", "b"):
        shards = recipe.parent / "shards" / name
        shards.mkdir(parents=True)
        (shards / "manifest.json").write_text("{}")
    _, problems = recipe_problems(recipe)
    assert problems == [], problems


def test_bad_overrides_are_all_reported_beside_the_rest(recipe: Path) -> None:
    check = check_recipe(recipe, ["train.lr", "data.train.7.weight=2", "train.steps=0"])
    joined = "\n".join(check.problems)
    assert "override 'train.lr': expected key=value" in joined
    assert "'7' is not an index into it (0..2)" in joined
    assert "train.steps: Input should be greater than 0 (got 0)" in joined


def test_a_missing_local_backbone_directory_is_named(recipe: Path) -> None:
    _, problems = recipe_problems(recipe, ["model.backbone.path=./models/none"])
    assert any("model.backbone.path: directory './models/none' does not exist" in p
               for p in problems), problems


def test_hub_weights_offline_and_not_cached(recipe: Path, monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, problems = recipe_problems(recipe, ["model.backbone.path=org/model"])
    expected = (f"{recipe} (override model.backbone.path=org/model): model.backbone.path: "
                "'org/model' is not a local directory, so it is a Hugging Face hub id; it is not "
                "in the local cache")
    hits = [p for p in problems if "org/model" in p]
    assert len(hits) == 1 and hits[0].startswith(expected), problems
    assert "offline mode is on" in hits[0] and ".." not in hits[0]


def _fake_cache(cache: Path, repo: str) -> None:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/REV/...}."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("abc123")
    (folder / "snapshots" / "abc123").mkdir(parents=True)
    (folder / "snapshots" / "abc123" / "config.json").write_text("{}")


def test_cached_hub_model_is_fine_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fake_cache(tmp_path, "org/model")
    assert hub.cached("org/model") is not None
    assert hub.unavailable("org/model") is None
    assert hub.unavailable("org/other") is not None


def test_unreachable_hub_fails_at_once_from_the_cache(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    """Not offline, but the hub does not answer: the load is made cache-only (no retries) and the
    error says why, with one final period."""
    from huggingface_hub import constants
    from mmemb_hf.common import BackboneLoadError, load_or_fail

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "reachable", lambda: False)
    seen: dict[str, Any] = {}

    def loader(path: str, **kwargs: Any) -> None:
        seen.update(kwargs)
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.")

    with pytest.raises(BackboneLoadError) as err:
        load_or_fail("model config", "org/model", loader)
    assert seen == {"local_files_only": True}
    message = str(err.value)
    assert "the hub (https://huggingface.co) does not answer" in message
    assert message.endswith("local model directory.") and ".." not in message


def test_load_error_has_no_doubled_period(tmp_path: Path) -> None:
    from mmemb_hf.common import BackboneLoadError, load_or_fail

    def loader(path: str) -> None:
        raise OSError("config.json is not valid JSON.")

    with pytest.raises(BackboneLoadError) as err:
        load_or_fail("model config", str(tmp_path), loader)
    assert "config.json is not valid JSON. Check the path" in str(err.value)


def test_cli_lists_all_missing_mmeb_files_exit_1(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    """The shipped 7B recipe without MMEB-train present: all 20 inputs, their lines, the shared
    image folder once, the hub id (offline, not cached) -- one report, exit status 1."""
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = ROOT / "recipes" / "llava_ov_7b.yaml"
    result = CliRunner().invoke(cli, ["validate", str(recipe)])
    assert result.exit_code == 1, result.output
    out = result.output
    assert out.startswith(f"error: {recipe}: 22 problem(s)"), out
    lines = out.splitlines()
    inputs = [line for line in lines if ".args.input: " in line]
    assert len(inputs) == 20
    for i, line in enumerate(inputs):
        assert line.startswith(f"{recipe}:{39 + 3 * i}: data.train.{i}.args.input: 'MMEB-train/")
    assert sum("image_root: directory 'MMEB-train'" in line for line in lines) == 1
    assert any("model.backbone.path: 'llava-hf/llava-onevision-qwen2-7b-ov-hf'" in line
               for line in lines)
    assert "--input" not in out and "Retry" not in out
