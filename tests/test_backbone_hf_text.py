"""`hf_text` backbone: tiny BERT (right padding, cls/mean), tiny Qwen2 (left, last token)."""

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
from mmemb.testing import make_tiny_text_model, shape_png

BATCH = [
    Item(text="a red circle above a blue square"),
    Item(text="green"),
    Item(text="where is the small yellow star?", instruction="Represent the given sentence."),
]


pytestmark = pytest.mark.usefixtures("hf_plugins_only")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_text_model(tmp_path_factory.mktemp("bert"), arch="bert")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_text_model(tmp_path_factory.mktemp("qwen2"), arch="qwen2")


def _encoder(path: Path, pooler: str, **kw: Any) -> Encoder:
    bb = plugins.build("backbone", "hf_text", path=str(path), **kw)
    return Encoder(bb, plugins.build("pooler", pooler)).eval()


@pytest.mark.parametrize("arch,pooler", [("bert", "cls"), ("bert", "mean"),
                                         ("qwen2", "last_token")])
def test_shape_finite_deterministic(bert_dir: Path, qwen_dir: Path, arch: str,
                                    pooler: str) -> None:
    enc = _encoder(bert_dir if arch == "bert" else qwen_dir, pooler)
    a = enc.encode(BATCH, side="query")
    b = enc.encode(BATCH, side="query")
    assert a.shape == (3, enc.backbone.hidden_size) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("arch,pooler,side", [
    ("bert", "cls", "right"), ("bert", "mean", "left"),
    ("qwen2", "last_token", "left"), ("qwen2", "last_token", "right"),
])
def test_padding_matches_single_item(bert_dir: Path, qwen_dir: Path, arch: str, pooler: str,
                                     side: str) -> None:
    enc = _encoder(bert_dir if arch == "bert" else qwen_dir, pooler, padding_side=side)
    inputs = enc.processor(BATCH, side="query")
    assert (inputs["attention_mask"].sum(1) < inputs["attention_mask"].shape[1]).any()
    with torch.no_grad():
        batched = enc(inputs)
        single = torch.cat([enc(enc.processor([it], side="query")) for it in BATCH])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


def test_instruction_and_template(qwen_dir: Path) -> None:
    enc = _encoder(qwen_dir, "last_token", query_instruction="Instruct: find it",
                   instruction_separator="\nQuery: ", append_eos=True)
    proc = enc.processor
    q = proc.prompt(Item(text="red circle"), "query", 0)
    assert q == "Instruct: find it\nQuery: red circle<|im_end|>"
    assert proc.prompt(Item(text="red circle"), "target", 0) == "red circle<|im_end|>"


def test_save_load_round_trip(bert_dir: Path, tmp_path: Path) -> None:
    enc = _encoder(bert_dir, "mean")
    out = save_encoder(enc, tmp_path / "e", backbone={"name": "hf_text"},
                       pooler={"name": "mean"})
    again = load_encoder(out)
    torch.testing.assert_close(again.encode(BATCH, side="target"),
                               enc.encode(BATCH, side="target"), rtol=0, atol=0)


def test_lora_on_a_text_encoder(qwen_dir: Path) -> None:
    enc = _encoder(qwen_dir, "last_token")
    apply_lora(enc.backbone, LoraSpec(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in enc.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    enc.train()
    enc(enc.processor(BATCH, side="query")).pow(2).sum().backward()
    assert all("lora_" in n for n, p in enc.named_parameters() if p.grad is not None)
    unmerged = enc.encode(BATCH, side="query")
    merge_lora(enc.backbone)
    torch.testing.assert_close(enc.encode(BATCH, side="query"), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch,pooler", [("bert", "cls"), ("qwen2", "last_token")])
def test_one_training_step_reduces_the_infonce_loss(bert_dir: Path, qwen_dir: Path, arch: str,
                                                    pooler: str) -> None:
    enc = _encoder(bert_dir if arch == "bert" else qwen_dir, pooler).train()
    colours = ["red", "green", "blue", "yellow"]
    q_in = enc.processor([Item(text=f"which shape is {c}?") for c in colours], side="query")
    c_in = enc.processor([Item(text=f"a {c} circle") for c in colours], side="target")
    params = [p for p in enc.parameters() if p.requires_grad]
    # Plain SGD with a short step (gradient clipped to norm 1, lr 1e-2): logits at temperature
    # 0.05 are sharply curved, so a long or Adam-sized first step can overshoot even with a
    # correct gradient.
    opt = torch.optim.SGD(params, lr=1e-2)

    def loss() -> torch.Tensor:
        logits = enc(q_in) @ enc(c_in).T / 0.05
        return torch.nn.functional.cross_entropy(logits, torch.arange(len(colours)))

    before = loss()
    opt.zero_grad()
    before.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    with torch.no_grad():
        assert loss().item() < before.item()


def test_errors(bert_dir: Path) -> None:
    enc = _encoder(bert_dir, "cls")
    with pytest.raises(DataError, match="reads text only"):
        enc.processor([Item(text="x", image=shape_png())], side="query")
    with pytest.raises(ConfigError, match="freeze"):
        plugins.build("backbone", "hf_text", path=str(bert_dir), freeze=["vision"])


def test_freeze_embeddings(bert_dir: Path) -> None:
    enc = _encoder(bert_dir, "cls", freeze=["embeddings"])
    emb = enc.backbone.model.get_input_embeddings().weight
    assert not emb.requires_grad
    assert any(p.requires_grad for p in enc.parameters())


def test_max_length_defaults_to_the_models_position_limit(bert_dir: Path) -> None:
    """The tiny BERT has 128 positions: a long text is truncated to them by default (512 would
    crash inside the model), a smaller max_length truncates further, a larger one is refused."""
    long_text = " ".join(["a red circle above a blue square"] * 60)
    enc = _encoder(bert_dir, "cls")
    inputs = enc.processor([Item(text=long_text), Item(text="green")], side="query")
    assert inputs["input_ids"].shape[1] == 128
    with torch.no_grad():
        assert torch.isfinite(enc(inputs)).all()
    short = _encoder(bert_dir, "cls", max_length=16)
    assert short.processor([Item(text=long_text)], side="query")["input_ids"].shape[1] == 16
    with pytest.raises(ConfigError, match=r"max_length: 1000 is more than the 128 positions"):
        plugins.build("backbone", "hf_text", path=str(bert_dir), max_length=1000)


def test_position_limits_of_common_families() -> None:
    """Learned absolute tables are hard limits (RoBERTa's starts after the padding index; BART
    allocates its offset itself); rotary and relative positions only degrade past theirs."""
    from mmemb_hf.hf_text import position_limit
    from transformers import BartConfig, BertConfig, DebertaV2Config, Qwen2Config, RobertaConfig

    assert position_limit(BertConfig()) == (512, True)
    assert position_limit(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == (512, True)
    assert position_limit(BartConfig()) == (1024, True)
    assert position_limit(DebertaV2Config()) == (512, False)
    assert position_limit(Qwen2Config()) == (32768, False)
