"""`qwen2_vl`: Qwen2-VL and Qwen2.5-VL as embedding backbones.

Prompt (defaults; docs/backbones.md has the details)::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n
    <|vision_start|><|image_pad|><|vision_end|>{instruction} {text}<|im_end|>\\n
    <|im_start|>assistant\\n

``<|image_pad|>`` is expanded to (grid_h * grid_w) / merge_size^2 tokens: the image is resized so
both sides are multiples of patch_size * merge_size (28 px for the released models) and its area
lies in [min_pixels, max_pixels]. Every 28x28 px block is one token, so `max_pixels` (or
`max_image_tokens`, which sets it) bounds the sequence -- the memory knob.

Padding: left by default. Position ids are M-RoPE ids computed from the attention mask (the
model's `get_rope_index`), so padding does not change an item's hidden states.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mmemb.data.schema import Item
from mmemb.errors import ConfigError, DataError
from mmemb.model import BackboneOutput, InputProcessor, ModelInputs, Side
from mmemb_hf.base import HFBackbone
from mmemb_hf.configs import Qwen2VLConfig
from mmemb_hf.loading import freeze_lm_head, tower_regexes, unwrap_peft
from mmemb_hf.prompts import (
    expand_image_tokens,
    pad_rows,
    render_content,
    split_trimmed,
    truncate_text,
)
from mmemb_hf.uniform import needs_placeholder, placeholder_rng, zero_from
from mmemb_hf.vision import decode_image, image_features, scatter_image_features

PARTS: dict[str, list[str]] = {
    "vision": ["model.visual.patch_embed.", "model.visual.blocks."],
    "projector": ["model.visual.merger."],
    "language": ["model.language_model."],
    "embeddings": ["model.language_model.embed_tokens."],
}

SUPPORTED = {"qwen2_vl": "Qwen2VLForConditionalGeneration",
             "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}


class Qwen2VLProcessor(InputProcessor):
    """Items -> Qwen2-VL inputs on the CPU (picklable).

    Returns ``input_ids`` and ``attention_mask`` (N, L); when any item has an image also
    ``pixel_values`` (N, P, D) -- each image's flattened patches, zero-padded to the most patches
    P in the batch -- and ``image_grid_thw`` (N, 3), (0, 0, 0) for items without an image.
    """

    def __init__(self, tokenizer: Any, image_processor: Any, cfg: Qwen2VLConfig) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.cfg = cfg
        self.merge = int(image_processor.merge_size)
        self.factor = int(image_processor.patch_size) * self.merge
        size = dict(image_processor.size)
        min_pixels = cfg.min_pixels or size.get("shortest_edge") or self.factor**2
        max_pixels = cfg.max_pixels or size.get("longest_edge") or 1280 * self.factor**2
        if cfg.max_image_tokens is not None:
            max_pixels = min(max_pixels, cfg.max_image_tokens * self.factor**2)
        if max_pixels < self.factor**2 or min_pixels > max_pixels:
            raise ConfigError([
                f"min_pixels/max_pixels/max_image_tokens: the pixel range [{min_pixels}, "
                f"{max_pixels}] is empty or below one {self.factor}x{self.factor} block; raise "
                f"max_pixels to at least {max(self.factor**2, min_pixels)}."
            ])
        self.size = {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)}
        self.image_token = "<|image_pad|>"
        self.image_token_id = int(tokenizer.convert_tokens_to_ids(self.image_token))
        if self.image_token not in cfg.image_placeholder:
            raise ConfigError([
                f"image_placeholder: {cfg.image_placeholder!r} must contain {self.image_token!r}."
            ])
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (tokenizer.eos_token_id or 0))

    def _prompt(self, item: Item, side: Side, index: int) -> str:
        text = truncate_text(self.tokenizer, item.text, self.cfg.max_text_tokens)
        content = render_content(
            item, side, self.cfg, image_placeholder=self.cfg.image_placeholder,
            reserved=("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"),
            index=index, text=text,
        )
        prompt = self.cfg.chat_template.replace("{content}", content)
        if self.cfg.append_eos and self.tokenizer.eos_token:
            prompt += self.tokenizer.eos_token
        return prompt

    def __call__(self, items: Sequence[Item], *, side: Side) -> ModelInputs:
        prompts = [self._prompt(item, side, i) for i, item in enumerate(items)]
        owners = [i for i, item in enumerate(items) if item.image is not None]
        images = [decode_image(items[i].image, index=i, side=side) for i in owners]  # type: ignore[arg-type]
        patches: list[torch.Tensor] = []
        grids: list[torch.Tensor] = []
        for i, img in zip(owners, images, strict=True):
            try:
                out = self.image_processor(images=[img], size=self.size, return_tensors="pt")
            except ValueError as exc:  # e.g. an aspect ratio above 200
                raise DataError(f"{side} item {i} of this batch: image {img.size} cannot be "
                                f"processed for Qwen2-VL: {exc}") from exc
            patches.append(out["pixel_values"])
            grids.append(out["image_grid_thw"][0])
        counts = {i: int(g.prod()) // self.merge**2 for i, g in zip(owners, grids, strict=True)}
        encoded = self.tokenizer(prompts, add_special_tokens=True)["input_ids"]
        rows = expand_image_tokens(encoded, self.image_token_id, counts, side=side)
        batch = pad_rows(rows, self.pad_id, self.cfg.padding_side)
        if owners:
            n = len(items)
            most = max(p.shape[0] for p in patches)
            pixel_values = torch.zeros((n, most, patches[0].shape[1]), dtype=torch.float32)
            grid_thw = torch.zeros((n, 3), dtype=torch.long)
            for i, p, g in zip(owners, patches, grids, strict=True):
                pixel_values[i, : p.shape[0]] = p
                grid_thw[i] = g
            batch["pixel_values"] = pixel_values
            batch["image_grid_thw"] = grid_thw
        return batch

    def split(self, inputs: ModelInputs, size: int) -> list[ModelInputs]:
        # Positions come from the attention mask: a chunk can drop its all-padding columns.
        return split_trimmed(inputs, size)

    def save_pretrained(self, path: str | Path) -> None:
        self.tokenizer.save_pretrained(path)
        self.image_processor.size = dict(self.size)
        self.image_processor.save_pretrained(path)


class Qwen2VLBackbone(HFBackbone):
    """Qwen2-VL / Qwen2.5-VL language-model hidden states over the prompt with image features.
    The full conditional-generation model is kept (usual checkpoint format); its LM head is not
    run and, unless tied to the input embeddings, is frozen."""

    lora_towers: Mapping[str, str] = {
        **tower_regexes({"language": ["model.language_model"],
                         "projector": ["model.visual.merger"]}),
        "vision": r"model\.visual\.(?!merger\b)[^.]+",
    }
    """Tower -> regex of module-name prefixes inside `self.model` (used by `mmemb.lora`)."""

    backbone_name = "qwen2_vl"
    PARTS = PARTS
    cfg: Qwen2VLConfig
    _processor: Qwen2VLProcessor

    def __init__(self, cfg: Qwen2VLConfig) -> None:
        super().__init__(cfg)

    def _configure(self, hf_config: Any) -> Any:
        import transformers

        model_type = getattr(hf_config, "model_type", "?")
        if model_type not in SUPPORTED:
            raise ConfigError([
                f"path: {self.cfg.path} holds a '{model_type}' model; backbone 'qwen2_vl' reads "
                f"{' and '.join(SUPPORTED)} models."
            ])
        return getattr(transformers, SUPPORTED[model_type])

    def _make_processor(self, hf_config: Any, tokenizer: Any,
                        image_processor: Any) -> InputProcessor:
        processor = Qwen2VLProcessor(tokenizer, image_processor, self.cfg)
        self.appends_eos = bool(self.cfg.append_eos and tokenizer.eos_token)
        return processor

    def _prepare_model(self, model: Any) -> None:
        freeze_lm_head(model)

    def _finish(self, hf_config: Any, model: Any) -> None:
        self._hidden = int(hf_config.get_text_config().hidden_size)
        self._image_token_id = int(hf_config.image_token_id)
        self._placeholder: tuple[torch.Tensor, torch.Tensor] | None = None
        if self._image_token_id != self._processor.image_token_id:
            raise ConfigError([
                f"path: {self.cfg.path}: the tokenizer's <|image_pad|> id "
                f"{self._processor.image_token_id} differs from the model's image_token_id "
                f"{self._image_token_id}; tokenizer and model do not belong together."
            ])

    @property
    def hidden_size(self) -> int:
        return self._hidden

    @property
    def processor(self) -> Qwen2VLProcessor:
        return self._processor

    def _positions(self, core: Any, input_ids: torch.Tensor, mask: torch.Tensor,
                   grid: torch.Tensor | None) -> torch.Tensor:
        """M-RoPE position ids (3, N, L) from the attention mask, for any padding side."""
        mm_types = (input_ids == self._image_token_id).int()
        params = inspect.signature(core.get_rope_index).parameters
        kwargs: dict[str, Any] = {"image_grid_thw": grid, "attention_mask": mask}
        if "mm_token_type_ids" in params:  # transformers >= 5 marks image tokens explicitly
            kwargs["mm_token_type_ids"] = mm_types
        position_ids, _ = core.get_rope_index(input_ids, **kwargs)
        return position_ids

    def _placeholder_image(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Patches and grid of a blank image of one merge block (run under a uniform forward)."""
        if self._placeholder is None:
            from PIL import Image

            proc = self._processor
            blank = Image.new("RGB", (proc.factor, proc.factor))
            out = proc.image_processor(images=[blank], size=proc.size, return_tensors="pt")
            self._placeholder = (out["pixel_values"], out["image_grid_thw"])
        pix, grid = self._placeholder
        return pix.to(device), grid.to(device)

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> BackboneOutput:
        # The inner model's steps, in a fixed order: token embeddings, image features (scattered
        # at the image tokens), language model. The same as calling it with pixel_values, but a
        # uniform forward can also run the vision tower when the batch has no image.
        core = unwrap_peft(self.model).model  # Qwen2VLModel: no LM head, no logits
        input_ids, mask = inputs["input_ids"], inputs["attention_mask"]
        embeds = core.get_input_embeddings()(input_ids)
        grid = None
        has_image = (inputs["image_grid_thw"][:, 0] > 0) if "pixel_values" in inputs else None
        if has_image is not None and bool(has_image.any()):
            grid = inputs["image_grid_thw"][has_image]
            counts = grid.prod(-1).tolist()
            rows = inputs["pixel_values"][has_image]
            patches = torch.cat([r[:c] for r, c in zip(rows, counts, strict=True)])
            feats = image_features(core.get_image_features, patches, grid)
            embeds = scatter_image_features(embeds, input_ids == self._image_token_id, feats)
        elif needs_placeholder(self.uniform_forward, core.visual):
            with placeholder_rng(embeds.device):
                feats = image_features(core.get_image_features,
                                       *self._placeholder_image(embeds.device))
            embeds = embeds + zero_from(feats).to(embeds.dtype)
        out = core(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=self._positions(core, input_ids, mask, grid),
            use_cache=False,
        )
        return BackboneOutput(hidden_states=out.last_hidden_state, attention_mask=mask)


def build(cfg: Qwen2VLConfig) -> Qwen2VLBackbone:
    """Registry factory."""
    return Qwen2VLBackbone(cfg)
