"""Recipe loading: overrides, and every kind of problem reported at once with file:line and key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mmemb.errors import ConfigError
from mmemb.recipe import apply_overrides, load_recipe, parse_override

ROOT = Path(__file__).resolve().parents[1]

MINIMAL = """\
output_dir: out
data:
  train:
    - shards: shards/train
      source: synthetic
      args: {n: 10}
model:
  backbone: {name: llava_onevision, path: tiny/llava-onevision, init: random}
  pooler: last_token
loss:
  reweighter: {name: ega, alpha: 1.0}
train:
  steps: 5
  batch_size: 2
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_parse_and_apply_overrides() -> None:
    assert parse_override("train.lr=1e-5") == (["train", "lr"], "1e-5")
    assert parse_override("train.steps=10") == (["train", "steps"], 10)
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    raw = {"model": {"pooler": "last_token"}, "train": {"lr": 1.0}}
    out = apply_overrides(raw, ["model.pooler.name=mean", "train.lr=0.5", "new.key=x"])
    assert out == {"model": {"pooler": {"name": "mean"}}, "train": {"lr": 0.5}, "new": {"key": "x"}}
    assert raw["model"]["pooler"] == "last_token"  # the input is not modified
    for bad in ["novalue", "=3", "a..b=1"]:
        with pytest.raises(ConfigError, match="expected key=value"):
            parse_override(bad)
    with pytest.raises(ConfigError, match="train.lr is 1.0, not a mapping"):
        apply_overrides(raw, ["train.lr.x=1"])
    listed = {"data": {"train": [{"shards": "a", "args": {"n": 1}}]}}
    assert apply_overrides(listed, ["data.train.0.args.n=5"])["data"]["train"][0]["args"]["n"] == 5
    with pytest.raises(ConfigError, match="data.train is a list of 1; '1' is not an index"):
        apply_overrides(listed, ["data.train.1.args.n=5"])


def test_minimal_recipe_loads_with_defaults(tmp_path: Path) -> None:
    loaded = load_recipe(write(tmp_path, MINIMAL), ["train.lr=1e-5"], check_components=False)
    r = loaded.recipe
    assert r.train.lr == 1e-5 and r.loss.temperature == 0.02
    assert r.model.pooler == {"name": "last_token"}
    assert r.eval.task == {"name": "mmeb"}
    dumped = yaml.safe_load(loaded.dump())
    assert dumped["train"]["lr"] == 1e-5 and dumped["model"]["pooler"]["name"] == "last_token"
    assert "overrides: train.lr=1e-5" in loaded.dump().splitlines()[0]


def test_structural_problems_all_reported_with_lines(tmp_path: Path) -> None:
    text = MINIMAL.replace("  steps: 5", "  steps: five\n  stpes: 5").replace(
        "output_dir: out\n", "output_dir: out\nbogus: 1\n"
    )
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_recipe(path, ["train.batch_size=-2"], check_components=False)
    problems = err.value.problems
    assert len(problems) == 4, problems
    joined = "\n".join(problems)
    assert f"{path}:2: bogus: unknown key; remove it or check its spelling (got 1)" in joined
    assert f"{path}:14: train.steps: Input should be a valid integer" in joined
    assert f"{path}:15: train.stpes: unknown key" in joined
    assert "train.batch_size: Input should be greater than 0 (got -2)" in joined
    assert str(err.value).startswith(f"{path}: 4 problem(s)")


def test_missing_section_and_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train: Field required"):
        load_recipe(write(tmp_path, MINIMAL.split("train:\n  steps")[0]), check_components=False)
    with pytest.raises(ConfigError, match="no such file"):
        load_recipe(tmp_path / "nope.yaml")


def test_component_problems_all_reported(tmp_path: Path) -> None:
    text = (
        MINIMAL.replace("pooler: last_token", "pooler: lasttoken")
        .replace("alpha: 1.0", "alpha: 1.0, alhpa: 2")
        .replace(
            "shards: shards/train\n      source: synthetic\n      args: {n: 10}",
            "shards: shards/missing",
        )
    )
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    joined = "\n".join(err.value.problems)
    assert "model.pooler.name: unknown pooler 'lasttoken'. Did you mean 'last_token'?" in joined
    assert "Known poolers: " in joined and "mean" in joined
    assert "loss.reweighter.alhpa: unknown argument for reweighter 'ega'" in joined
    assert "data.train.0.shards: no shards at 'shards/missing'" in joined
    assert len(err.value.problems) == 3, err.value.problems


def test_backbone_arguments_are_checked(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("init: random", "init: randon"))
    with pytest.raises(
        ConfigError, match=r"model\.backbone\.init: Input should be 'pretrained' or 'random'"
    ):
        load_recipe(path)


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(recipe: Path) -> None:
    load_recipe(recipe)
