"""The DeepSpeed engine on the CPU (gloo): ZeRO with LoRA and GradCache trains the same weights as
the torch engine, and resumes exactly from its own checkpoints (2 processes, ZeRO-2 and ZeRO-3,
batches mixing text-only and image items)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from mmemb.train import train
from mmemb.train.checkpoint import list_checkpoints
from mmemb.train.testing import prepare_synthetic, run_workers, tiny_recipe

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny" / "llava-onevision")
LORA = ["model.lora.r=4"]
GC = {"query_chunk": 2, "candidate_chunk": 3}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_synthetic(tmp_path_factory.mktemp("data") / "train", n=48, negatives=1)


def _run(out: Path, data: Path, engine: str, stage: int, *, steps: int = 4,
         stop_at: int | None = None, resume: str | None = None,
         lora: list[str] = LORA) -> None:
    extra: dict[str, Any] = {"engine": engine}
    if engine == "deepspeed":
        extra["deepspeed"] = {"zero_optimization": {"stage": stage}}
    loaded = tiny_recipe(TINY, data, out, overrides=lora, steps=steps, batch_size=3,
                         grad_cache=GC, save_every=2, **extra)
    train(loaded, echo=lambda s: None, max_steps=stop_at, evaluate=False, resume=resume)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(list_checkpoints(out / "checkpoints")[-1] / "model.safetensors"))


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> None:
    assert a.keys() == b.keys() and a and all("lora_" in n for n in a)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=tol, atol=tol, msg=name)


def test_zero2_lora_grad_cache_matches_the_torch_engine(tmp_path: Path, data: Path) -> None:
    _run(tmp_path / "torch", data, "torch", 0, steps=3)
    _run(tmp_path / "ds", data, "deepspeed", 2, steps=3)
    assert (list_checkpoints(tmp_path / "ds" / "checkpoints")[-1] / "deepspeed").is_dir()
    assert (tmp_path / "ds" / "model" / "mmemb.json").is_file()
    _assert_close(_weights(tmp_path / "ds"), _weights(tmp_path / "torch"), 1e-5)


def _worker(rank: int, world: int, out: str, data: str, engine: str, stage: int,
            stop_at: int | None, resume: str | None, lora: list[str] = LORA) -> None:
    _run(Path(out), Path(data), engine, stage, stop_at=stop_at, resume=resume, lora=lora)


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
def test_zero_two_processes_lora_grad_cache_resume(tmp_path: Path, data: Path,
                                                   stage: int) -> None:
    """The data alternates caption->image and image->caption samples, so a rank's chunk is often
    text-only while the other's has images: under ZeRO-3 the backbone must still run the vision
    tower on every rank (`require_uniform_forward`), or the collectives mismatch and gloo
    aborts."""
    ref, straight, split = tmp_path / "torch", tmp_path / "straight", tmp_path / "split"
    run_workers(_worker, 2, str(ref), str(data), "torch", 0, None, None)
    run_workers(_worker, 2, str(straight), str(data), "deepspeed", stage, None, None)
    run_workers(_worker, 2, str(split), str(data), "deepspeed", stage, 2, None)
    run_workers(_worker, 2, str(split), str(data), "deepspeed", stage, None, "latest")
    _assert_close(_weights(split), _weights(straight), 0.0)  # resume is exact
    _assert_close(_weights(straight), _weights(ref), 1e-5)  # and ZeRO trains what torch does


@pytest.mark.distributed
def test_zero3_lora_on_every_tower(tmp_path: Path, data: Path) -> None:
    """Trainable vision and projector adapters under ZeRO-3: a rank whose chunk has no image
    back-propagates zeros through the placeholder image, so its gradients still reduce with the
    other rank's, and the result is the torch engine's."""
    lora = [*LORA, "model.lora.towers=[language,vision,projector]"]
    run_workers(_worker, 2, str(tmp_path / "torch"), str(data), "torch", 0, None, None, lora)
    run_workers(_worker, 2, str(tmp_path / "z3"), str(data), "deepspeed", 3, None, None, lora)
    weights = _weights(tmp_path / "z3")
    assert any("vision_tower" in n for n in weights)
    _assert_close(weights, _weights(tmp_path / "torch"), 1e-5)
