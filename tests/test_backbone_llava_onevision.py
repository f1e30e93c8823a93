"""`llava_onevision` backbone on the tiny LLaVA-OneVision (random weights, built locally)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from mmemb import plugins
from mmemb.data.schema import Item
from mmemb.encoder_io import load_encoder, save_encoder
from mmemb.errors import ConfigError, DataError, MmembError
from mmemb.model import Encoder
from mmemb.testing import make_tiny_llava_onevision, shape_png

NAME = "llava_onevision"


pytestmark = pytest.mark.usefixtures("hf_plugins_only")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llava_onevision(tmp_path_factory.mktemp("llava_ov"), weights=True, seed=0)


def _backbone(path: Path, **kw: Any) -> Any:
    return plugins.build("backbone", NAME, path=str(path), **kw)


def _encoder(path: Path, pooler: str = "last_token", **kw: Any) -> Encoder:
    return Encoder(_backbone(path, **kw), plugins.build("pooler", pooler)).eval()


@pytest.fixture(scope="module")
def encoder(tiny_dir: Path) -> Encoder:
    return _encoder(tiny_dir)


TEXT = [Item(text="a red circle above a blue square"), Item(text="green"),
        Item(text="a small yellow star", instruction="Represent the given text.")]
IMAGES = [Item(image=shape_png("red", "circle")), Item(image=shape_png("blue", "square"))]
MIXED = [
    Item(text="a red circle"),
    Item(image=shape_png("green", "triangle")),
    Item(text="What colour is the shape?", image=shape_png("blue", "circle", size=(64, 40)),
         instruction="Represent the given image with the following question:"),
    Item(image=shape_png("yellow", "square", size=(30, 70))),
]


@pytest.mark.parametrize("batch", [TEXT, IMAGES, MIXED], ids=["text", "image", "mixed"])
def test_embeddings_shape_finite_deterministic(encoder: Encoder, batch: list[Item]) -> None:
    inputs = encoder.processor(batch, side="query")
    assert all(v.shape[0] == len(batch) for v in inputs.values())
    with torch.no_grad():
        a, b = encoder(inputs), encoder(inputs)
    assert a.shape == (len(batch), encoder.backbone.hidden_size)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(len(batch)))


def test_different_inputs_give_different_embeddings(encoder: Encoder) -> None:
    e = encoder.encode(MIXED, side="query")
    sims = e @ e.T
    off_diagonal = sims[~torch.eye(len(MIXED), dtype=torch.bool)]
    assert (off_diagonal < 0.9999).all()


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_does_not_change_last_token(tiny_dir: Path, side: str) -> None:
    enc = _encoder(tiny_dir, padding_side=side)
    inputs = enc.processor(MIXED, side="query")
    mask = inputs["attention_mask"]
    assert (mask.sum(1) < mask.shape[1]).any(), "the batch must contain padded rows"
    edge = mask[:, 0] if side == "right" else mask[:, -1]
    assert bool(edge.all()), f"rows must be {side}-padded"
    with torch.no_grad():
        batched = enc(inputs)
        single = torch.cat([enc(enc.processor([it], side="query")) for it in MIXED])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


def test_prompt_format_query_and_target(encoder: Encoder) -> None:
    proc = encoder.processor
    tok = proc.tokenizer

    def text_of(item: Item, side: str) -> str:
        ids = proc([item], side=side)["input_ids"][0]
        return tok.decode(ids[ids != proc.pad_id])

    q = text_of(Item(text="What colour?", image=shape_png(),
                     instruction="Represent the given image with the following question:"),
                "query")
    assert q.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert "<|im_start|>user\n<image>" in q
    assert ("<image>\nRepresent the given image with the following question: What colour?"
            "<|im_end|>\n<|im_start|>assistant\n") in q
    assert q.count("<image>") == 88  # 16 base + 8x8 crop grid + 8 newlines for a 64x64 image
    # Targets: image-only gets the target image instruction; text-only is the text alone.
    t_img = text_of(Item(image=shape_png()), "target")
    assert "<image>\nRepresent the given image.<|im_end|>" in t_img
    t_txt = text_of(Item(text="a red circle"), "target")
    assert "user\na red circle<|im_end|>" in t_txt


def test_processor_is_picklable_and_equivalent(encoder: Encoder) -> None:
    proc = pickle.loads(pickle.dumps(encoder.processor))
    a = proc(MIXED, side="query")
    b = encoder.processor(MIXED, side="query")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_save_load_round_trip_gives_identical_embeddings(encoder: Encoder, tmp_path: Path) -> None:
    spec = {"name": NAME, "path": "unused", "padding_side": "left"}
    out = save_encoder(encoder, tmp_path / "enc", backbone=spec, pooler={"name": "last_token"})
    assert (out / "model.safetensors").is_file()
    assert (out / "tokenizer.json").is_file() and (out / "preprocessor_config.json").is_file()
    again = load_encoder(out)
    a = encoder.encode(MIXED, side="query")
    b = again.encode(MIXED, side="query")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_random_init_is_seeded_and_ignores_saved_weights(tiny_dir: Path) -> None:
    a = _encoder(tiny_dir, init="random", seed=3).encode(TEXT, side="query")
    b = _encoder(tiny_dir, init="random", seed=3).encode(TEXT, side="query")
    c = _encoder(tiny_dir, init="random", seed=4).encode(TEXT, side="query")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


def test_random_init_from_a_directory_without_weights(tmp_path: Path) -> None:
    d = make_tiny_llava_onevision(tmp_path / "def", weights=False)
    assert not any(d.glob("*.safetensors"))
    e = _encoder(d, init="random").encode(MIXED, side="query")
    assert torch.isfinite(e).all()
    with pytest.raises(MmembError, match="could not load the model weights"):
        _backbone(d)  # init: pretrained needs weights


def test_max_image_tokens_caps_the_sequence(tiny_dir: Path) -> None:
    full = _backbone(tiny_dir)
    capped = _encoder(tiny_dir, max_image_tokens=40)
    image = [Item(image=shape_png(size=(64, 64)))]
    n_full = int(full.processor(image, side="query")["input_ids"].eq(
        full.processor.image_token_id).sum())
    inputs = capped.processor(image, side="query")
    n_capped = int(inputs["input_ids"].eq(capped.processor.image_token_id).sum())
    assert n_full == 88 and n_capped == 16 + 16 + 4  # only the 1x1 grid is left
    assert capped.backbone.processor.pinpoints == [[32, 32]]
    with torch.no_grad():
        assert torch.isfinite(capped(inputs)).all()  # model and processor agree on the count
    with pytest.raises(ConfigError, match="at least 36"):
        _backbone(tiny_dir, max_image_tokens=20)


@pytest.mark.parametrize("size", [(64, 64), (64, 20), (20, 64), (50, 33), (7, 9), (200, 90)])
def test_token_count_matches_the_model_for_odd_sizes(encoder: Encoder,
                                                     size: tuple[int, int]) -> None:
    # A wrong count makes the model refuse the batch (features vs image tokens).
    with torch.no_grad():
        e = encoder(encoder.processor([Item(text="x", image=shape_png(size=size))], side="query"))
    assert torch.isfinite(e).all()


def test_max_image_side_downscales_before_anyres(tiny_dir: Path) -> None:
    bb = _backbone(tiny_dir, max_image_side=32)
    inputs = bb.processor([Item(image=shape_png(size=(128, 64)))], side="query")
    assert inputs["image_sizes"][0].tolist() == [16, 32]


def test_append_eos_and_eos_pooler(tiny_dir: Path) -> None:
    enc = _encoder(tiny_dir, pooler="eos", append_eos=True)
    proc = enc.processor
    inputs = proc(MIXED, side="query")
    last = inputs["input_ids"][:, -1]  # left padding: the last column is each row's last token
    assert (last == proc.tokenizer.eos_token_id).all()
    with torch.no_grad():
        out = enc(inputs)
    assert torch.isfinite(out).all()
    # without the appended EOS the pooler would silently be `last_token`: refused at build time
    with pytest.raises(ConfigError, match=r"append_eos=true, or use the 'last_token' pooler"):
        _encoder(tiny_dir, pooler="eos")


def test_a_saved_eos_encoder_without_eos_still_loads(tiny_dir: Path, tmp_path: Path) -> None:
    """Saved before `eos` checked its backbone: loads as it was trained, with a warning."""
    enc = Encoder(_backbone(tiny_dir), plugins.build("pooler", "eos"), check=False)
    out = save_encoder(enc, tmp_path / "enc", backbone={"name": NAME, "path": "unused"},
                       pooler={"name": "eos"})
    with pytest.warns(UserWarning, match="append_eos=true.*loaded as saved"):
        again = load_encoder(out)
    assert isinstance(again.pooler, type(enc.pooler))


def test_bfloat16(tiny_dir: Path) -> None:
    bb = _backbone(tiny_dir, dtype="bfloat16")
    assert next(bb.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        out = bb(bb.processor(MIXED, side="query"))
    assert out.hidden_states.dtype == torch.bfloat16
    assert torch.isfinite(out.hidden_states.float()).all()


def test_freeze_vision_and_frozen_lm_head(tiny_dir: Path) -> None:
    enc = _encoder(tiny_dir, freeze=["vision"]).train()
    bb = enc.backbone
    enc(bb.processor(MIXED, side="query")).sum().backward()
    for name, p in bb.model.named_parameters():
        if name.startswith("model.vision_tower.") or name.startswith("lm_head."):
            assert not p.requires_grad and p.grad is None, name
    projector = bb.model.model.multi_modal_projector.linear_1.weight
    assert projector.grad is not None and projector.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients(tiny_dir: Path) -> None:
    grads = []
    for ckpt in (False, True):
        enc = _encoder(tiny_dir, gradient_checkpointing=ckpt).train()
        enc(enc.processor(MIXED, side="query")).pow(2).sum().backward()
        w = enc.backbone.model.model.language_model.layers[0].self_attn.q_proj.weight
        grads.append(w.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_one_training_step_reduces_the_infonce_loss(tiny_dir: Path) -> None:
    torch.manual_seed(0)
    enc = _encoder(tiny_dir).train()
    colours = ["red", "green", "blue", "yellow"]
    queries = [Item(image=shape_png(c, s)) for c in colours for s in ("circle", "square")]
    targets = [Item(text=f"a {c} {s}") for c in colours for s in ("circle", "square")]
    q_in = enc.processor(queries, side="query")
    c_in = enc.processor(targets, side="target")
    params = [p for p in enc.parameters() if p.requires_grad]
    # Plain SGD with a short step (gradient clipped to norm 1, lr 1e-2): logits at temperature
    # 0.05 are sharply curved, so a long or Adam-sized first step can overshoot even with a
    # correct gradient.
    opt = torch.optim.SGD(params, lr=1e-2)

    def loss() -> torch.Tensor:
        q, c = enc(q_in), enc(c_in)
        logits = q @ c.T / 0.05
        return torch.nn.functional.cross_entropy(logits, torch.arange(len(queries)))

    before = loss()
    opt.zero_grad()
    before.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    with torch.no_grad():
        after = loss()
    assert after.item() < before.item()


def test_user_errors_name_the_problem(tiny_dir: Path, tmp_path: Path) -> None:
    enc = _backbone(tiny_dir)
    with pytest.raises(DataError, match="query item 1 .* cannot be decoded"):
        enc.processor([Item(text="ok"), Item(image=b"not an image")], side="query")
    with pytest.raises(DataError, match="reserves for images"):
        enc.processor([Item(text="look: <image> here")], side="query")
    with pytest.raises(MmembError, match="does not exist"):
        _backbone(tmp_path / "missing")
    with pytest.raises(ConfigError, match="dtype"):
        _backbone(tiny_dir, dtype="float64")
    with pytest.raises(ConfigError, match="unknown argument"):
        _backbone(tiny_dir, max_image_token=10)
    with pytest.raises(ConfigError, match="chat_template"):
        _backbone(tiny_dir, chat_template="no placeholder")


def test_committed_quickstart_definition_builds_and_runs() -> None:
    committed = Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "llava-onevision"
    enc = _encoder(committed, init="random")
    e = enc.encode(MIXED, side="query")
    assert e.shape == (len(MIXED), 64) and torch.isfinite(e).all()
