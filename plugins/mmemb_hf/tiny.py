"""Tiny random-initialised Hugging Face models and their processors, built locally (nothing is
downloaded).

Tests and the quickstart need real architectures (LLaVA-OneVision, Qwen2-VL, CLIP, SigLIP, a text
encoder) loaded through the same ``from_pretrained`` path users take with hub checkpoints, but
small enough to train on two CPU cores. Each ``make_tiny_*`` function writes a Hugging Face model
directory:

- ``config.json`` -- the architecture (a few layers, hidden size 32-64);
- ``tokenizer.json`` / ``tokenizer_config.json`` -- a byte-level BPE tokenizer trained here with the
  ``tokenizers`` library on caption-like English (`mmemb.testing.corpus`: colours, shapes,
  positions, instruction phrases);
- ``preprocessor_config.json`` -- the image processor, configured for small images;
- ``model.safetensors`` -- random weights (omitted with ``weights=False``; a backbone built with
  ``init: random`` then creates them from the config, seeded).

The architectures live here, in the plugin that owns them, not in the kernel: ``mmemb_hf``
registers each builder as a ``tiny_model`` component (llava_onevision, qwen2_vl, clip, siglip,
text), which is how the kernel's command line reaches them (writes a directory; ``--no-weights``
for a commit-ready definition)::

    python -m mmemb.testing.tiny llava_onevision OUT_DIR [--no-weights] [--seed 0]

Import this module directly for the size options the command line does not offer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from mmemb.testing.corpus import caption_corpus

# --- tokenizer ---------------------------------------------------------------------------------

QWEN_SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
"""Qwen2 chat markup; ``<|endoftext|>`` is the pad token and ``<|im_end|>`` the end of a turn."""

LLAVA_MEDIA_TOKENS: tuple[str, ...] = ("<image>", "<video>")
QWEN2_VL_MEDIA_TOKENS: tuple[str, ...] = (
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
)
CLIP_SPECIAL_TOKENS: tuple[str, ...] = ("<|startoftext|>", "<|endoftext|>")
BERT_SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def build_tiny_tokenizer(
    *,
    special_tokens: Sequence[str] = QWEN_SPECIAL_TOKENS + LLAVA_MEDIA_TOKENS,
    vocab_size: int = 1024,
    corpus: Iterable[str] | None = None,
    eos_token: str | None = "<|im_end|>",
    pad_token: str | None = "<|endoftext|>",
    bos_token: str | None = None,
    unk_token: str | None = None,
    padding_side: str = "left",
    template: tuple[str, str] | None = None,
    model_max_length: int = 2048,
) -> Any:
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `corpus` (default: `caption_corpus()`).

    Byte-level BPE never produces an unknown token, so any English (or any text at all) tokenizes;
    the merges learnt from the caption corpus keep common words to one or two tokens. Every token in
    `special_tokens` is a single, never-split id (ids 0..len-1, in order). `template` is an optional
    ``(prefix_token, suffix_token)`` pair added around every sequence (CLIP's start/end tokens).
    `padding_side` is passed to the constructor because setting it afterwards is not saved.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=unk_token) if unk_token else models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus) if corpus is not None else caption_corpus(), trainer)
    if template is not None:
        first, last = template
        tok.post_processor = processors.TemplateProcessing(
            single=f"{first} $A {last}",
            pair=f"{first} $A {last} $B {last}",
            special_tokens=[(first, tok.token_to_id(first)), (last, tok.token_to_id(last))],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    named = {eos_token, pad_token, bos_token, unk_token}
    extra = [t for t in special_tokens if t not in named]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos_token,
        pad_token=pad_token,
        bos_token=bos_token,
        unk_token=unk_token,
        extra_special_tokens=extra,
        padding_side=padding_side,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


# --- model builders ----------------------------------------------------------------------------


def _save_model(model_cls: Any, config: Any, path: Path, *, weights: bool, seed: int) -> None:
    """Write config.json, plus random weights (safetensors) when `weights`."""
    if weights:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = model_cls(config)
        model.save_pretrained(path, safe_serialization=True)
    else:
        config.save_pretrained(path)


def make_tiny_llava_onevision(
    path: str | Path,
    *,
    weights: bool = True,
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 64,
    num_layers: int = 2,
    image_grid_pinpoints: Sequence[Sequence[int]] | None = None,
) -> Path:
    """A tiny LLaVA-OneVision: SigLIP vision (`image_size` px, `patch_size` px patches, 2 layers),
    a Qwen2 language model (`hidden_size`, `num_layers`), AnyRes with a few small pinpoints.

    With the defaults a 64x64 image becomes 2x2 crops of 32 px plus the base view: 16 base tokens +
    8x8 crop tokens + 8 newline tokens = 88 image tokens. Returns `path`.
    """
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(special_tokens=QWEN_SPECIAL_TOKENS + LLAVA_MEDIA_TOKENS)
    ids = tokenizer.convert_tokens_to_ids
    pinpoints = [list(p) for p in (image_grid_pinpoints or [
        [image_size, image_size], [image_size, 2 * image_size],
        [2 * image_size, image_size], [2 * image_size, 2 * image_size],
    ])]
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
        tie_word_embeddings=False,
    )
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        vision_use_head=False,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=ids("<image>"),
        video_token_index=ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
    )
    _save_model(LlavaOnevisionForConditionalGeneration, config, out, weights=weights, seed=seed)
    tokenizer.save_pretrained(out)
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    image_processor.save_pretrained(out)
    return out


def make_tiny_qwen2_vl(
    path: str | Path,
    *,
    weights: bool = True,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    patch_size: int = 8,
) -> Path:
    """A tiny Qwen2-VL: 2-layer vision transformer (`patch_size` px patches, 2x2 merge) and a Qwen2
    language model with M-RoPE sections fitted to the small head dimension. A 64x64 image becomes
    8x8 patches merged into 16 image tokens. Returns `path`."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(special_tokens=QWEN_SPECIAL_TOKENS + QWEN2_VL_MEDIA_TOKENS)
    ids = tokenizer.convert_tokens_to_ids
    heads = 4
    half_head = hidden_size // heads // 2
    # M-RoPE splits each head's rotary half-dimension into (temporal, height, width) sections.
    t_sec = half_head // 4
    h_sec = (half_head - t_sec) // 2
    mrope = [t_sec, h_sec, half_head - t_sec - h_sec]
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
        "bos_token_id": ids("<|endoftext|>"),
        "eos_token_id": ids("<|im_end|>"),
        "pad_token_id": ids("<|endoftext|>"),
        "tie_word_embeddings": False,
    }
    vision = {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": hidden_size,
        "num_heads": 2,
        "mlp_ratio": 2,
        "patch_size": patch_size,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    _save_model(Qwen2VLForConditionalGeneration, config, out, weights=weights, seed=seed)
    tokenizer.save_pretrained(out)
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch_size,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=(2 * patch_size) ** 2,
        max_pixels=(16 * patch_size) ** 2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    image_processor.save_pretrained(out)
    return out


def make_tiny_clip(
    path: str | Path, *, weights: bool = True, seed: int = 0, image_size: int = 32,
    patch_size: int = 8, hidden_size: int = 32, projection_dim: int = 32,
) -> Path:
    """A tiny CLIP dual encoder (2-layer text and vision towers, `projection_dim` output) with a
    CLIP-style tokenizer (start/end tokens around every text). Returns `path`."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(
        special_tokens=CLIP_SPECIAL_TOKENS,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        padding_side="right",
        template=("<|startoftext|>", "<|endoftext|>"),
        model_max_length=64,
    )
    ids = tokenizer.convert_tokens_to_ids
    text = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
        bos_token_id=ids("<|startoftext|>"), eos_token_id=ids("<|endoftext|>"),
        pad_token_id=ids("<|endoftext|>"), projection_dim=projection_dim,
    )
    vision = CLIPVisionConfig(
        hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=2, image_size=image_size, patch_size=patch_size,
        projection_dim=projection_dim,
    )
    config = CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=projection_dim
    )
    _save_model(CLIPModel, config, out, weights=weights, seed=seed)
    tokenizer.save_pretrained(out)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    image_processor.save_pretrained(out)
    return out


def make_tiny_siglip(
    path: str | Path, *, weights: bool = True, seed: int = 0, image_size: int = 32,
    patch_size: int = 8, hidden_size: int = 32, max_length: int = 16,
) -> Path:
    """A tiny SigLIP dual encoder (2-layer towers, sigmoid-loss style heads): texts are padded to
    `max_length` and pooled at the last position, as the released models were trained. The
    tokenizer ends every text with an EOS token. Returns `path`."""
    from transformers import SiglipConfig, SiglipModel, SiglipTextConfig, SiglipVisionConfig
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(
        special_tokens=("<pad>", "</s>"), eos_token="</s>", pad_token="<pad>",
        padding_side="right", template=None, model_max_length=max_length,
    )
    ids = tokenizer.convert_tokens_to_ids
    text = SiglipTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=max_length,
        pad_token_id=ids("<pad>"), eos_token_id=ids("</s>"), bos_token_id=None,
    )
    vision = SiglipVisionConfig(
        hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=2, image_size=image_size, patch_size=patch_size,
    )
    config = SiglipConfig(text_config=text.to_dict(), vision_config=vision.to_dict())
    _save_model(SiglipModel, config, out, weights=weights, seed=seed)
    tokenizer.save_pretrained(out)
    SiglipImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    ).save_pretrained(out)
    return out


def make_tiny_text_model(
    path: str | Path, *, weights: bool = True, seed: int = 0, arch: str = "bert",
    hidden_size: int = 32, num_layers: int = 2,
) -> Path:
    """A tiny text encoder: ``arch="bert"`` (bidirectional, [CLS] ... [SEP], right padding) or
    ``arch="qwen2"`` (causal decoder, left padding, for last-token pooling). Returns `path`."""
    from transformers import BertConfig, BertModel, Qwen2Config, Qwen2Model

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model_cls: Callable[..., Any]
    if arch == "bert":
        tokenizer = build_tiny_tokenizer(
            special_tokens=BERT_SPECIAL_TOKENS, eos_token=None, pad_token="[PAD]",
            unk_token=None, padding_side="right", template=("[CLS]", "[SEP]"),
            model_max_length=128,
        )
        # Registered as BERT's special tokens so `cls_token_id` etc. work like a real BERT.
        tokenizer.add_special_tokens({"cls_token": "[CLS]", "sep_token": "[SEP]",
                                      "mask_token": "[MASK]"})
        config: Any = BertConfig(
            vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
            num_attention_heads=2, intermediate_size=2 * hidden_size, max_position_embeddings=128,
            pad_token_id=tokenizer.pad_token_id,
            # No dropout: tests compare losses and gradients between forwards.
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
        model_cls = BertModel
    elif arch == "qwen2":
        tokenizer = build_tiny_tokenizer(special_tokens=QWEN_SPECIAL_TOKENS)
        ids = tokenizer.convert_tokens_to_ids
        config = Qwen2Config(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, bos_token_id=ids("<|endoftext|>"),
            eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
            tie_word_embeddings=False,
        )
        model_cls = Qwen2Model
    else:
        raise ValueError(f"make_tiny_text_model: arch must be 'bert' or 'qwen2' (got {arch!r})")
    _save_model(model_cls, config, out, weights=weights, seed=seed)
    tokenizer.save_pretrained(out)
    return out
