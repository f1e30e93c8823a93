"""`clip` backbone on the tiny CLIP: towers, the fusion rule, padding, save/load, LoRA, training."""

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
from mmemb.testing import make_tiny_clip, shape_png

RED = shape_png("red", "circle")
TEXT = [Item(text="a red circle above a blue square"), Item(text="green")]
IMAGES = [Item(image=RED), Item(image=shape_png("blue", "square", size=(40, 64)))]
MIXED = [Item(text="a red circle"), Item(image=RED),
         Item(text="a red circle", image=RED, instruction="Represent the given image.")]


pytestmark = pytest.mark.usefixtures("hf_plugins_only")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("clip"))


def _encoder(path: Path, **kw: Any) -> Encoder:
    bb = plugins.build("backbone", "clip", path=str(path), **kw)
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
    assert a.shape == (len(batch), 32) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_towers_and_fusion_rule(encoder: Encoder) -> None:
    model = encoder.backbone.model
    proc = encoder.processor
    with torch.no_grad():
        text_in = proc.tokenizer(["Represent the given image. a red circle"], return_tensors="pt")
        t = model.get_text_features(**text_in).pooler_output
        pix = proc.image_processor(images=[_decode(RED)], return_tensors="pt")["pixel_values"]
        i = model.get_image_features(pixel_values=pix).pooler_output
        fused = torch.nn.functional.normalize(t, dim=-1) + torch.nn.functional.normalize(i, dim=-1)
        expected_fused = torch.nn.functional.normalize(fused, dim=-1)
        expected_image = torch.nn.functional.normalize(i, dim=-1)
        out = encoder(proc(MIXED, side="query"))
    torch.testing.assert_close(out[2:3], expected_fused, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1:2], expected_image, rtol=1e-5, atol=1e-6)


def _decode(data: bytes) -> Any:
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


def test_padding_matches_single_item(encoder: Encoder) -> None:
    batch = TEXT + MIXED
    with torch.no_grad():
        batched = encoder(encoder.processor(batch, side="query"))
        single = torch.cat([encoder(encoder.processor([it], side="query")) for it in batch])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip(encoder: Encoder, tmp_path: Path) -> None:
    out = save_encoder(encoder, tmp_path / "e", backbone={"name": "clip"},
                       pooler={"name": "last_token"})
    again = load_encoder(out)
    torch.testing.assert_close(again.encode(MIXED, side="query"),
                               encoder.encode(MIXED, side="query"), rtol=0, atol=0)


def test_lora_on_both_towers(tiny_dir: Path) -> None:
    enc = _encoder(tiny_dir)
    apply_lora(enc.backbone, LoraSpec(r=4, target_modules=["q_proj", "v_proj"],
                                      towers=["language", "vision"]))
    with torch.no_grad():
        for n, p in enc.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    enc.train()
    enc(enc.processor(MIXED, side="query")).pow(2).sum().backward()
    with_grad = [n for n, p in enc.named_parameters() if p.grad is not None]
    assert any("text_model" in n for n in with_grad) and any("vision_model" in n for n in with_grad)
    assert all("lora_" in n for n in with_grad)
    unmerged = enc.encode(MIXED, side="query")
    merge_lora(enc.backbone)
    torch.testing.assert_close(enc.encode(MIXED, side="query"), unmerged, rtol=1e-5, atol=1e-5)


def test_one_training_step_reduces_the_infonce_loss(tiny_dir: Path) -> None:
    enc = _encoder(tiny_dir).train()
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
    assert enc.backbone.model.logit_scale.grad is None


def test_errors(encoder: Encoder) -> None:
    with pytest.raises(DataError, match="cannot be decoded"):
        encoder.processor([Item(image=b"GIF89a-truncated")], side="query")


def test_siglip2_is_refused_with_the_reason(tmp_path: Path) -> None:
    from transformers import Siglip2Config

    Siglip2Config().save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="siglip2.*pixel_attention_mask"):
        plugins.build("backbone", "clip", path=str(tmp_path))


def test_siglip_pads_to_its_positions_and_embeds_every_kind_of_item(tmp_path: Path) -> None:
    """SigLIP is read by the same backbone: texts padded to the text tower's positions (it pools
    the last one), max_length defaulting to them and refused above them."""
    from mmemb.testing import make_tiny_siglip

    path = make_tiny_siglip(tmp_path / "siglip", max_length=16)
    enc = _encoder(path)
    inputs = enc.processor(MIXED, side="query")
    assert inputs["input_ids"].shape[1] == 16
    with torch.no_grad():
        out = enc(inputs)
    assert out.shape == (len(MIXED), enc.backbone.hidden_size) and torch.isfinite(out).all()
    with pytest.raises(ConfigError, match="max_length: 77 is more than the 16 positions"):
        plugins.build("backbone", "clip", path=str(path), max_length=77)
