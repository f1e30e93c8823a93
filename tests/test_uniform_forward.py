"""`Backbone.require_uniform_forward` (what ZeRO-3 needs): every batch runs the same modules in the
same order, the outputs do not change, and the towers a batch does not use get zero gradients.
Also: the multimodal backbones' own forward computes what the HF model's forward computes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from mmemb_hf.tiny import (
    make_tiny_clip,
    make_tiny_llava_onevision,
    make_tiny_qwen2_vl,
    make_tiny_siglip,
)

from mmemb import plugins
from mmemb.data.schema import Item
from mmemb.testing import shape_png

TEXT = [Item(text="a red circle above a blue square"), Item(text="green")]
IMAGES = [Item(image=shape_png("red", "circle")), Item(image=shape_png("blue", "square"))]
MIXED = [
    Item(text="a red circle"),
    Item(image=shape_png("green", "triangle")),
    Item(text="What colour is the shape?", image=shape_png("blue", "circle", size=(64, 40))),
]

MAKERS: dict[str, Callable[..., Path]] = {
    "llava_onevision": make_tiny_llava_onevision,
    "qwen2_vl": make_tiny_qwen2_vl,
    "clip": make_tiny_clip,
    "siglip": make_tiny_siglip,
}
VISION = {"llava_onevision": "vision_tower", "qwen2_vl": "visual", "clip": "vision_model",
          "siglip": "vision_model"}
BACKBONE = {"siglip": "clip"}  # SigLIP checkpoints are read by the `clip` backbone


pytestmark = pytest.mark.only_plugins("mmemb_hf")


@pytest.fixture(scope="module", params=sorted(MAKERS))
def name_and_dir(request: pytest.FixtureRequest,
                 tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    name = str(request.param)
    return name, MAKERS[name](tmp_path_factory.mktemp(name), weights=True, seed=0)


def _backbone(name_and_dir: tuple[str, Path], *, uniform: bool) -> Any:
    name, path = name_and_dir
    backbone = plugins.build("backbone", BACKBONE.get(name, name), path=str(path)).eval()
    if uniform:
        backbone.require_uniform_forward()
    return backbone


def _run(backbone: Any, items: list[Item]) -> Any:
    return backbone(backbone.processor(items, side="query"))


def _called_modules(backbone: Any, items: list[Item], *, grad: bool = False) -> list[str]:
    """Names of the modules holding their own parameters, in the order the forward enters them."""
    calls: list[str] = []
    handles = [
        module.register_forward_pre_hook(lambda _m, _a, n=name: calls.append(n))
        for name, module in backbone.named_modules()
        if next(module.parameters(recurse=False), None) is not None
    ]
    try:
        with torch.set_grad_enabled(grad):
            _run(backbone, items)
    finally:
        for h in handles:
            h.remove()
    return calls


def test_every_batch_runs_the_same_modules(name_and_dir: tuple[str, Path]) -> None:
    name = name_and_dir[0]
    uniform = _backbone(name_and_dir, uniform=True)
    runs = {label: _called_modules(uniform, items)
            for label, items in [("text", TEXT), ("image", IMAGES), ("mixed", MIXED)]}
    assert any(VISION[name] in n for n in runs["text"])
    assert runs["text"] == runs["mixed"] == runs["image"]
    # Without it a text-only batch skips the vision tower (what breaks ZeRO-3).
    plain = _called_modules(_backbone(name_and_dir, uniform=False), TEXT)
    assert not any(VISION[name] in n for n in plain)


@pytest.mark.parametrize("items", [TEXT, IMAGES, MIXED], ids=["text", "image", "mixed"])
def test_uniform_forward_changes_no_output(name_and_dir: tuple[str, Path],
                                           items: list[Item]) -> None:
    with torch.no_grad():
        plain = _run(_backbone(name_and_dir, uniform=False), items)
        uniform = _run(_backbone(name_and_dir, uniform=True), items)
    torch.testing.assert_close(uniform.hidden_states, plain.hidden_states, rtol=0, atol=0)
    torch.testing.assert_close(uniform.attention_mask, plain.attention_mask, rtol=0, atol=0)


def _grads(backbone: Any, items: list[Item]) -> dict[str, torch.Tensor]:
    backbone.zero_grad(set_to_none=True)
    (_run(backbone, items).hidden_states.float() ** 2).sum().backward()
    return {n: p.grad for n, p in backbone.named_parameters() if p.grad is not None}


def test_unused_tower_gets_zero_gradients(name_and_dir: tuple[str, Path]) -> None:
    """The same parameters get gradients whatever the batch holds (ZeRO-3 reduces them), and
    those of a tower the batch does not use are zeros."""
    name = name_and_dir[0]
    backbone = _backbone(name_and_dir, uniform=True)
    text, image = _grads(backbone, TEXT), _grads(backbone, IMAGES)
    assert text.keys() == image.keys()
    vision = [n for n in text if VISION[name] in n]
    assert vision and all(float(text[n].abs().max()) == 0.0 for n in vision)
    assert any(float(image[n].abs().max()) > 0 for n in vision)
    assert any(float(g.abs().max()) > 0 for n, g in text.items() if n not in vision)


@pytest.mark.parametrize("name", ["llava_onevision", "qwen2_vl"])
def test_forward_equals_the_hf_models_forward(name: str, tmp_path: Path) -> None:
    """The backbone runs the inner model's steps itself (embeddings, image features, language
    model); the result must be what the HF model computes from the same inputs."""
    backbone = _backbone((name, MAKERS[name](tmp_path, weights=True, seed=0)), uniform=False)
    inputs = backbone.processor(MIXED, side="query")
    core = backbone.model.model
    has_image = (inputs["image_sizes"][:, 0] > 0 if name == "llava_onevision"
                 else inputs["image_grid_thw"][:, 0] > 0)
    kwargs: dict[str, Any] = {}
    if name == "llava_onevision":
        from mmemb_hf.common import left_padded_positions

        kwargs = {"pixel_values": inputs["pixel_values"][has_image],
                  "image_sizes": inputs["image_sizes"][has_image],
                  "position_ids": left_padded_positions(inputs["attention_mask"])}
    else:
        grid = inputs["image_grid_thw"][has_image]
        rows = inputs["pixel_values"][has_image]
        kwargs = {"pixel_values": torch.cat([r[: int(g.prod())] for r, g in zip(rows, grid,
                                                                                  strict=True)]),
                  "image_grid_thw": grid,
                  "position_ids": backbone._positions(core, inputs["input_ids"],
                                                      inputs["attention_mask"], grid),
                  "mm_token_type_ids": (inputs["input_ids"]
                                        == backbone._image_token_id).int()}
    with torch.no_grad():
        ours = backbone(inputs).hidden_states
        theirs = core(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                      use_cache=False, **kwargs).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_training_runs_a_trainable_tower_the_batch_does_not_use(
    name_and_dir: tuple[str, Path]
) -> None:
    """Without a uniform forward, a text-only batch still reaches a *trainable* vision tower while
    gradients are on (else a chunk's embeddings can depend on no trainable weight, and ranks
    exchange gradients of different parameter sets); a frozen tower, or inference, skips it."""
    name = name_and_dir[0]
    backbone = _backbone(name_and_dir, uniform=False)
    assert any(VISION[name] in n for n in _called_modules(backbone, TEXT, grad=True))
    assert not any(VISION[name] in n for n in _called_modules(backbone, TEXT, grad=False))
    for n, p in backbone.named_parameters():
        if VISION[name] in n or "projector" in n or "projection" in n or "merger" in n \
                or "image_newline" in n:
            p.requires_grad_(False)
    assert not any(VISION[name] in n for n in _called_modules(backbone, TEXT, grad=True))


def test_zero_from_is_zero_even_for_non_finite_features() -> None:
    """An fp16 tower may overflow on the blank placeholder: 0 * inf would be NaN everywhere."""
    from mmemb_hf.common import zero_from

    feats = torch.tensor([1.0, float("inf"), float("nan")], requires_grad=True)
    z = zero_from([feats])
    assert float(z.detach()) == 0.0
    z.backward()
    assert feats.grad is not None and torch.isfinite(feats.grad).all()
