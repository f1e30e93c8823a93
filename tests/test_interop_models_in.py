"""Models in: every --model takes a saved encoder, a sentence-transformers directory, or a plain
Hugging Face model with --backbone/--pooler; recipes start training from the same three."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mmemb_hf.tiny import make_tiny_text_model

from mmemb.cli import cli as main
from mmemb.data.schema import Item
from mmemb.encoder_io import (
    ModelSource,
    ModelSourceError,
    build_encoder,
    load_encoder,
    resolve_model,
    save_encoder,
)

st = pytest.importorskip("sentence_transformers")

TEXTS = [
    "a red circle above a blue square",
    "tiny green star",
    "the small purple heart next to a large yellow ring " * 6,  # longer than max_seq_length
    "Find an image that matches the given caption.",
]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_text_model(tmp_path_factory.mktemp("bert"), arch="bert", seed=3)


def _st_model(bert_dir: Path, out: Path, *, pooling: str = "mean", normalize: bool = True,
              max_seq_length: int = 16, prompts: dict[str, str] | None = None) -> Path:
    """A sentence-transformers model around the tiny BERT, saved by sentence-transformers."""
    from sentence_transformers import SentenceTransformer, models

    tf = models.Transformer(str(bert_dir), max_seq_length=max_seq_length)
    mods = [tf, models.Pooling(tf.get_embedding_dimension(), pooling)]
    if normalize:
        mods.append(models.Normalize())
    SentenceTransformer(modules=mods, device="cpu", prompts=prompts).save(str(out))
    return out


def _st_embed(path: Path, texts: list[str], **kw: object) -> torch.Tensor:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(path), device="cpu")
    return model.encode(texts, convert_to_tensor=True, **kw).cpu().float()


@pytest.mark.parametrize("pooling,normalize", [("mean", True), ("cls", False),
                                               ("max", True), ("lasttoken", True)])
def test_sentence_transformers_dir_embeds_like_sentence_transformers(
    bert_dir: Path, tmp_path: Path, pooling: str, normalize: bool
) -> None:
    path = _st_model(bert_dir, tmp_path / "st", pooling=pooling, normalize=normalize)
    resolved = resolve_model(path)
    assert resolved.kind == "sentence-transformers"
    assert resolved.backbone["max_length"] == 16
    assert resolved.normalize is normalize
    ours = load_encoder(path).encode([Item(text=t) for t in TEXTS], side="target")
    theirs = _st_embed(path, TEXTS)
    assert ours.shape == theirs.shape
    assert float((ours - theirs).abs().max()) <= 1e-5
    if normalize:
        assert torch.allclose(ours.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)


def test_legacy_sentence_transformers_layout(bert_dir: Path, tmp_path: Path) -> None:
    """The pre-6.0 files (all-MiniLM-L6-v2's): max_seq_length in sentence_bert_config.json,
    pooling_mode_* flags, no 2_Normalize folder."""
    path = _st_model(bert_dir, tmp_path / "st", max_seq_length=12)
    (path / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": 12, "do_lower_case": False}))
    (path / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32, "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False}))
    modules = json.loads((path / "modules.json").read_text())
    for m, kind in zip(modules, ["Transformer", "Pooling", "Normalize"], strict=True):
        m["type"] = f"sentence_transformers.models.{kind}"
    (path / "modules.json").write_text(json.dumps(modules))
    for f in (path / "2_Normalize").iterdir():
        f.unlink()
    (path / "2_Normalize").rmdir()
    resolved = resolve_model(path)
    assert resolved.backbone["max_length"] == 12 and resolved.pooler == {"name": "mean"}
    ours = load_encoder(path).encode([Item(text=t) for t in TEXTS], side="query")
    assert float((ours - _st_embed(path, TEXTS)).abs().max()) <= 1e-5


def test_prompts_map_to_query_and_document_sides(bert_dir: Path, tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    path = _st_model(bert_dir, tmp_path / "st",
                     prompts={"query": "query: ", "document": "passage: "})
    enc = load_encoder(path)
    model = SentenceTransformer(str(path), device="cpu")
    items = [Item(text=t) for t in TEXTS]
    q = model.encode_query(TEXTS, convert_to_tensor=True).cpu()
    d = model.encode_document(TEXTS, convert_to_tensor=True).cpu()
    assert float((enc.encode(items, side="query") - q).abs().max()) <= 1e-5
    assert float((enc.encode(items, side="target") - d).abs().max()) <= 1e-5
    assert float((q - d).abs().max()) > 1e-3  # the prompts do change the embeddings


def test_unsupported_modules_are_refused_by_name(bert_dir: Path, tmp_path: Path) -> None:
    path = _st_model(bert_dir, tmp_path / "st")
    modules = json.loads((path / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense",
                       "type": "sentence_transformers.models.Dense"})
    (path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelSourceError, match="Dense"):
        resolve_model(path)
    (path / "modules.json").write_text(json.dumps(modules[:2]))
    (path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"embedding_dimension": 32, "pooling_mode": "weightedmean"}))
    with pytest.raises(ModelSourceError, match="weightedmean"):
        resolve_model(path)


def test_plain_hf_dir_needs_backbone_and_pooler(bert_dir: Path) -> None:
    with pytest.raises(ModelSourceError, match="--backbone NAME --pooler NAME"):
        resolve_model(bert_dir)
    with pytest.raises(ModelSourceError, match="--pooler is missing"):
        resolve_model(ModelSource(str(bert_dir), backbone="hf_text"))
    src = ModelSource(str(bert_dir), backbone="hf_text", pooler="cls",
                      args={"max_length": 8, "normalize": False})
    enc = load_encoder(src)
    assert enc.normalize is False and enc.processor.max_length == 8
    direct = build_encoder({"name": "hf_text", "path": str(bert_dir), "max_length": 8},
                           {"name": "cls"}, normalize=False)
    items = [Item(text=t) for t in TEXTS]
    assert torch.equal(enc.encode(items, side="query"), direct.encode(items, side="query"))


def test_saved_encoder_and_training_output_dir(bert_dir: Path, tmp_path: Path) -> None:
    spec = {"name": "hf_text", "path": str(bert_dir), "max_length": 20}
    enc = build_encoder(spec, {"name": "mean"})
    save_encoder(enc, tmp_path / "run" / "model", backbone=spec, pooler={"name": "mean"})
    for where in (tmp_path / "run" / "model", tmp_path / "run"):
        r = resolve_model(where)
        assert r.kind == "mmemb" and r.location == str(tmp_path / "run" / "model")
    with pytest.raises(ModelSourceError, match="drop --backbone/--pooler"):
        resolve_model(ModelSource(str(tmp_path / "run"), backbone="hf_text", pooler="mean"))
    # --model-arg changes a saved encoder's setting
    assert load_encoder(ModelSource(str(tmp_path / "run"), args={"max_length": 6})
                        ).processor.max_length == 6


def test_missing_and_unknown_models_say_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="no such directory"):
        resolve_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="neither a saved mmemb encoder"):
        resolve_model(tmp_path / "empty")


def test_cli_encode_reads_a_sentence_transformers_dir(bert_dir: Path, tmp_path: Path) -> None:
    path = _st_model(bert_dir, tmp_path / "st")
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = tmp_path / "emb.npy"
    res = CliRunner().invoke(main, ["encode", "--model", str(path), "--input", str(items),
                                    "--out", str(out), "--side", "target"])
    assert res.exit_code == 0, res.output
    assert float(np.abs(np.load(out) - _st_embed(path, TEXTS).numpy()).max()) <= 1e-5
    # a plain HF directory without --backbone: one clear line, exit 1
    res = CliRunner().invoke(main, ["encode", "--model", str(bert_dir), "--input", str(items),
                                    "--out", str(out)])
    assert res.exit_code == 1 and "--backbone" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["encode", "--model", str(bert_dir), "--backbone", "hf_text",
                                    "--pooler", "mean", "--model-arg", "normalize=false",
                                    "--input", str(items), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert not np.allclose(np.linalg.norm(np.load(out), axis=1), 1.0)


def test_recipe_starts_from_a_sentence_transformers_dir(bert_dir: Path, tmp_path: Path) -> None:
    from mmemb.errors import ConfigError
    from mmemb.recipe import load_recipe
    from mmemb.train.setup import backbone_spec, build_model

    path = _st_model(bert_dir, tmp_path / "st", max_seq_length=10, prompts={"query": "q: "})

    def recipe(**model: object) -> object:
        raw = {"output_dir": str(tmp_path / "out"), "train": {"steps": 1, "batch_size": 2},
               "model": {"backbone": {"name": "hf_text", "path": str(path)}, **model}}
        return load_recipe(raw=raw, check_components=False)

    with pytest.raises(ConfigError, match=re.escape("pools with {'name': 'mean'}")):
        build_model(recipe())  # the recipe default last_token would change the model
    loaded = recipe(pooler="mean")
    spec = backbone_spec(loaded)
    assert spec["max_length"] == 10 and spec["query_instruction"] == "q: "
    enc = build_model(loaded)
    items = [Item(text=t) for t in TEXTS]
    assert torch.allclose(enc.encode(items, side="query"), load_encoder(path).encode(
        items, side="query"), atol=1e-6)
    bad = load_recipe(raw={
        "output_dir": str(tmp_path / "o"), "train": {"steps": 1, "batch_size": 2},
        "model": {"backbone": {"name": "clip", "path": str(path)}, "pooler": "mean"},
    }, check_components=False)
    with pytest.raises(ConfigError, match="Set model.backbone.name: hf_text"):
        backbone_spec(bad)
