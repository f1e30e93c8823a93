"""The tiny model factory: files written, reload through from_pretrained, the tokenizer, the
``tiny_model`` registry and the CLI that dispatches through it, and the committed tiny
LLaVA-OneVision definition in recipes/tiny/."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmemb_hf import TINY_MODELS
from mmemb_hf.tiny import (
    LLAVA_MEDIA_TOKENS,
    QWEN_SPECIAL_TOKENS,
    build_tiny_tokenizer,
    make_tiny_clip,
    make_tiny_llava_onevision,
    make_tiny_qwen2_vl,
    make_tiny_text_model,
)

from mmemb import plugins
from mmemb.errors import UnknownComponentError
from mmemb.testing import make_tiny_model, tiny_model_kinds
from mmemb.testing.tiny import main

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


def test_registry_lists_the_tiny_models_of_mmemb_hf() -> None:
    kinds = ["clip", "llava_onevision", "qwen2_vl", "siglip", "text"]  # what the CLI always took
    assert tiny_model_kinds() == kinds == sorted(TINY_MODELS)
    table = plugins.registry("tiny_model")
    for kind in kinds:
        assert table[kind].provider == "mmemb" and table[kind].summary, kind


def test_make_tiny_model_writes_what_the_builder_writes(tmp_path: Path) -> None:
    via_registry = make_tiny_model("llava_onevision", tmp_path / "r", weights=False, seed=3)
    direct = make_tiny_llava_onevision(tmp_path / "d", weights=False, seed=3)
    assert via_registry == tmp_path / "r"
    for name in ("config.json", "preprocessor_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (via_registry / name).read_bytes() == (direct / name).read_bytes(), name


def test_unknown_kind_names_the_registered_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(UnknownComponentError, match="Did you mean 'llava_onevision'") as err:
        make_tiny_model("lava_onevision", tmp_path / "x")
    assert "clip, llava_onevision, qwen2_vl, siglip, text" in str(err.value)
    with pytest.raises(SystemExit) as code:
        main(["lava_onevision", str(tmp_path / "x")])
    assert code.value.code == 2
    msg = capsys.readouterr().err
    assert "invalid choice: 'lava_onevision'" in msg
    assert "'clip', 'llava_onevision', 'qwen2_vl', 'siglip', 'text'" in msg
    assert not (tmp_path / "x").exists()


@pytest.mark.only_plugins()
def test_cli_without_a_tiny_model_plugin_says_where_they_come_from(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as code:
        main(["text", str(tmp_path / "t")])
    assert code.value.code == 2
    msg = capsys.readouterr().err
    assert "no installed plugin registers a tiny_model" in msg and "mmemb_hf" in msg


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
