"""The collapse alarm on a provoked collapse: un-normalised EGA at a learning rate far too high
for the tiny model (from scratch, no warm-up) pins the loss at ln(candidates)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mmemb.train import train
from mmemb.train.collapse import COLLAPSED_EXIT_CODE, Collapsed
from mmemb.train.testing import prepare_synthetic, tiny_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny" / "llava-onevision")


def test_a_provoked_collapse_warns_records_and_stops(tmp_path: Path) -> None:
    data = prepare_synthetic(tmp_path / "train", n=64, negatives=1)
    loaded = tiny_recipe(
        TINY, data, tmp_path / "run", steps=40, batch_size=16, lr=3e-2, warmup_steps=0,
        log_every=2, overrides=["loss.reweighter.normalize=false", "train.stop_on_collapse=true"],
    )
    lines: list[str] = []
    with pytest.raises(Collapsed) as info:
        train(loaded, echo=lines.append, evaluate=False)
    assert "ln(32)" in str(info.value) and "normalize=true" in str(info.value)
    assert sum("warning: collapse at step" in line for line in lines) == 1
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    flagged = [r for r in records if "collapse" in r]
    assert len(flagged) == 1 and flagged[0] is records[-1]  # it stopped at the alarm
    assert flagged[0]["step"] < 40
    assert not (tmp_path / "run" / "model").exists()


def test_stop_on_collapse_has_its_own_exit_status(monkeypatch: pytest.MonkeyPatch) -> None:
    import mmemb.train as train_pkg
    from mmemb.cli import cli

    def collapsing(*args: object, **kwargs: object) -> None:
        raise Collapsed("collapse at step 30: ... Stopped (train.stop_on_collapse)")

    monkeypatch.setattr(train_pkg, "train", collapsing)
    result = CliRunner().invoke(cli, ["train", str(ROOT / "recipes" / "quickstart.yaml")])
    assert result.exit_code == COLLAPSED_EXIT_CODE == 3, result.output
    assert "collapse at step 30" in result.output
