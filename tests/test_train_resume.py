"""Checkpoints and exact resume with the torch engine: 10 steps straight equal 5 steps, stop,
resume for 5 — on 1 process and on 2 (gloo) — and the checkpoint layout and retention."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from mmemb.train import train
from mmemb.train.checkpoint import list_checkpoints
from mmemb.train.testing import prepare_synthetic, run_workers, tiny_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny" / "llava-onevision")
SETTINGS = {"steps": 5, "batch_size": 3, "save_every": 2, "keep_last": 2}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_synthetic(tmp_path_factory.mktemp("data") / "train", n=48, negatives=1)


def _run(out: Path, data: Path, *, stop_at: int | None = None, resume: str | None = None,
         **extra: Any) -> None:
    loaded = tiny_recipe(TINY, data, out, **{**SETTINGS, **extra})
    train(loaded, echo=lambda s: None, max_steps=stop_at, evaluate=False, resume=resume)


def _final_weights(out: Path) -> dict[str, Any]:
    last = list_checkpoints(out / "checkpoints")[-1]
    return load_file(str(last / "model.safetensors"))


def _assert_identical(a: dict[str, Any], b: dict[str, Any]) -> None:
    import torch

    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name  # type: ignore[arg-type]


def test_resume_is_exact_one_process(tmp_path: Path, data: Path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    _run(straight, data)
    _run(split, data, stop_at=3)
    assert [p.name for p in list_checkpoints(split / "checkpoints")] == [
        "step-00000002", "step-00000003"]
    _run(split, data, resume="latest")
    _assert_identical(_final_weights(split), _final_weights(straight))
    # keep_last=2: steps 4 and 5 are what is left; no temp directory survives
    names = sorted(p.name for p in (split / "checkpoints").iterdir())
    assert names == ["step-00000004", "step-00000005"]
    ckpt = split / "checkpoints" / "step-00000005"
    for f in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng/rank-00000.pt",
              "data/rank-00000.json", "trainer_state.json", "recipe.yaml"):
        assert (ckpt / f).is_file(), f
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 5
    # metrics: one line per step, the resumed run continuing the first one's lines
    steps = [json.loads(x)["step"] for x in (split / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    record = json.loads((split / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("loss", "lr", "grad_norm", "samples_per_s", "pos_sim", "hard_neg_sim",
                "amplification"):
        assert key in record, key
    assert record["amplification"] > 1.0  # EGA with alpha=1 amplifies the negatives


def test_resume_with_lora_and_grad_cache_is_exact(tmp_path: Path, data: Path) -> None:
    extra: dict[str, Any] = {"grad_cache": {"query_chunk": 2, "candidate_chunk": 4}}
    lora = ["model.lora.r=4", "model.lora.dropout=0.1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    for out, stop in ((straight, None), (split, 3)):
        loaded = tiny_recipe(TINY, data, out, overrides=lora, **{**SETTINGS, **extra})
        train(loaded, echo=lambda s: None, max_steps=stop, evaluate=False)
    loaded = tiny_recipe(TINY, data, split, overrides=lora, **{**SETTINGS, **extra})
    train(loaded, echo=lambda s: None, evaluate=False, resume="latest")
    weights = _final_weights(split)
    assert all("lora_" in n for n in weights)  # the checkpoint holds the adapter only
    _assert_identical(weights, _final_weights(straight))


def _worker(rank: int, world: int, data: str, out: str, stop_at: int | None,
            resume: str | None) -> None:
    _run(Path(out), Path(data), stop_at=stop_at, resume=resume)


@pytest.mark.distributed
def test_resume_is_exact_two_processes(tmp_path: Path, data: Path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_workers(_worker, 2, str(data), str(straight), None, None)
    run_workers(_worker, 2, str(data), str(split), 3, None)
    ckpt = split / "checkpoints" / "step-00000003"
    assert (ckpt / "rng" / "rank-00001.pt").is_file()
    assert (ckpt / "data" / "rank-00001.json").is_file()
    run_workers(_worker, 2, str(data), str(split), None, "latest")
    _assert_identical(_final_weights(split), _final_weights(straight))
