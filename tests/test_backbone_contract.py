"""The built-in backbones on their tiny models: the backbone contract every backbone must meet
(`mmemb.testing.contracts.check_backbone`), what the built-ins share beyond it (padding sides,
EOS, LoRA, a training step, the saved encoder), then what is specific to each backbone."""

from __future__ import annotations

import io
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from mmemb_hf.tiny import (
    make_tiny_clip,
    make_tiny_llava_onevision,
    make_tiny_qwen2_vl,
    make_tiny_siglip,
    make_tiny_text_model,
)

from mmemb import plugins
from mmemb.data.schema import Item
from mmemb.encoder_io import load_encoder, save_encoder
from mmemb.errors import ConfigError, DataError, MmembError
from mmemb.lora import LoraSpec, apply_lora, merge_lora
from mmemb.model import Backbone, BackboneOutput, Encoder, Pooler, split_rows
from mmemb.testing import shape_png
from mmemb.testing.contracts import (
    check_appends_eos,
    check_backbone,
    check_padding,
    check_pooler,
    check_save_load,
    check_split,
    check_uniform_forward,
    default_batches,
)

pytestmark = pytest.mark.only_plugins("mmemb_hf")


@dataclass(frozen=True)
class Case:
    """A built-in backbone on one tiny model."""

    backbone: str  # registry name
    make: Callable[[Path], Path]  # writes the tiny model directory
    images: bool = True
    pooler: str = "last_token"
    kwargs: dict[str, Any] = field(default_factory=dict)  # backbone arguments of the base build


Build = Callable[..., Backbone]
"""Case name (+ backbone arguments) -> a freshly built backbone."""
Shared = Callable[[str], Backbone]
"""Case name -> its default backbone, shared by the tests that only read it."""

CASES: dict[str, Case] = {
    "llava_onevision": Case("llava_onevision",
                            lambda d: make_tiny_llava_onevision(d, weights=True, seed=0)),
    "qwen2_vl": Case("qwen2_vl", make_tiny_qwen2_vl),
    "clip": Case("clip", make_tiny_clip),
    "siglip": Case("clip", lambda d: make_tiny_siglip(d, max_length=16)),
    "hf_text-bert": Case("hf_text", lambda d: make_tiny_text_model(d, arch="bert"),
                         images=False, pooler="cls"),
    "hf_text-qwen2": Case("hf_text", lambda d: make_tiny_text_model(d, arch="qwen2"),
                          images=False),
}

_dirs: dict[str, Path] = {}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Case name -> its tiny model directory, written once per module on first use."""
    _dirs.clear()

    def get(name: str) -> Path:
        if name not in _dirs:
            _dirs[name] = CASES[name].make(tmp_path_factory.mktemp(name))
        return _dirs[name]

    return get


@pytest.fixture(scope="module")
def build(tiny_dir: Callable[[str], Path]) -> Build:
    def make(name: str, **kw: Any) -> Backbone:
        case = CASES[name]
        return plugins.build("backbone", case.backbone, path=str(tiny_dir(name)),
                             **{**case.kwargs, **kw})

    return make


@pytest.fixture(scope="module")
def shared(build: Build) -> Shared:
    """Case name -> its default backbone, built once per module: for tests that only read it
    (tests that train, add LoRA or break it build their own)."""
    cache: dict[str, Backbone] = {}

    def get(name: str) -> Backbone:
        if name not in cache:
            cache[name] = build(name)
        return cache[name]

    return get


def _encoder(backbone: Backbone, pooler: str = "last_token") -> Encoder:
    return Encoder(backbone, plugins.build("pooler", pooler)).eval()


# --- the contract ---------------------------------------------------------------------------


DEFAULT_PADDING = {"llava_onevision": "left", "qwen2_vl": "left", "hf_text-bert": "right",
                   "hf_text-qwen2": "left"}  # decoders pad left; BERT as its tokenizer says


def _assert_padded_on(backbone: Backbone, side: str, images: bool) -> None:
    items = [it for b in default_batches(images=images).values() for it in b]
    mask = backbone.processor(items, side="query")["attention_mask"]
    edge = mask[:, 0] if side == "right" else mask[:, -1]
    assert bool(edge.all()), f"rows must be {side}-padded"


@pytest.mark.parametrize("name", sorted(CASES))
def test_backbone_contract(name: str, shared: Shared) -> None:
    case = CASES[name]
    backbone = shared(name)
    check_backbone(
        backbone, images=case.images, expect_padding=True,
        reload=lambda path: plugins.build("backbone", case.backbone, path=str(path)),
    )
    if name in DEFAULT_PADDING:
        _assert_padded_on(backbone, DEFAULT_PADDING[name], case.images)


# --- what the built-ins share beyond the contract ------------------------------------------


@pytest.mark.parametrize("name,side", [("llava_onevision", "right"), ("qwen2_vl", "right"),
                                       ("hf_text-bert", "left"), ("hf_text-qwen2", "right")])
def test_the_other_padding_side(name: str, side: str, build: Build) -> None:
    """The contract runs the default side (left for decoders, right for BERT); the other one
    pads where it says and changes no row either."""
    backbone = build(name, padding_side=side)
    _assert_padded_on(backbone, side, CASES[name].images)
    check_padding(backbone, default_batches(images=CASES[name].images), expect_padding=True)


def test_qwen2_vl_append_eos_is_honest(build: Build) -> None:
    """(llava_onevision's and hf_text's: in their eos tests below)"""
    backbone = build("qwen2_vl", append_eos=True)
    assert backbone.appends_eos is True
    check_appends_eos(backbone, default_batches())


def test_saved_encoder_reloads_exactly(shared: Shared, tmp_path: Path) -> None:
    """Through `save_encoder`/`load_encoder` (the backbone spec and pooler recorded beside the
    weights); every backbone's own save/load round trip is part of the contract."""
    enc = _encoder(shared("llava_onevision"))
    items = default_batches()["mixed"]
    spec = {"name": "llava_onevision", "path": "unused", "padding_side": "left"}
    out = save_encoder(enc, tmp_path / "e", backbone=spec, pooler={"name": "last_token"})
    assert (out / "model.safetensors").is_file()
    assert (out / "tokenizer.json").is_file() and (out / "preprocessor_config.json").is_file()
    again = load_encoder(out)
    side = "query"
    a = enc.encode(items, side=side)
    assert a.shape == (len(items), enc.backbone.hidden_size)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(len(items)))
    torch.testing.assert_close(again.encode(items, side=side), a, rtol=0, atol=0)


def _randomise_lora_b(enc: Encoder) -> None:
    """LoRA B starts at zero (the adapter is a no-op); make it matter so merging is tested."""
    with torch.no_grad():
        for n, p in enc.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)


def _clip_towers(enc: Encoder, with_grad: list[str]) -> None:
    assert any("text_model" in n for n in with_grad)
    assert any("vision_model" in n for n in with_grad)


def _qwen2_vl_language_only(enc: Encoder, with_grad: list[str]) -> None:
    base = enc.backbone.model.get_base_model()
    assert not any("visual" in n for n, _ in base.named_parameters() if "lora_" in n)


LORA = {
    "clip": (LoraSpec(r=4, target_modules=["q_proj", "v_proj"], towers=["language", "vision"]),
             _clip_towers),
    "hf_text-qwen2": (LoraSpec(r=4, target_modules=["q_proj", "v_proj"]), None),
    "qwen2_vl": (LoraSpec(r=4), _qwen2_vl_language_only),
}


@pytest.mark.parametrize("name", sorted(LORA))
def test_lora_trains_only_adapters_and_merge_agrees(name: str,
                                                    build: Build) -> None:
    spec, extra = LORA[name]
    items = default_batches(images=CASES[name].images)["mixed" if CASES[name].images else "text"]
    enc = _encoder(build(name))
    apply_lora(enc.backbone, spec)
    _randomise_lora_b(enc)
    enc.train()
    enc(enc.processor(items, side="query")).pow(2).sum().backward()
    with_grad = [n for n, p in enc.named_parameters() if p.grad is not None]
    assert with_grad and all("lora_" in n for n in with_grad)
    if extra is not None:
        extra(enc, with_grad)
    unmerged = enc.encode(items, side="query")
    merge_lora(enc.backbone)
    torch.testing.assert_close(enc.encode(items, side="query"), unmerged, rtol=1e-5, atol=1e-5)


COLOURS = ["red", "green", "blue", "yellow"]


@pytest.mark.parametrize("name", ["llava_onevision", "qwen2_vl", "clip", "hf_text-bert",
                                  "hf_text-qwen2"])
def test_one_training_step_reduces_the_infonce_loss(name: str,
                                                    build: Build) -> None:
    case = CASES[name]
    torch.manual_seed(0)
    enc = _encoder(build(name, **({"freeze": ["vision"]} if name == "qwen2_vl" else {})),
                   case.pooler).train()
    if name == "llava_onevision":  # two shapes per colour: 8 pairs
        queries = [Item(image=shape_png(c, s)) for c in COLOURS for s in ("circle", "square")]
        targets = [Item(text=f"a {c} {s}") for c in COLOURS for s in ("circle", "square")]
    elif case.images:
        queries = [Item(image=shape_png(c)) for c in COLOURS]
        targets = [Item(text=f"a {c} circle") for c in COLOURS]
    else:
        queries = [Item(text=f"which shape is {c}?") for c in COLOURS]
        targets = [Item(text=f"a {c} circle") for c in COLOURS]
    q_in = enc.processor(queries, side="query")
    c_in = enc.processor(targets, side="target")
    params = [p for p in enc.parameters() if p.requires_grad]
    # Plain SGD with a short step (gradient clipped to norm 1, lr 1e-2): logits at temperature
    # 0.05 are sharply curved, so a long or Adam-sized first step can overshoot even with a
    # correct gradient.
    opt = torch.optim.SGD(params, lr=1e-2)

    def loss() -> torch.Tensor:
        logits = enc(q_in) @ enc(c_in).T / 0.05
        return torch.nn.functional.cross_entropy(logits, torch.arange(len(queries)))

    before = loss()
    opt.zero_grad()
    before.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    with torch.no_grad():
        assert loss().item() < before.item()
    if name == "clip":  # held as buffers: never trained
        assert enc.backbone.model.logit_scale.grad is None
    if name == "qwen2_vl":  # freeze: [vision]
        vision = enc.backbone.model.model.visual.blocks[0].attn.qkv.weight
        assert not vision.requires_grad and vision.grad is None


# --- llava_onevision ------------------------------------------------------------------------

MIXED = default_batches()["mixed"]
TEXT = default_batches()["text"]


def test_llava_prompt_format_query_and_target(shared: Shared) -> None:
    proc = shared("llava_onevision").processor
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


def test_llava_random_init_is_seeded_and_ignores_saved_weights(
        build: Build) -> None:
    a = _encoder(build("llava_onevision", init="random", seed=3)).encode(TEXT, side="query")
    b = _encoder(build("llava_onevision", init="random", seed=3)).encode(TEXT, side="query")
    c = _encoder(build("llava_onevision", init="random", seed=4)).encode(TEXT, side="query")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


def test_llava_random_init_from_a_directory_without_weights(tmp_path: Path) -> None:
    d = make_tiny_llava_onevision(tmp_path / "def", weights=False)
    assert not any(d.glob("*.safetensors"))
    bb = plugins.build("backbone", "llava_onevision", path=str(d), init="random")
    assert torch.isfinite(_encoder(bb).encode(MIXED, side="query")).all()
    with pytest.raises(MmembError, match="could not load the model weights"):
        plugins.build("backbone", "llava_onevision", path=str(d))  # pretrained needs weights


def test_llava_max_image_tokens_caps_the_sequence(shared: Shared, build: Build) -> None:
    full = shared("llava_onevision")
    capped = _encoder(build("llava_onevision", max_image_tokens=40))
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
        build("llava_onevision", max_image_tokens=20)


def test_llava_token_count_matches_the_model_for_odd_sizes(shared: Shared) -> None:
    # A wrong count makes the model refuse the batch (features vs image tokens).
    enc = _encoder(shared("llava_onevision"))
    for size in [(64, 64), (64, 20), (20, 64), (50, 33), (7, 9), (200, 90)]:
        with torch.no_grad():
            e = enc(enc.processor([Item(text="x", image=shape_png(size=size))], side="query"))
        assert torch.isfinite(e).all(), size


def test_llava_max_image_side_downscales_before_anyres(build: Build) -> None:
    bb = build("llava_onevision", max_image_side=32)
    inputs = bb.processor([Item(image=shape_png(size=(128, 64)))], side="query")
    assert inputs["image_sizes"][0].tolist() == [16, 32]


def test_llava_eos_pooler_needs_append_eos(shared: Shared, build: Build) -> None:
    enc = _encoder(build("llava_onevision", append_eos=True), pooler="eos")
    assert enc.backbone.appends_eos is True
    check_appends_eos(enc.backbone, default_batches())  # every row ends with EOS
    with torch.no_grad():
        assert torch.isfinite(enc(enc.processor(MIXED, side="query"))).all()
    # without the appended EOS the pooler would silently be `last_token`: refused at build time
    with pytest.raises(ConfigError, match=r"append_eos=true, or use the 'last_token' pooler"):
        _encoder(shared("llava_onevision"), pooler="eos")


def test_llava_saved_eos_encoder_without_eos_still_loads(shared: Shared,
                                                         tmp_path: Path) -> None:
    """Saved before `eos` checked its backbone: loads as it was trained, with a warning."""
    enc = Encoder(shared("llava_onevision"), plugins.build("pooler", "eos"), check=False)
    out = save_encoder(enc, tmp_path / "enc", backbone={"name": "llava_onevision",
                                                        "path": "unused"},
                       pooler={"name": "eos"})
    with pytest.warns(UserWarning, match="append_eos=true.*loaded as saved"):
        again = load_encoder(out)
    assert isinstance(again.pooler, type(enc.pooler))


def test_llava_bfloat16(build: Build) -> None:
    bb = build("llava_onevision", dtype="bfloat16")
    assert next(bb.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        out = bb(bb.processor(MIXED, side="query"))
    assert out.hidden_states.dtype == torch.bfloat16
    assert torch.isfinite(out.hidden_states.float()).all()


def test_llava_freeze_vision_and_frozen_lm_head(build: Build) -> None:
    enc = _encoder(build("llava_onevision", freeze=["vision"])).train()
    bb = enc.backbone
    enc(bb.processor(MIXED, side="query")).sum().backward()
    for name, p in bb.model.named_parameters():
        if name.startswith("model.vision_tower.") or name.startswith("lm_head."):
            assert not p.requires_grad and p.grad is None, name
    projector = bb.model.model.multi_modal_projector.linear_1.weight
    assert projector.grad is not None and projector.grad.abs().sum() > 0


def test_llava_gradient_checkpointing_gives_the_same_gradients(
        build: Build) -> None:
    grads = []
    for ckpt in (False, True):
        enc = _encoder(build("llava_onevision", gradient_checkpointing=ckpt)).train()
        enc(enc.processor(MIXED, side="query")).pow(2).sum().backward()
        w = enc.backbone.model.model.language_model.layers[0].self_attn.q_proj.weight
        grads.append(w.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_llava_user_errors_name_the_problem(shared: Shared, build: Build,
                                            tmp_path: Path) -> None:
    bb = shared("llava_onevision")
    with pytest.raises(DataError, match="query item 1 .* cannot be decoded"):
        bb.processor([Item(text="ok"), Item(image=b"not an image")], side="query")
    with pytest.raises(DataError, match="reserves for images"):
        bb.processor([Item(text="look: <image> here")], side="query")
    with pytest.raises(MmembError, match="does not exist"):
        plugins.build("backbone", "llava_onevision", path=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="dtype"):
        build("llava_onevision", dtype="float64")
    with pytest.raises(ConfigError, match="unknown argument"):
        build("llava_onevision", max_image_token=10)
    with pytest.raises(ConfigError, match="chat_template"):
        build("llava_onevision", chat_template="no placeholder")


def test_llava_committed_quickstart_definition_builds_and_runs() -> None:
    committed = Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "llava-onevision"
    bb = plugins.build("backbone", "llava_onevision", path=str(committed), init="random")
    e = _encoder(bb).encode(MIXED, side="query")
    assert e.shape == (len(MIXED), 64) and torch.isfinite(e).all()


# --- qwen2_vl -------------------------------------------------------------------------------


def test_qwen2_vl_prompt_and_image_token_count(shared: Shared) -> None:
    proc = shared("qwen2_vl").processor
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


def test_qwen2_vl_max_image_tokens_and_max_pixels_bound_the_image(
        shared: Shared, build: Build) -> None:
    big = [Item(image=shape_png(size=(128, 128)))]
    proc = shared("qwen2_vl").processor
    n_default = int(proc(big, side="query")["input_ids"].eq(proc.image_token_id).sum())
    capped = _encoder(build("qwen2_vl", max_image_tokens=9))
    inputs = capped.processor(big, side="query")
    n = int(inputs["input_ids"].eq(capped.processor.image_token_id).sum())
    assert n_default == 64 and n <= 9
    with torch.no_grad():
        assert torch.isfinite(capped(inputs)).all()
    pixels = build("qwen2_vl", max_pixels=32 * 32).processor(big, side="query")
    assert pixels["image_grid_thw"][0].tolist() == [1, 4, 4]
    with pytest.raises(ConfigError, match="max_pixels"):
        build("qwen2_vl", max_pixels=100)


def test_qwen2_vl_vision_lora_uses_the_vision_names(build: Build) -> None:
    bb = build("qwen2_vl")
    apply_lora(bb, LoraSpec(target_modules=["qkv"], towers=["vision"]))
    names = {n.split(".lora_")[0] for n, _ in bb.model.get_base_model().named_parameters()
             if ".lora_A." in n}
    assert names and all(n.startswith("model.visual.blocks.") for n in names)


def test_qwen2_vl_errors(shared: Shared, tmp_path: Path) -> None:
    proc = shared("qwen2_vl").processor
    with pytest.raises(DataError, match="cannot be decoded"):
        proc([Item(image=b"\x89PNG broken")], side="target")
    with pytest.raises(DataError, match="reserves for images"):
        proc([Item(text="<|image_pad|>")], side="query")
    llava = make_tiny_llava_onevision(tmp_path / "llava", weights=False)
    with pytest.raises(ConfigError, match="'llava_onevision' model"):
        plugins.build("backbone", "qwen2_vl", path=str(llava), init="random")


# --- clip (and SigLIP, read by the same backbone) -------------------------------------------


def _decode(data: bytes) -> Any:
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


def test_clip_towers_and_fusion_rule(shared: Shared) -> None:
    enc = _encoder(shared("clip"))
    model, proc = enc.backbone.model, enc.processor
    red = shape_png("red", "circle")
    items = [Item(text="a red circle"), Item(image=red),
             Item(text="a red circle", image=red, instruction="Represent the given image.")]
    unit = torch.nn.functional.normalize
    with torch.no_grad():
        text_in = proc.tokenizer(["Represent the given image. a red circle"], return_tensors="pt")
        t = model.get_text_features(**text_in).pooler_output
        pix = proc.image_processor(images=[_decode(red)], return_tensors="pt")["pixel_values"]
        i = model.get_image_features(pixel_values=pix).pooler_output
        out = enc(proc(items, side="query"))
    assert out.shape == (3, 32)
    torch.testing.assert_close(out[2:3], unit(unit(t, dim=-1) + unit(i, dim=-1), dim=-1),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1:2], unit(i, dim=-1), rtol=1e-5, atol=1e-6)


def test_clip_errors(shared: Shared, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot be decoded"):
        shared("clip").processor([Item(image=b"GIF89a-truncated")], side="query")
    from transformers import Siglip2Config

    Siglip2Config().save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="siglip2.*pixel_attention_mask"):
        plugins.build("backbone", "clip", path=str(tmp_path))


def test_siglip_pads_to_its_positions(shared: Shared, build: Build) -> None:
    """SigLIP texts are padded to the text tower's positions (it pools the last one),
    max_length defaulting to them and refused above them."""
    bb = shared("siglip")
    assert bb.processor(MIXED, side="query")["input_ids"].shape[1] == 16
    with pytest.raises(ConfigError, match="max_length: 77 is more than the 16 positions"):
        build("siglip", max_length=77)


# --- hf_text --------------------------------------------------------------------------------


def test_hf_text_instruction_and_template(build: Build) -> None:
    backbone = build("hf_text-qwen2", query_instruction="Instruct: find it",
                     instruction_separator="\nQuery: ", append_eos=True)
    assert backbone.appends_eos is True
    check_appends_eos(backbone, default_batches(images=False))
    proc = backbone.processor
    assert proc.prompt(Item(text="red circle"), "query", 0) == \
        "Instruct: find it\nQuery: red circle<|im_end|>"
    assert proc.prompt(Item(text="red circle"), "target", 0) == "red circle<|im_end|>"


def test_hf_text_errors_and_freeze(shared: Shared, build: Build) -> None:
    with pytest.raises(DataError, match="reads text only"):
        shared("hf_text-bert").processor([Item(text="x", image=shape_png())], side="query")
    with pytest.raises(ConfigError, match="freeze"):
        build("hf_text-bert", freeze=["vision"])
    bb = build("hf_text-bert", freeze=["embeddings"])
    assert not bb.model.get_input_embeddings().weight.requires_grad
    assert any(p.requires_grad for p in bb.parameters())


def test_hf_text_max_length_defaults_to_the_models_position_limit(
        shared: Shared, build: Build) -> None:
    """The tiny BERT has 128 positions: a long text is truncated to them by default (512 would
    crash inside the model), a smaller max_length truncates further, a larger one is refused."""
    long_text = " ".join(["a red circle above a blue square"] * 60)
    enc = _encoder(shared("hf_text-bert"), "cls")
    inputs = enc.processor([Item(text=long_text), Item(text="green")], side="query")
    assert inputs["input_ids"].shape[1] == 128
    with torch.no_grad():
        assert torch.isfinite(enc(inputs)).all()
    short = build("hf_text-bert", max_length=16)
    assert short.processor([Item(text=long_text)], side="query")["input_ids"].shape[1] == 16
    with pytest.raises(ConfigError, match=r"max_length: 1000 is more than the 128 positions"):
        build("hf_text-bert", max_length=1000)


def test_hf_text_position_limits_of_common_families() -> None:
    """Learned absolute tables are hard limits (RoBERTa's starts after the padding index; BART
    allocates its offset itself); rotary and relative positions only degrade past theirs."""
    from mmemb_hf.hf_text import position_limit
    from transformers import BartConfig, BertConfig, DebertaV2Config, Qwen2Config, RobertaConfig

    assert position_limit(BertConfig()) == (512, True)
    assert position_limit(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == (512, True)
    assert position_limit(BartConfig()) == (1024, True)
    assert position_limit(DebertaV2Config()) == (512, False)
    assert position_limit(Qwen2Config()) == (32768, False)


# --- the contracts catch what they promise to ------------------------------------------------


def _break_padding(bb: Backbone) -> None:
    forward = bb.forward

    def wider_is_different(inputs: Any) -> BackboneOutput:  # depends on the batch's width
        out = forward(inputs)
        return BackboneOutput(out.hidden_states + 1e-2 * out.hidden_states.shape[1],
                              out.attention_mask)

    bb.forward = wider_is_different  # type: ignore[method-assign]


def _break_uniform(bb: Backbone) -> None:
    def not_zero(self: Backbone, inputs: Any) -> BackboneOutput:  # a placeholder adding 1e-6
        out = type(self).forward(self, inputs)
        extra = 1e-6 if self.uniform_forward else 0.0
        return BackboneOutput(out.hidden_states + extra, out.attention_mask)

    # bound to the instance, so the contract's copy of the backbone gets it bound to the copy
    bb.forward = types.MethodType(not_zero, bb)  # type: ignore[method-assign]


def _drop_last_chunk(inputs: Any, size: int) -> list[Any]:
    return split_rows(inputs, size)[:-1]


def _break_split(bb: Backbone) -> None:
    bb.processor.split = _drop_last_chunk  # type: ignore[method-assign]


def _lie_about_eos(bb: Backbone) -> None:
    bb.appends_eos = True


BREAKAGES: dict[str, tuple[Callable[[Backbone], None], Callable[..., None], str]] = {
    "padding": (_break_padding, check_padding, "batched vs alone"),
    "uniform": (_break_uniform, check_uniform_forward, "uniform forward"),
    "split": (_break_split, check_split, r"split\(size=2\)"),
    "eos": (_lie_about_eos, check_appends_eos, "appends_eos=True but rows"),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_the_backbone_contract_catches(breakage: str, build: Build) -> None:
    """Each part of `check_backbone` fails on the backbone broken the way it guards against
    (the same backbone unbroken meets the whole contract: test_backbone_contract)."""
    bb = build("hf_text-qwen2")
    breaks, check, match = BREAKAGES[breakage]
    breaks(bb)
    with pytest.raises(AssertionError, match=match):
        check(bb, default_batches(images=False))


def test_the_save_load_check_catches_a_reload_that_differs(shared: Shared) -> None:
    def other_weights(path: Path) -> Backbone:
        bb = plugins.build("backbone", "hf_text", path=str(path))
        with torch.no_grad():
            next(bb.parameters()).add_(1e-3)
        return bb

    with pytest.raises(AssertionError, match="reloaded backbone"):
        check_save_load(shared("hf_text-qwen2"), default_batches(images=False), other_weights)


@pytest.mark.parametrize("name", ["cls", "eos", "last_token", "mean"])
def test_pooler_contract(name: str) -> None:
    check_pooler(plugins.build("pooler", name))


class _MeanOverEverything(Pooler):
    """Reads padded positions (multiplies them by zero): NaN padding gets through."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        m = attention_mask.unsqueeze(-1).to(hidden_states.dtype)
        return (hidden_states * m).sum(1) / m.sum(1)


def test_the_pooler_contract_catches_a_pooler_that_reads_padding() -> None:
    with pytest.raises(AssertionError, match="padded rows vs alone"):
        check_pooler(_MeanOverEverything())
