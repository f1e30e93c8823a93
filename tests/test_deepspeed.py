"""The DeepSpeed engine on the CPU (gloo): ZeRO with LoRA and GradCache trains the same weights as
the torch engine, and resumes exactly from its own checkpoints (2 processes, ZeRO-2 and ZeRO-3,
batches mixing text-only and image items)."""

from __future__ import annotations

import json
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
         lora: list[str] = LORA, precision: str = "fp32") -> None:
    extra: dict[str, Any] = {"engine": engine, "precision": precision}
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


@pytest.fixture(scope="module")
def torch_reference(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Path:
    out = tmp_path_factory.mktemp("torch")
    _run(out, data, "torch", 0, steps=3)
    return out


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_zero_stages_with_lora_and_grad_cache_match_the_torch_engine(
    tmp_path: Path, data: Path, torch_reference: Path, stage: int
) -> None:
    _run(tmp_path, data, "deepspeed", stage, steps=3)
    assert (list_checkpoints(tmp_path / "checkpoints")[-1] / "deepspeed").is_dir()
    assert (tmp_path / "model" / "mmemb.json").is_file()
    _assert_close(_weights(tmp_path), _weights(torch_reference), 1e-5)


def _losses(out: Path) -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [float(json.loads(line)["loss"]) for line in lines]


def test_zero3_bf16_follows_the_fp32_run(tmp_path: Path, data: Path,
                                         torch_reference: Path) -> None:
    """bf16 weights and activations (DeepSpeed keeps fp32 master weights): the loss curve stays
    within bf16 rounding of the fp32 run, and the saved weights are the fp32 masters."""
    _run(tmp_path, data, "deepspeed", 3, steps=3, precision="bf16")
    recipe = (tmp_path / "recipe.yaml").read_text()
    assert "precision: bf16" in recipe
    bf16, fp32 = _losses(tmp_path), _losses(torch_reference)
    assert len(bf16) == len(fp32) == 3
    for got, want in zip(bf16, fp32, strict=True):
        assert abs(got - want) <= 0.02 * abs(want), (bf16, fp32)
    weights = _weights(tmp_path)
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())
    assert any(w.abs().max() > 0 for n, w in weights.items() if "lora_B" in n)  # it trained


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


def _backbone_worker(rank: int, world: int, out: str, data: str, engine: str, name: str,
                     path: str) -> None:
    extra: dict[str, Any] = {"engine": engine}
    if engine == "deepspeed":
        extra["deepspeed"] = {"zero_optimization": {"stage": 3}}
    overrides = [*LORA, f"model.backbone.name={name}", f"model.backbone.path={path}"]
    loaded = tiny_recipe(TINY, data, out, overrides=overrides, steps=2, batch_size=3,
                         grad_cache=GC, save_every=2, **extra)
    train(loaded, echo=lambda s: None, evaluate=False)


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["qwen2_vl", "clip"])
def test_zero3_mixed_modalities_other_backbones(tmp_path: Path, data: Path, name: str) -> None:
    """The uniform forward of the other multimodal backbones: ZeRO-3 on mixed batches trains what
    the torch engine does."""
    from mmemb_hf.tiny import make_tiny_clip, make_tiny_qwen2_vl

    maker = make_tiny_qwen2_vl if name == "qwen2_vl" else make_tiny_clip
    path = str(maker(tmp_path / "model", weights=True, seed=0))
    for engine in ("torch", "deepspeed"):
        run_workers(_backbone_worker, 2, str(tmp_path / engine), str(data), engine, name, path)
    _assert_close(_weights(tmp_path / "deepspeed"), _weights(tmp_path / "torch"), 1e-5)
