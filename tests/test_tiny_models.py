"""The tiny model factory: files written, reload through from_pretrained, the tokenizer, the CLI,
and the committed tiny LLaVA-OneVision definition in recipes/tiny/."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmemb.testing import (
    build_tiny_tokenizer,
    make_tiny_clip,
    make_tiny_llava_onevision,
    make_tiny_qwen2_vl,
    make_tiny_text_model,
)
from mmemb.testing.tiny import LLAVA_MEDIA_TOKENS, QWEN_SPECIAL_TOKENS, main

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "recipes" / "tiny" / "llava-onevision"


def test_tokenizer_covers_english_and_keeps_special_tokens_whole(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    build_tiny_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.padding_side == "left"  # passed to the constructor, so it is saved
    text = "Represent the given image with the following question: where is the red circle?"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) <= 20  # common words are merged, not spelled out byte by byte
    # Words never seen in training still round-trip (byte-level BPE has no unknown token).
    odd = "Zebras über naïve 東京 42!"
    assert tok.decode(tok(odd)["input_ids"]) == odd
    for special in QWEN_SPECIAL_TOKENS + LLAVA_MEDIA_TOKENS:
        assert len(tok(special)["input_ids"]) == 1, special
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"


def test_tokenizer_is_deterministic() -> None:
    a = build_tiny_tokenizer().backend_tokenizer.to_str()
    b = build_tiny_tokenizer().backend_tokenizer.to_str()
    assert a == b


def test_llava_onevision_reloads_with_from_pretrained(tmp_path: Path) -> None:
    from transformers import AutoImageProcessor, LlavaOnevisionForConditionalGeneration

    path = make_tiny_llava_onevision(tmp_path / "m", seed=1)
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json",
            "preprocessor_config.json"} <= names
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(path)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < 500_000  # small enough for a CPU quickstart
    again = make_tiny_llava_onevision(tmp_path / "m2", seed=1)
    model2 = LlavaOnevisionForConditionalGeneration.from_pretrained(again)
    for (n, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items(),
                                  strict=True):
        assert torch.equal(a, b), n  # same seed, same weights
    proc = AutoImageProcessor.from_pretrained(path)
    assert proc.size["height"] == model.config.vision_config.image_size


def test_no_weights_writes_only_small_text_files(tmp_path: Path) -> None:
    path = make_tiny_llava_onevision(tmp_path / "d", weights=False)
    files = sorted(p.name for p in path.iterdir())
    assert files == ["config.json", "preprocessor_config.json", "tokenizer.json",
                     "tokenizer_config.json"]
    assert sum(p.stat().st_size for p in path.iterdir()) < 200_000


@pytest.mark.parametrize("factory,cls_name", [
    (make_tiny_qwen2_vl, "Qwen2VLForConditionalGeneration"),
    (make_tiny_clip, "CLIPModel"),
    (make_tiny_text_model, "BertModel"),
])
def test_other_tiny_models_reload(tmp_path: Path, factory: object, cls_name: str) -> None:
    import transformers

    path = factory(tmp_path / "m")  # type: ignore[operator]
    model = getattr(transformers, cls_name).from_pretrained(path)
    assert sum(p.numel() for p in model.parameters()) < 500_000
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert len(tok) <= model.config.get_text_config().vocab_size


def test_cli_writes_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["llava_onevision", str(tmp_path / "cli"), "--no-weights"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["files"] == ["config.json", "preprocessor_config.json", "tokenizer.json",
                               "tokenizer_config.json"]


def test_cli_as_a_module(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mmemb.testing.tiny", "text", str(tmp_path / "t"), "--no-weights"],
        capture_output=True, text=True, check=True,
    )
    assert json.loads(out.stdout.strip().splitlines()[-1])["kind"] == "text"


def test_committed_tiny_definition_is_what_the_factory_writes(tmp_path: Path) -> None:
    fresh = make_tiny_llava_onevision(tmp_path / "fresh", weights=False)
    for name in ("config.json", "preprocessor_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        committed = json.loads((COMMITTED / name).read_text())
        generated = json.loads((fresh / name).read_text())
        committed.pop("transformers_version", None)
        generated.pop("transformers_version", None)
        assert committed == generated, (
            f"recipes/tiny/llava-onevision/{name} is stale: regenerate it with "
            "`python -m mmemb.testing.tiny llava_onevision recipes/tiny/llava-onevision "
            "--no-weights`"
        )


def test_hf_plugin_is_declared_as_an_entry_point() -> None:
    eps = importlib.metadata.entry_points(group="mmemb")
    assert any(ep.name == "hf" and ep.value == "mmemb_hf" for ep in eps)
