"""Models out: `mmemb export --format hf` (a transformers directory whose model card reproduces
`mmemb encode` with transformers + torch alone) and `--format sentence-transformers`."""

from __future__ import annotations

import io
import json
import re
import stat
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from mmemb_hf.tiny import (
    make_tiny_clip,
    make_tiny_llava_onevision,
    make_tiny_qwen2_vl,
    make_tiny_text_model,
)

from mmemb.cli import cli
from mmemb.data.schema import Item
from mmemb.encoder_io import build_encoder, load_encoder, save_encoder
from mmemb.export import export_model
from mmemb.testing.images import shape_png

MAKERS = {"llava_onevision": make_tiny_llava_onevision, "qwen2_vl": make_tiny_qwen2_vl,
          "clip": make_tiny_clip}
POOLERS = {"llava_onevision": "last_token", "qwen2_vl": "last_token", "clip": "mean",
           "hf_text": "mean"}


def _saved(tmp: Path, backbone: str, **bb: Any) -> Path:
    """A saved mmemb encoder (what `mmemb train` writes to OUTPUT_DIR/model)."""
    src = (make_tiny_text_model(tmp / "src", arch="bert") if backbone == "hf_text"
           else MAKERS[backbone](tmp / "src"))
    spec = {"name": backbone, "path": str(src), **bb}
    pooler = {"name": POOLERS[backbone]}
    enc = build_encoder(spec, pooler)
    return save_encoder(enc, tmp / "run" / "model", backbone=spec, pooler=pooler)


def _items() -> list[Item]:
    red = shape_png("red", "circle", size=(64, 48))
    blue = shape_png("blue", "square", size=(40, 72), position="left")
    return [
        Item(text="a red circle above a blue square"),
        Item(text="green star", instruction="Find an image that matches the given caption."),
        Item(image=red),
        Item(image=blue, text="what colour is the shape?",
             instruction="Represent the given image with the following question:"),
        Item(image=red, text="a small red circle"),
    ]


def card_snippet(readme: str) -> str:
    """The first python block under the card's "Use with transformers" heading."""
    section = readme.split("## Use with transformers", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert match, "the card has no transformers snippet"
    return match.group(1)


def run_card(out: Path) -> dict[str, Any]:
    """Execute the card's snippet (path replaced) and return its namespace."""
    code = card_snippet((out / "README.md").read_text())
    assert not re.search(r"^\s*(from|import) mmemb", code, flags=re.M)  # transformers + torch
    namespace: dict[str, Any] = {}
    exec(compile(code.replace("path/to/this/directory", str(out)), "card", "exec"), namespace)
    return namespace


def _snippet_embeddings(ns: dict[str, Any], items: list[Item], side: str) -> torch.Tensor:
    from PIL import Image

    rows = []
    for it in items:
        image = Image.open(io.BytesIO(it.image)) if it.image is not None else None
        rows.append(ns["embed"](side, text=it.text, image=image, instruction=it.instruction))
    return torch.stack(rows)


def _modes(path: Path) -> set[int]:
    return {stat.S_IMODE(p.stat().st_mode) for p in path.rglob("*") if p.is_file()}


def test_hf_export_card_snippet_reproduces_mmemb_encode_llava(tmp_path: Path) -> None:
    model = _saved(tmp_path, "llava_onevision", query_instruction="Represent the query:")
    res = CliRunner().invoke(cli, ["export", "--model", str(tmp_path / "run"),
                                   "--out", str(tmp_path / "exp")])
    assert res.exit_code == 0, res.output
    out = tmp_path / "exp"
    assert _modes(out) == {0o644}
    spec = json.loads((out / "mmemb.json").read_text())
    prompts = spec["prompt"]["prompts"]
    assert prompts["query/text"].endswith("Represent the query: {text}<|im_end|>\n"
                                          "<|im_start|>assistant\n")
    assert prompts["target/image"].count("<image>") == 1
    # the tokenizer's chat template renders the same markup around a content
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    content = "<image>\nRepresent the given image."
    assert tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False) == (
        prompts["target/image"])

    ns = run_card(out)
    items = _items()
    encoder = load_encoder(model)
    for side in ("query", "target"):
        ours = encoder.encode(items, side=side, batch_size=len(items))
        theirs = _snippet_embeddings(ns, items, side)
        assert float((ours - theirs).abs().max()) <= 1e-5, side
    # the snippet is faithful, not trivially equal: the sides and items differ
    assert float((encoder.encode(items[:1], side="query")
                  - encoder.encode(items[:1], side="target")).abs().max()) > 1e-4


def test_hf_export_hf_text_and_its_snippet(tmp_path: Path) -> None:
    """hf_text exports (its probe has no image items) and the card reproduces it."""
    model = _saved(tmp_path, "hf_text", query_instruction="query:", max_length=12)
    out = export_model(model, tmp_path / "exp")
    ns = run_card(out)
    items = [it for it in _items() if it.image is None] + [Item(text="word " * 40)]
    encoder = load_encoder(model)
    for side in ("query", "target"):
        ours = encoder.encode(items, side=side)
        assert float((ours - _snippet_embeddings(ns, items, side)).abs().max()) <= 1e-5
    assert _modes(out) == {0o644}


@pytest.mark.parametrize("backbone", ["qwen2_vl", "clip"])
def test_hf_export_every_builtin_backbone(tmp_path: Path, backbone: str) -> None:
    model = _saved(tmp_path, backbone)
    out = export_model(model, tmp_path / "exp")
    items = _items()
    before = load_encoder(model).encode(items, side="query")
    assert torch.allclose(load_encoder(out).encode(items, side="query"), before, atol=1e-5)
    readme = (out / "README.md").read_text()
    assert "## Use with transformers" in readme and "## Use with mmemb" in readme
    assert _modes(out) == {0o644}


def test_card_lists_recipe_data_and_eval_results(tmp_path: Path) -> None:
    from mmemb.eval.results import EvalResults

    _saved(tmp_path, "hf_text")
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({
        "shards": [{"path": "shard-000000.tar", "sha256": "ab" * 32}],
        "datasets": {"pairs": {"samples": 12}}}))
    (tmp_path / "run" / "recipe.yaml").write_text(
        f"model:\n  backbone: {{name: hf_text}}\ndata:\n  train:\n  - shards: {data}\n")
    (tmp_path / "run" / "eval_after").mkdir()
    EvalResults(task="retrieval", primary_metric="ndcg@10", metric_labels={}, datasets={},
                groups=[], overall=42.5).save(tmp_path / "run" / "eval_after")
    out = export_model(tmp_path / "run", tmp_path / "exp")
    readme = (out / "README.md").read_text()
    assert "shards: " + str(data) in readme  # the recipe
    from mmemb.export import manifest_fingerprint

    fp = manifest_fingerprint(json.loads((data / "manifest.json").read_text()))
    assert fp[:16] in readme and "pairs: 12" in readme
    assert "overall 42.5" in readme
    saved = json.loads((out / "mmemb.json").read_text())
    assert saved["provenance"]["data"][0]["fingerprint"] == fp


def test_sentence_transformers_export_loads_with_sentence_transformers(tmp_path: Path) -> None:
    st = pytest.importorskip("sentence_transformers")
    model = _saved(tmp_path, "hf_text", query_instruction="query:", target_instruction="doc:",
                   max_length=10)
    res = CliRunner().invoke(cli, ["export", "--model", str(model), "--out",
                                   str(tmp_path / "st"), "--format", "sentence-transformers"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "st"
    texts = ["a red circle above a blue square", "green star " * 20, "the tiny yellow dot"]
    items = [Item(text=t) for t in texts]
    loaded = st.SentenceTransformer(str(out), device="cpu")
    encoder = load_encoder(model)
    q = loaded.encode_query(texts, convert_to_tensor=True).cpu()
    d = loaded.encode_document(texts, convert_to_tensor=True).cpu()
    assert float((q - encoder.encode(items, side="query")).abs().max()) <= 1e-5
    assert float((d - encoder.encode(items, side="target")).abs().max()) <= 1e-5
    own = loaded.encode(texts, prompt="Represent this: ", convert_to_tensor=True).cpu()
    mine = encoder.encode([Item(text=t, instruction="Represent this:") for t in texts],
                          side="query")
    assert float((own - mine).abs().max()) <= 1e-5
    assert _modes(out) == {0o644}
    # mmemb reads the export back, as the same encoder
    assert torch.allclose(load_encoder(out).encode(items, side="query"), q, atol=1e-5)


def test_sentence_transformers_export_refuses_multimodal_in_one_line(tmp_path: Path) -> None:
    model = _saved(tmp_path, "clip")
    res = CliRunner().invoke(cli, ["export", "--model", str(model), "--out",
                                   str(tmp_path / "st"), "--format", "sentence-transformers"])
    assert res.exit_code == 1
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "multimodal" in lines[0] and "--format hf" in lines[0], res.output
    assert not (tmp_path / "st").exists()
    assert not list(tmp_path.glob("st.tmp-export*"))
