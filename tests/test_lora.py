"""LoRA through peft on the tiny LLaVA-OneVision: targeting, gradients, merge, save/load."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from mmemb_hf.tiny import make_tiny_llava_onevision

from mmemb import plugins
from mmemb.data.schema import Item
from mmemb.encoder_io import load_encoder, save_encoder
from mmemb.errors import ConfigError
from mmemb.lora import LoraSpec, apply_lora, has_lora, lora_target_regex, merge_lora
from mmemb.model import Encoder
from mmemb.testing import shape_png

BATCH = [
    Item(text="a red circle above a blue square"),
    Item(image=shape_png("green", "triangle")),
    Item(text="What colour?", image=shape_png("blue", "circle", size=(64, 40)),
         instruction="Represent the given image with the following question:"),
]


pytestmark = pytest.mark.only_plugins("mmemb_hf")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llava_onevision(tmp_path_factory.mktemp("llava_ov_lora"))


def _encoder(path: Path, **kw: Any) -> Encoder:
    bb = plugins.build("backbone", "llava_onevision", path=str(path), **kw)
    return Encoder(bb, plugins.build("pooler", "last_token"))


def _randomise_lora_b(enc: Encoder) -> None:
    # peft starts lora_B at zero (the adapter is a no-op); make it matter for the comparisons.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _lora_modules(enc: Encoder) -> list[str]:
    """Names (inside the transformers model) of the modules that carry an adapter."""
    base = enc.backbone.model.get_base_model()
    return sorted({n.split(".lora_")[0] for n, _ in base.named_parameters() if ".lora_A." in n})


def test_regex_for_names_is_restricted_to_towers() -> None:
    towers = {"language": r"(?:model\.language_model)", "vision": r"(?:model\.vision_tower)"}
    pattern = lora_target_regex(LoraSpec(target_modules=["q_proj", "v_proj"]), towers)
    assert re.fullmatch(pattern, "model.language_model.layers.0.self_attn.q_proj")
    assert not re.fullmatch(pattern, "model.vision_tower.encoder.layers.0.self_attn.q_proj")
    assert not re.fullmatch(pattern, "model.language_model.layers.0.self_attn.q_proj_extra")
    user = lora_target_regex(LoraSpec(target_modules=r".*\.(q|v)_proj", towers=["vision"]),
                             towers)
    assert re.fullmatch(user, "model.vision_tower.encoder.layers.1.self_attn.v_proj")
    assert not re.fullmatch(user, "model.language_model.layers.1.self_attn.v_proj")


def test_language_tower_only_gets_adapters_and_only_they_get_gradients(tiny_dir: Path) -> None:
    enc = _encoder(tiny_dir)
    apply_lora(enc.backbone, LoraSpec(r=4, alpha=8))
    mods = _lora_modules(enc)
    assert mods and all(".language_model." in m for m in mods)
    # The SigLIP tower also has q_proj/k_proj/v_proj: none of them may be caught.
    assert not any("vision_tower" in m for m in mods)
    trainable = [n for n, p in enc.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    _randomise_lora_b(enc)
    enc.train()
    enc(enc.processor(BATCH, side="query")).pow(2).sum().backward()
    with_grad = [n for n, p in enc.named_parameters() if p.grad is not None]
    assert with_grad and all("lora_" in n for n in with_grad)
    assert all(p.grad.abs().sum() > 0 for n, p in enc.named_parameters() if "lora_A" in n)


def test_vision_tower_and_regex_targets(tiny_dir: Path) -> None:
    enc = _encoder(tiny_dir)
    apply_lora(enc.backbone, LoraSpec(target_modules=r".*\.(q_proj|out_proj)",
                                      towers=["vision"]))
    mods = _lora_modules(enc)
    assert mods and all(m.startswith("model.vision_tower.") for m in mods)
    assert {m.rsplit(".", 1)[1] for m in mods} == {"q_proj", "out_proj"}


def test_merged_and_unmerged_embeddings_agree(tiny_dir: Path) -> None:
    enc = _encoder(tiny_dir)
    base = enc.encode(BATCH, side="query")
    apply_lora(enc.backbone, LoraSpec(r=4, target_modules=["q_proj", "v_proj", "up_proj"]))
    _randomise_lora_b(enc)
    unmerged = enc.encode(BATCH, side="query")
    assert (unmerged - base).abs().max() > 1e-3  # the adapter changes the embeddings
    merge_lora(enc.backbone)
    assert not has_lora(enc.backbone)
    merged = enc.encode(BATCH, side="query")
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)


def test_adapter_save_load_round_trip(tiny_dir: Path, tmp_path: Path) -> None:
    enc = _encoder(tiny_dir)
    apply_lora(enc.backbone, LoraSpec(r=4))
    _randomise_lora_b(enc)
    expected = enc.encode(BATCH, side="query")
    out = save_encoder(enc, tmp_path / "enc", backbone={"name": "llava_onevision"},
                       pooler={"name": "last_token"})
    assert (out / "lora_adapter" / "adapter_config.json").is_file()
    loaded = load_encoder(out)
    assert has_lora(loaded.backbone)
    torch.testing.assert_close(loaded.encode(BATCH, side="query"), expected, rtol=0, atol=0)
    # The base weights were saved clean (no LoRA keys) and load on their own.
    from safetensors.torch import load_file

    keys = load_file(str(out / "model.safetensors")).keys()
    assert not any("lora_" in k or "base_layer" in k for k in keys)


def test_lora_with_gradient_checkpointing(tiny_dir: Path) -> None:
    grads = []
    for ckpt in (False, True):
        enc = _encoder(tiny_dir, gradient_checkpointing=ckpt)
        apply_lora(enc.backbone, LoraSpec(r=4))
        _randomise_lora_b(enc)
        enc.train()
        enc(enc.processor(BATCH, side="query")).pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in enc.named_parameters()
                      if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


def test_lora_errors(tiny_dir: Path) -> None:
    enc = _encoder(tiny_dir)
    with pytest.raises(ConfigError, match="matches no linear layer"):
        apply_lora(enc.backbone, LoraSpec(target_modules=["nonexistent_proj"]))
    with pytest.raises(ConfigError, match="not a valid regex"):
        apply_lora(enc.backbone, LoraSpec(target_modules="(unclosed"))
    apply_lora(enc.backbone, LoraSpec())
    with pytest.raises(ConfigError, match="already carries a LoRA adapter"):
        apply_lora(enc.backbone, LoraSpec())
    with pytest.raises(ConfigError, match="does not support LoRA"):
        apply_lora(torch.nn.Linear(2, 2), LoraSpec())
