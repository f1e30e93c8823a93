"""`llava_onevision`: LLaVA-OneVision (SigLIP + Qwen2) as an embedding backbone.

Prompt (defaults; docs/backbones.md has the details)::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n
    <image>\\n{instruction} {text}<|im_end|>\\n<|im_start|>assistant\\n

``<image>`` is expanded to as many image tokens as the vision features of that image (AnyRes: a
base view plus crops at the best-fitting `image_grid_pinpoints` resolution, unpadded, one newline
token per row, capped by `vision_aspect_ratio`). `max_image_tokens` keeps only the pinpoints whose
largest possible token count fits, which bounds sequence length -- the main memory knob.

Padding: left by default (the last position is every row's last prompt token); position ids are
computed from the attention mask, so an item gives the same hidden states padded or alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mmemb.data.schema import Item
from mmemb.errors import ConfigError
from mmemb.model import BackboneOutput, InputProcessor, ModelInputs, Side
from mmemb_hf.base import HFBackbone
from mmemb_hf.configs import LlavaOnevisionConfig
from mmemb_hf.loading import freeze_lm_head, tower_regexes, unwrap_peft
from mmemb_hf.prompts import (
    expand_image_tokens,
    left_padded_positions,
    pad_rows,
    render_content,
    split_trimmed,
    truncate_text,
)
from mmemb_hf.uniform import needs_placeholder, placeholder_rng, zero_from
from mmemb_hf.vision import decode_image, image_features, limit_image_side, scatter_image_features

# Module-name prefixes inside LlavaOnevisionForConditionalGeneration (transformers >= 4.52 layout).
PARTS: dict[str, list[str]] = {
    "vision": ["model.vision_tower."],
    "projector": ["model.multi_modal_projector.", "model.image_newline"],
    "language": ["model.language_model."],
    "embeddings": ["model.language_model.embed_tokens."],
}


def _max_views(vision_aspect_ratio: str) -> int:
    return int(vision_aspect_ratio.removeprefix("anyres_max_"))


def image_token_count(
    height: int, width: int, *, pinpoints: Sequence[Sequence[int]], crop_size: int,
    patches_per_side: int, vision_aspect_ratio: str,
) -> int:
    """Number of `<image>` tokens LLaVA-OneVision produces for an image of `height` x `width`.

    Mirrors the model's feature packing: base view (P*P tokens), the AnyRes crop grid unpadded to
    the image's aspect ratio, one newline token per feature row, downsampled when the grid has
    more than about N views (`anyres_max_N`).
    """
    from transformers.image_processing_utils import select_best_resolution

    best_h, best_w = select_best_resolution((height, width), [list(p) for p in pinpoints])
    cur_h = patches_per_side * (best_h // crop_size)
    cur_w = patches_per_side * (best_w // crop_size)
    if width / height > cur_w / cur_h:
        new_h = int(round(height * (cur_w / width), 7))
        cur_h -= ((cur_h - new_h) // 2) * 2
    else:
        new_w = int(round(width * (cur_h / height), 7))
        cur_w -= ((cur_w - new_w) // 2) * 2
    unpadded, newlines = cur_h * cur_w, cur_h
    ratio = math.sqrt(cur_h * cur_w / (_max_views(vision_aspect_ratio) * patches_per_side**2))
    if ratio > 1.1:
        unpadded = int(cur_h // ratio) * int(cur_w // ratio)
        newlines = int(cur_h // ratio)
    return unpadded + newlines + patches_per_side**2


def pinpoint_token_bound(
    pinpoint: Sequence[int], *, crop_size: int, patches_per_side: int, vision_aspect_ratio: str
) -> int:
    """The most image tokens any image resized to `pinpoint` can produce (an upper bound).

    Unpadding only shrinks the grid and the `anyres_max_N` downsampling keeps at most ~1.21*N*P*P
    crop tokens (it triggers above ratio 1.1), and there is at most one newline per grid row.
    """
    p2 = patches_per_side**2
    cur_h = patches_per_side * (pinpoint[0] // crop_size)
    cur_w = patches_per_side * (pinpoint[1] // crop_size)
    crop_tokens = min(cur_h * cur_w, math.floor(1.21 * _max_views(vision_aspect_ratio) * p2))
    return p2 + crop_tokens + cur_h


def select_pinpoints(
    pinpoints: Sequence[Sequence[int]], max_image_tokens: int | None, *, crop_size: int,
    patches_per_side: int, vision_aspect_ratio: str,
) -> list[list[int]]:
    """The pinpoints whose token bound fits `max_image_tokens` (all of them when it is None)."""
    points = [list(p) for p in pinpoints]
    for p in points:
        if len(p) != 2 or p[0] % crop_size or p[1] % crop_size or min(p) <= 0:
            raise ConfigError([
                f"image_grid_pinpoints: {p} is not a (height, width) multiple of the vision "
                f"tower's crop size {crop_size}."
            ])
    if max_image_tokens is None:
        return points
    bounds = {
        tuple(p): pinpoint_token_bound(p, crop_size=crop_size, patches_per_side=patches_per_side,
                                       vision_aspect_ratio=vision_aspect_ratio)
        for p in points
    }
    kept = [p for p in points if bounds[tuple(p)] <= max_image_tokens]
    if not kept:
        low = min(bounds.values())
        raise ConfigError([
            f"max_image_tokens: {max_image_tokens} is below the smallest possible image "
            f"({low} tokens for a {crop_size}x{crop_size} grid); set it to at least {low}."
        ])
    return kept


class LlavaOnevisionProcessor(InputProcessor):
    """Items -> LLaVA-OneVision inputs on the CPU (picklable; runs in data workers).

    Returns ``input_ids`` and ``attention_mask`` (N, L); when any item has an image also
    ``pixel_values`` (N, V, 3, S, S) -- V = most AnyRes views in the batch, zeros for items
    without an image or with fewer views -- and ``image_sizes`` (N, 2) with (0, 0) for items
    without an image. Every tensor's first dimension is N, so a batch can be split by rows.
    """

    def __init__(
        self, tokenizer: Any, image_processor: Any, cfg: LlavaOnevisionConfig, *,
        pinpoints: list[list[int]], patches_per_side: int, vision_aspect_ratio: str,
    ) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.cfg = cfg
        self.pinpoints = pinpoints
        self.patches_per_side = patches_per_side
        self.vision_aspect_ratio = vision_aspect_ratio
        size = image_processor.size
        self.crop_size = int(size.get("height") or size.get("shortest_edge"))
        self.image_token = self._image_token()
        self.image_token_id = int(tokenizer.convert_tokens_to_ids(self.image_token))
        if self.image_token not in cfg.image_placeholder:
            raise ConfigError([
                f"image_placeholder: {cfg.image_placeholder!r} must contain the image token "
                f"{self.image_token!r}."
            ])
        self.pad_id = tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    def _image_token(self) -> str:
        tok = getattr(self.tokenizer, "image_token", None)
        return str(tok) if tok else "<image>"

    def _prompt(self, item: Item, side: Side, index: int) -> str:
        text = truncate_text(self.tokenizer, item.text, self.cfg.max_text_tokens)
        content = render_content(
            item, side, self.cfg, image_placeholder=self.cfg.image_placeholder,
            reserved=(self.image_token, "<video>"), index=index, text=text,
        )
        prompt = self.cfg.chat_template.replace("{content}", content)
        if self.cfg.append_eos and self.tokenizer.eos_token:
            prompt += self.tokenizer.eos_token
        return prompt

    def __call__(self, items: Sequence[Item], *, side: Side) -> ModelInputs:
        prompts = [self._prompt(item, side, i) for i, item in enumerate(items)]
        images, owners = [], []
        for i, item in enumerate(items):
            if item.image is not None:
                img = decode_image(item.image, index=i, side=side)
                images.append(limit_image_side(img, self.cfg.max_image_side))
                owners.append(i)
        encoded = self.tokenizer(prompts, add_special_tokens=True)["input_ids"]
        counts = {
            owner: image_token_count(
                img.height, img.width, pinpoints=self.pinpoints, crop_size=self.crop_size,
                patches_per_side=self.patches_per_side,
                vision_aspect_ratio=self.vision_aspect_ratio,
            )
            for owner, img in zip(owners, images, strict=True)
        }
        rows = expand_image_tokens(encoded, self.image_token_id, counts, side=side)
        out = pad_rows(rows, self.pad_id, self.cfg.padding_side)
        if images:
            pix = self.image_processor(
                images, image_grid_pinpoints=self.pinpoints, return_tensors="pt"
            )["pixel_values"]
            n, views = len(items), pix.shape[1]
            pixel_values = torch.zeros((n, views, *pix.shape[2:]), dtype=torch.float32)
            image_sizes = torch.zeros((n, 2), dtype=torch.long)
            for j, owner in enumerate(owners):
                pixel_values[owner] = pix[j]
                image_sizes[owner] = torch.tensor([images[j].height, images[j].width])
            out["pixel_values"] = pixel_values
            out["image_sizes"] = image_sizes
        return out

    def split(self, inputs: ModelInputs, size: int) -> list[ModelInputs]:
        # Positions come from the attention mask: a chunk can drop its all-padding columns.
        return split_trimmed(inputs, size)

    def save_pretrained(self, path: str | Path) -> None:
        self.tokenizer.save_pretrained(path)
        self.image_processor.image_grid_pinpoints = self.pinpoints
        self.image_processor.save_pretrained(path)


class LlavaOnevisionBackbone(HFBackbone):
    """LLaVA-OneVision's language-model hidden states over the prompt with the image features.

    Holds the full `LlavaOnevisionForConditionalGeneration` (so checkpoints load and save in the
    usual format) but runs only its inner model: the LM head is never computed and is frozen.
    """

    backbone_name = "llava_onevision"
    PARTS = PARTS
    cfg: LlavaOnevisionConfig
    _processor: LlavaOnevisionProcessor

    def __init__(self, cfg: LlavaOnevisionConfig) -> None:
        super().__init__(cfg)

    def _configure(self, hf_config: Any) -> Any:
        from transformers import LlavaOnevisionForConditionalGeneration

        cfg = self.cfg
        if getattr(hf_config, "model_type", None) != "llava_onevision":
            raise ConfigError([
                f"path: {cfg.path} holds a '{getattr(hf_config, 'model_type', '?')}' model, not "
                "llava_onevision. Use the backbone matching the model (see `mmemb plugins list`)."
            ])
        if hf_config.vision_feature_select_strategy != "full":
            raise ConfigError([
                f"path: {cfg.path} uses vision_feature_select_strategy="
                f"{hf_config.vision_feature_select_strategy!r}; only 'full' (LLaVA-OneVision's) "
                "is supported."
            ])
        vcfg = hf_config.vision_config
        crop = int(vcfg.image_size)
        patches = crop // int(vcfg.patch_size)
        aspect = cfg.vision_aspect_ratio or hf_config.vision_aspect_ratio
        pinpoints = select_pinpoints(
            cfg.image_grid_pinpoints or hf_config.image_grid_pinpoints, cfg.max_image_tokens,
            crop_size=crop, patches_per_side=patches, vision_aspect_ratio=aspect,
        )
        # The model unpads features with its config's pinpoints and aspect ratio: keep them equal
        # to the processor's, or the image token count and the feature count disagree.
        hf_config.image_grid_pinpoints = pinpoints
        hf_config.vision_aspect_ratio = aspect
        self._anyres = (crop, patches, aspect, pinpoints)  # for the processor, built next
        return LlavaOnevisionForConditionalGeneration

    def _tokenizer_kwargs(self) -> dict[str, Any]:
        return {"padding_side": self.cfg.padding_side}

    def _make_processor(self, hf_config: Any, tokenizer: Any,
                        image_processor: Any) -> InputProcessor:
        cfg = self.cfg
        crop, patches, aspect, pinpoints = self._anyres
        if image_processor.size.get("height", crop) != crop:
            raise ConfigError([
                f"path: {cfg.path}: the image processor's size {image_processor.size} differs "
                f"from the vision tower's image_size {crop}."
            ])
        image_processor.image_grid_pinpoints = pinpoints
        self.appends_eos = bool(cfg.append_eos and tokenizer.eos_token)
        return LlavaOnevisionProcessor(
            tokenizer, image_processor, cfg, pinpoints=pinpoints, patches_per_side=patches,
            vision_aspect_ratio=aspect,
        )

    def _prepare_model(self, model: Any) -> None:
        freeze_lm_head(model)

    def _finish(self, hf_config: Any, model: Any) -> None:
        self._hidden = int(hf_config.text_config.hidden_size)
        self._placeholder: tuple[torch.Tensor, torch.Tensor] | None = None

    lora_towers: Mapping[str, str] = tower_regexes({
        "language": ["model.language_model"],
        "vision": ["model.vision_tower"],
        "projector": ["model.multi_modal_projector"],
    })
    """Tower -> regex of module-name prefixes inside `self.model` (used by `mmemb.lora`)."""

    @property
    def hidden_size(self) -> int:
        return self._hidden

    @property
    def processor(self) -> LlavaOnevisionProcessor:
        return self._processor

    def require_uniform_forward(self) -> list[torch.nn.Parameter]:
        super().require_uniform_forward()
        # `image_newline` belongs to the inner model but is read by `get_image_features`, which
        # this forward calls outside the inner model's forward.
        return [unwrap_peft(self.model).model.image_newline]

    def _placeholder_image(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel values and size of a blank crop-sized image (run under a uniform forward)."""
        if self._placeholder is None:
            from PIL import Image

            side = self._processor.crop_size
            blank = Image.new("RGB", (side, side))
            pix = self._processor.image_processor(
                [blank], image_grid_pinpoints=self._processor.pinpoints, return_tensors="pt"
            )["pixel_values"]
            self._placeholder = (pix, torch.tensor([[side, side]]))
        pix, sizes = self._placeholder
        return pix.to(device), sizes.to(device)

    def _image_features(self, core: Any, pixel_values: torch.Tensor,
                        image_sizes: torch.Tensor) -> list[torch.Tensor]:
        dtype = next(core.vision_tower.parameters()).dtype
        return image_features(
            core.get_image_features, pixel_values.to(dtype), image_sizes,
            vision_feature_layer=core.config.vision_feature_layer,
            vision_feature_select_strategy=core.config.vision_feature_select_strategy,
        )

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> BackboneOutput:
        # The inner model's steps, in a fixed order: token embeddings, image features (scattered
        # at the image tokens), language model. The same as calling it with pixel_values, but a
        # uniform forward can also run the vision tower when the batch has no image.
        core = unwrap_peft(self.model).model  # LlavaOnevisionModel: no LM head, no logits
        input_ids, mask = inputs["input_ids"], inputs["attention_mask"]
        embeds = core.get_input_embeddings()(input_ids)
        has_image = (inputs["image_sizes"][:, 0] > 0) if "pixel_values" in inputs else None
        if has_image is not None and bool(has_image.any()):
            feats = self._image_features(core, inputs["pixel_values"][has_image],
                                         inputs["image_sizes"][has_image])
            embeds = scatter_image_features(embeds, input_ids == self._processor.image_token_id,
                                            feats)
        elif needs_placeholder(self.uniform_forward, core.vision_tower,
                               core.multi_modal_projector, core.image_newline):
            with placeholder_rng(embeds.device):
                feats = self._image_features(core, *self._placeholder_image(embeds.device))
            embeds = embeds + zero_from(feats).to(embeds.dtype)
        out = core(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=left_padded_positions(mask),
            use_cache=False,
        )
        return BackboneOutput(hidden_states=out.last_hidden_state, attention_mask=mask)


def build(cfg: LlavaOnevisionConfig) -> LlavaOnevisionBackbone:
    """Registry factory."""
    return LlavaOnevisionBackbone(cfg)
