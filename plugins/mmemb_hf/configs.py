"""Config models of the Hugging Face backbones: the fields they share (loading, instructions,
prompts) and each backbone's own. pydantic only: importing this is cheap, so the registry can list
and validate components without importing torch or transformers."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

QWEN_CHAT_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
)
"""The Qwen2 chat markup (LLaVA-OneVision's `qwen_1_5` conversation and Qwen2-VL's template with
its default system prompt); ``{content}`` is replaced by the item's rendered content."""


class HFBackboneConfig(BaseModel):
    """Fields every Hugging Face backbone accepts (each backbone adds its own)."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="hub id or local directory with config, weights and processor")
    init: Literal["pretrained", "random"] = Field(
        "pretrained",
        description="'random' builds the architecture from path's config with random weights "
        "(seeded by `seed`); tokenizer and processor files still come from `path`",
    )
    seed: int = 0
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: str | None = Field(
        None, description="passed to transformers: 'sdpa', 'eager', 'flash_attention_2', ..."
    )
    gradient_checkpointing: bool = False


class InstructionConfig(BaseModel):
    """Which instruction an item is embedded with (see `item_instruction`)."""

    model_config = ConfigDict(extra="forbid")

    query_instruction: str | None = Field(
        None, description="query items without their own instruction get this one"
    )
    target_instruction: str | None = Field(
        None, description="target items without their own instruction get this one"
    )
    instruction_separator: str = Field(" ", description="between the instruction and the text")


class TextPromptConfig(InstructionConfig):
    """How an item's content is wrapped into the prompt a language model reads."""

    chat_template: str = QWEN_CHAT_TEMPLATE
    append_eos: bool = Field(
        False, description="append the tokenizer's EOS token (pair with the `eos` pooler)"
    )
    max_text_tokens: int | None = Field(
        None, gt=0, description="truncate each item's text to this many tokens (images are kept)"
    )

    @field_validator("chat_template")
    @classmethod
    def _has_content(cls, v: str) -> str:
        if v.count("{content}") != 1:
            raise ValueError(
                "chat_template must contain '{content}' exactly once (use '{content}' for no "
                "chat markup)"
            )
        return v


class PromptConfig(TextPromptConfig):
    """How an `Item` becomes the text a generative multimodal backbone reads (docs/backbones.md).

    content = [image_placeholder] + [instruction + instruction_separator] + [text]
    prompt  = chat_template with ``{content}`` replaced by content [+ eos token if append_eos]

    Query side: the item's own instruction, else `query_instruction`. Target side: the item's own
    instruction, else `target_instruction`, else (image-only targets) `target_image_instruction`.
    """

    target_image_instruction: str | None = Field(
        "Represent the given image.",
        description="image-only target items without an instruction get this one (VLM2Vec)",
    )


LLAVA_OV_DEFAULT_PATH = "llava-hf/llava-onevision-qwen2-7b-ov-hf"
QWEN2_VL_DEFAULT_PATH = "Qwen/Qwen2-VL-2B-Instruct"
CLIP_DEFAULT_PATH = "openai/clip-vit-base-patch32"


class LlavaOnevisionConfig(HFBackboneConfig, PromptConfig):
    """Arguments of the `llava_onevision` backbone (recipe: ``model.backbone``)."""

    path: str = LLAVA_OV_DEFAULT_PATH
    freeze: list[Literal["vision", "projector", "language", "embeddings"]] = Field(
        default_factory=list
    )
    padding_side: Literal["left", "right"] = "left"
    image_placeholder: str = Field(
        "<image>\n", description="stands for the image in the content; must contain the image token"
    )
    max_image_tokens: int | None = Field(
        None, gt=0,
        description="keep only AnyRes pinpoints whose worst-case image token count fits",
    )
    image_grid_pinpoints: list[tuple[int, int]] | None = Field(
        None, description="AnyRes resolutions (height, width); default: the model's own"
    )
    vision_aspect_ratio: str | None = Field(
        None, description="'anyres_max_N': crop features are downsampled to about N views"
    )
    max_image_side: int | None = Field(
        None, gt=0, description="downscale images whose longer side exceeds this (pixels) first"
    )

    @field_validator("vision_aspect_ratio")
    @classmethod
    def _anyres(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"anyres_max_[1-9][0-9]*", v):
            raise ValueError("must look like 'anyres_max_9' (a positive number of views)")
        return v


class HFTextConfig(HFBackboneConfig, TextPromptConfig):
    """Arguments of the `hf_text` backbone (any transformers `AutoModel` text encoder)."""

    chat_template: str = "{content}"
    freeze: list[Literal["embeddings"]] = Field(default_factory=list)
    padding_side: Literal["left", "right"] | None = Field(
        None, description="default: the tokenizer's own (BERT right, decoder embedders left)"
    )
    max_length: int | None = Field(
        None, gt=0,
        description="truncate prompts to this many tokens (default: 512, or the model's "
        "position limit when smaller)",
    )


class Qwen2VLConfig(HFBackboneConfig, PromptConfig):
    """Arguments of the `qwen2_vl` backbone (Qwen2-VL and Qwen2.5-VL)."""

    path: str = QWEN2_VL_DEFAULT_PATH
    freeze: list[Literal["vision", "projector", "language", "embeddings"]] = Field(
        default_factory=list
    )
    padding_side: Literal["left", "right"] = "left"
    image_placeholder: str = Field(
        "<|vision_start|><|image_pad|><|vision_end|>",
        description="stands for the image in the content; must contain <|image_pad|>",
    )
    min_pixels: int | None = Field(None, gt=0, description="smallest image area after resizing")
    max_pixels: int | None = Field(None, gt=0, description="largest image area after resizing")
    max_image_tokens: int | None = Field(
        None, gt=0, description="caps max_pixels at this many (patch*merge)^2 blocks per image"
    )


class ClipConfig(HFBackboneConfig, InstructionConfig):
    """Arguments of the `clip` backbone (CLIP / SigLIP dual encoders)."""

    path: str = CLIP_DEFAULT_PATH
    freeze: list[Literal["vision", "language"]] = Field(default_factory=list)
    max_length: int | None = Field(
        None, gt=0,
        description="text tokens (default: the text tower's positions, CLIP 77, SigLIP 64)",
    )
    image_weight: float = Field(
        0.5, ge=0, le=1,
        description="image+text items: weight of the unit image embedding (text gets 1 - it)",
    )
