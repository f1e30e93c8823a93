"""`qwen2_vl` backbone on the tiny Qwen2-VL (random weights, built locally)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mmemb import plugins
from mmemb.data.schema import Item
from mmemb.encoder_io import load_encoder, save_encoder
from mmemb.errors import ConfigError, DataError
from mmemb.lora import LoraSpec, apply_lora, merge_lora
from mmemb.model import Encoder
from mmemb.testing import make_tiny_llava_onevision, make_tiny_qwen2_vl, shape_png

TEXT = [Item(text="a red circle above a blue square"), Item(text="green")]
IMAGES = [Item(image=shape_png("red", "circle")), Item(image=shape_png("blue", "square"))]
MIXED = [
    Item(text="a red circle"),
    Item(image=shape_png("green", "triangle")),
    Item(text="What colour is the shape?", image=shape_png("blue", "circle", size=(64, 40)),
         instruction="Represent the given image with the following question:"),
    Item(image=shape_png("yellow", "square", size=(30, 70))),
]


pytestmark = pytest.mark.usefixtures("hf_plugins_only")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_qwen2_vl(tmp_path_factory.mktemp("qwen2_vl"))


def _encoder(path: Path, **kw: Any) -> Encoder:
    bb = plugins.build("backbone", "qwen2_vl", path=str(path), **kw)
    return Encoder(bb, plugins.build("pooler", "last_token")).eval()


@pytest.fixture(scope="module")
def encoder(tiny_dir: Path) -> Encoder:
    return _encoder(tiny_dir)


@pytest.mark.parametrize("batch", [TEXT, IMAGES, MIXED], ids=["text", "image", "mixed"])
def test_embeddings_shape_finite_deterministic(encoder: Encoder, batch: list[Item]) -> None:
    inputs = encoder.processor(batch, side="query")
    assert all(v.shape[0] == len(batch) for v in inputs.values())
    with torch.no_grad():
        a, b = encoder(inputs), encoder(inputs)
    assert a.shape == (len(batch), encoder.backbone.hidden_size) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_does_not_change_last_token(tiny_dir: Path, side: str) -> None:
    enc = _encoder(tiny_dir, padding_side=side)
    inputs = enc.processor(MIXED, side="query")
    assert (inputs["attention_mask"].sum(1) < inputs["attention_mask"].shape[1]).any()
    with torch.no_grad():
        batched = enc(inputs)
        single = torch.cat([enc(enc.processor([it], side="query")) for it in MIXED])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


def test_prompt_and_image_token_count(encoder: Encoder) -> None:
    proc = encoder.processor
    item = Item(text="What colour?", image=shape_png(size=(64, 64)),
                instruction="Represent the given image with the following question:")
    inputs = proc([item], side="query")
    text = proc.tokenizer.decode(inputs["input_ids"][0])
    # 64x64 px with 8 px patches and 2x2 merging: 8x8 patches -> 16 image tokens.
    assert text.count("<|image_pad|>") == 16
    assert inputs["image_grid_thw"][0].tolist() == [1, 8, 8]
    assert ("<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 16 + "<|vision_end|>"
            "Represent the given image with the following question: What colour?<|im_end|>\n"
            "<|im_start|>assistant\n") in text


def test_max_image_tokens_and_max_pixels_bound_the_image(tiny_dir: Path) -> None:
    big = [Item(image=shape_png(size=(128, 128)))]
    n_default = int(_encoder(tiny_dir).processor(big, side="query")["input_ids"].eq(
        _encoder(tiny_dir).processor.image_token_id).sum())
    capped = _encoder(tiny_dir, max_image_tokens=9)
    inputs = capped.processor(big, side="query")
    n = int(inputs["input_ids"].eq(capped.processor.image_token_id).sum())
    assert n_default == 64 and n <= 9
    with torch.no_grad():
        assert torch.isfinite(capped(inputs)).all()
    pixels = _encoder(tiny_dir, max_pixels=32 * 32).processor(big, side="query")
    assert pixels["image_grid_thw"][0].tolist() == [1, 4, 4]
    with pytest.raises(ConfigError, match="max_pixels"):
        _encoder(tiny_dir, max_pixels=100)


def test_save_load_round_trip(encoder: Encoder, tmp_path: Path) -> None:
    out = save_encoder(encoder, tmp_path / "e", backbone={"name": "qwen2_vl"},
                       pooler={"name": "last_token"})
    again = load_encoder(out)
    torch.testing.assert_close(again.encode(MIXED, side="query"),
                               encoder.encode(MIXED, side="query"), rtol=0, atol=0)


def test_lora_only_adapters_train_and_merge_agrees(tiny_dir: Path) -> None:
    enc = _encoder(tiny_dir)
    apply_lora(enc.backbone, LoraSpec(r=4))
    base = enc.backbone.model.get_base_model()
    assert not any("visual" in n for n, _ in base.named_parameters() if "lora_" in n)
    with torch.no_grad():
        for n, p in enc.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    enc.train()
    enc(enc.processor(MIXED, side="query")).pow(2).sum().backward()
    with_grad = [n for n, p in enc.named_parameters() if p.grad is not None]
    assert with_grad and all("lora_" in n for n in with_grad)
    unmerged = enc.encode(MIXED, side="query")
    merge_lora(enc.backbone)
    torch.testing.assert_close(enc.encode(MIXED, side="query"), unmerged, rtol=1e-5, atol=1e-5)


def test_vision_lora_uses_the_vision_names(tiny_dir: Path) -> None:
    enc = _encoder(tiny_dir)
    apply_lora(enc.backbone, LoraSpec(target_modules=["qkv"], towers=["vision"]))
    names = {n.split(".lora_")[0] for n, _ in enc.backbone.model.get_base_model()
             .named_parameters() if ".lora_A." in n}
    assert names and all(n.startswith("model.visual.blocks.") for n in names)


def test_one_training_step_reduces_the_infonce_loss(tiny_dir: Path) -> None:
    enc = _encoder(tiny_dir, freeze=["vision"]).train()
    colours = ["red", "green", "blue", "yellow"]
    q_in = enc.processor([Item(image=shape_png(c)) for c in colours], side="query")
    c_in = enc.processor([Item(text=f"a {c} circle") for c in colours], side="target")
    params = [p for p in enc.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-2)

    def loss() -> torch.Tensor:
        logits = enc(q_in) @ enc(c_in).T / 0.05
        return torch.nn.functional.cross_entropy(logits, torch.arange(len(colours)))

    before = loss()
    opt.zero_grad()
    before.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)  # a short step: the InfoNCE surface is sharp
    opt.step()
    with torch.no_grad():
        assert loss().item() < before.item()
    vision = enc.backbone.model.model.visual.blocks[0].attn.qkv.weight
    assert not vision.requires_grad and vision.grad is None


def test_errors(encoder: Encoder, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot be decoded"):
        encoder.processor([Item(image=b"\x89PNG broken")], side="target")
    with pytest.raises(DataError, match="reserves for images"):
        encoder.processor([Item(text="<|image_pad|>")], side="query")
    llava = make_tiny_llava_onevision(tmp_path / "llava", weights=False)
    with pytest.raises(ConfigError, match="'llava_onevision' model"):
        plugins.build("backbone", "qwen2_vl", path=str(llava), init="random")
