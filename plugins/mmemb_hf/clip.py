"""`clip`: CLIP / SigLIP dual encoders (image tower for images, text tower for text).

An item's embedding is the model's own projected embedding from the tower that reads it:
- text only: text tower on ``instruction + separator + text`` (query side: the item's instruction
  or `query_instruction`; target side: the item's instruction or `target_instruction`);
- image only: image tower (an instruction cannot condition a CLIP image tower and is ignored);
- image + text (fusion rule): ``image_weight * unit(image) + (1 - image_weight) * unit(text)``,
  i.e. by default the mean of the two L2-normalised embeddings (UniIR's score-level fusion); the
  encoder L2-normalises the result again.

`forward` returns hidden states of shape (N, 1, D) -- the finished embedding as a one-token
sequence -- with an all-ones mask, so every pooler returns it unchanged (use `last_token`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mmemb.data.schema import Item
from mmemb.errors import ConfigError
from mmemb.model import BackboneOutput, InputProcessor, ModelInputs, Side
from mmemb_hf.base import HFBackbone
from mmemb_hf.configs import ClipConfig
from mmemb_hf.loading import tower_regexes, unwrap_peft
from mmemb_hf.prompts import item_instruction
from mmemb_hf.uniform import needs_placeholder, placeholder_rng, zero_from
from mmemb_hf.vision import decode_image

SUPPORTED = {"clip": "CLIPModel", "siglip": "SiglipModel"}
UNSUPPORTED = {
    "siglip2": "SigLIP2's image tower needs pixel_attention_mask and spatial_shapes (NaFlex "
               "inputs), which this backbone does not produce yet",
}

PARTS: dict[str, list[str]] = {
    "vision": ["vision_model.", "visual_projection."],
    "language": ["text_model.", "text_projection."],
}


class ClipProcessor(InputProcessor):
    """Items -> dual-encoder inputs (picklable).

    Returns ``has_text`` and ``has_image`` (N,) bool; ``input_ids``/``attention_mask`` (N, L)
    when any item has text (rows without text are padding); ``pixel_values`` (N, 3, S, S) when any
    item has an image (zeros for items without one).
    """

    def __init__(self, tokenizer: Any, image_processor: Any, cfg: ClipConfig,
                 padding: str, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.cfg = cfg
        self.padding = padding
        self.max_length = max_length

    def text_of(self, item: Item, side: Side) -> str | None:
        """What the text tower reads for `item` (None: the item has no text)."""
        if item.text is None:
            return None
        instruction = item_instruction(item, side, self.cfg)
        if instruction:
            return instruction + self.cfg.instruction_separator + item.text
        return item.text

    def __call__(self, items: Sequence[Item], *, side: Side) -> ModelInputs:
        n = len(items)
        texts = [self.text_of(item, side) for item in items]
        has_text = torch.tensor([t is not None for t in texts], dtype=torch.bool)
        has_image = torch.tensor([item.image is not None for item in items], dtype=torch.bool)
        out: dict[str, torch.Tensor] = {"has_text": has_text, "has_image": has_image}
        if bool(has_text.any()):
            enc = self.tokenizer(
                [t if t is not None else "" for t in texts], padding=self.padding,
                truncation=True, max_length=self.max_length, padding_side="right",
                return_tensors="pt",
            )
            out["input_ids"] = enc["input_ids"]
            out["attention_mask"] = enc.get("attention_mask", torch.ones_like(enc["input_ids"]))
        owners = [i for i, item in enumerate(items) if item.image is not None]
        if owners:
            images = [decode_image(items[i].image, index=i, side=side)  # type: ignore[arg-type]
                      for i in owners]
            pix = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
            pixel_values = torch.zeros((n, *pix.shape[1:]), dtype=torch.float32)
            pixel_values[owners] = pix
            out["pixel_values"] = pixel_values
        return out

    def save_pretrained(self, path: str | Path) -> None:
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)


def _features(out: Any) -> torch.Tensor:
    # transformers 5 returns an output object (projected pooler_output); 4.x returned the tensor.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipBackbone(HFBackbone):
    """A CLIP/SigLIP model used as two towers; see the module docstring for the fusion rule."""

    lora_towers: Mapping[str, str] = tower_regexes({
        "language": ["text_model"],
        "vision": ["vision_model"],
        "projector": ["text_projection", "visual_projection"],
    })

    backbone_name = "clip"
    PARTS = PARTS
    cfg: ClipConfig
    _processor: ClipProcessor

    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__(cfg)

    def _configure(self, hf_config: Any) -> Any:
        import transformers

        cfg = self.cfg
        model_type = getattr(hf_config, "model_type", "?")
        if model_type in UNSUPPORTED:
            raise ConfigError([
                f"path: {cfg.path} holds a '{model_type}' model: {UNSUPPORTED[model_type]}. Use "
                f"a {' or '.join(SUPPORTED)} checkpoint."
            ])
        if model_type not in SUPPORTED:
            raise ConfigError([
                f"path: {cfg.path} holds a '{model_type}' model; backbone 'clip' reads "
                f"{', '.join(SUPPORTED)} dual encoders."
            ])
        return getattr(transformers, SUPPORTED[model_type])

    def _make_processor(self, hf_config: Any, tokenizer: Any,
                        image_processor: Any) -> InputProcessor:
        cfg = self.cfg
        # CLIP pools at the first EOS, which is also its pad token: right padding only. SigLIP
        # pools the last position and was trained on max_length padding.
        padding = "max_length" if hf_config.model_type.startswith("siglip") else "longest"
        positions = int(hf_config.text_config.max_position_embeddings)
        if cfg.max_length is not None and cfg.max_length > positions:
            raise ConfigError([
                f"max_length: {cfg.max_length} is more than the {positions} positions of the text "
                f"tower at {cfg.path}; set max_length to at most {positions} (or leave it unset)."
            ])
        return ClipProcessor(tokenizer, image_processor, cfg, padding, cfg.max_length or positions)

    def _prepare_model(self, model: Any) -> None:
        # Scores between towers: unused by an embedding backbone, so never trained. Held as
        # buffers (same state-dict keys, so checkpoints are unchanged): DeepSpeed cannot
        # broadcast a 0-dim *parameter* across ranks ("cannot view Float as Byte").
        for name in ("logit_scale", "logit_bias"):
            param = getattr(model, name, None)
            if isinstance(param, torch.nn.Parameter):
                delattr(model, name)
                model.register_buffer(name, param.detach().clone())

    def _finish(self, hf_config: Any, model: Any) -> None:
        self._placeholder: dict[str, torch.Tensor] | None = None
        self._dim = int(getattr(hf_config, "projection_dim", 0)
                        or hf_config.text_config.hidden_size)

    @property
    def hidden_size(self) -> int:
        return self._dim

    @property
    def processor(self) -> ClipProcessor:
        return self._processor

    def _placeholders(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Inputs of an empty text and a blank image (run under a uniform forward)."""
        if self._placeholder is None:
            from PIL import Image

            proc = self._processor
            enc = proc.tokenizer([""], padding=proc.padding, truncation=True,
                                 max_length=proc.max_length, return_tensors="pt")
            size = proc.image_processor.size
            side = int(size.get("height") or size.get("shortest_edge") or 224)
            pix = proc.image_processor(images=[Image.new("RGB", (side, side))],
                                       return_tensors="pt")["pixel_values"]
            self._placeholder = {
                "input_ids": enc["input_ids"],
                "attention_mask": enc.get("attention_mask", torch.ones_like(enc["input_ids"])),
                "pixel_values": pix,
            }
        return {k: v.to(device) for k, v in self._placeholder.items()}

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> BackboneOutput:
        model = unwrap_peft(self.model)
        has_text, has_image = inputs["has_text"], inputs["has_image"]
        n = has_text.shape[0]
        device = has_text.device
        text = image = None
        unused: list[torch.Tensor] = []  # towers run on placeholders (uniform forward)
        if bool(has_text.any()):
            text = _features(model.get_text_features(
                input_ids=inputs["input_ids"][has_text],
                attention_mask=inputs["attention_mask"][has_text],
            ))
        elif needs_placeholder(self.uniform_forward, model.text_model,
                                 getattr(model, "text_projection", None)):
            blank = self._placeholders(device)
            with placeholder_rng(device):
                unused.append(_features(model.get_text_features(
                    input_ids=blank["input_ids"], attention_mask=blank["attention_mask"])))
        dtype = next(model.vision_model.parameters()).dtype
        if bool(has_image.any()):
            image = _features(model.get_image_features(
                pixel_values=inputs["pixel_values"][has_image].to(dtype)))
        elif needs_placeholder(self.uniform_forward, model.vision_model,
                               getattr(model, "visual_projection", None)):
            blank = self._placeholders(device)
            with placeholder_rng(device):
                unused.append(_features(model.get_image_features(
                    pixel_values=blank["pixel_values"].to(dtype))))
        ref = text if text is not None else image
        assert ref is not None, "every item has text or an image"
        t_full = torch.zeros((n, ref.shape[-1]), dtype=ref.dtype, device=device)
        i_full = torch.zeros_like(t_full)
        if text is not None:
            t_full = t_full.index_put((has_text.nonzero().squeeze(1),), text)
        if image is not None:
            i_full = i_full.index_put((has_image.nonzero().squeeze(1),), image)
        both = (has_text & has_image).unsqueeze(-1)
        w = self.cfg.image_weight
        fused = w * nn_unit(i_full) + (1 - w) * nn_unit(t_full)
        emb = torch.where(both, fused, torch.where(has_image.unsqueeze(-1), i_full, t_full))
        if unused:
            emb = emb + zero_from(unused).to(emb.dtype)
        mask = torch.ones((n, 1), dtype=torch.long, device=device)
        return BackboneOutput(hidden_states=emb.unsqueeze(1), attention_mask=mask)


def nn_unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    return torch.nn.functional.normalize(x, dim=-1)


def build(cfg: ClipConfig) -> ClipBackbone:
    """Registry factory."""
    return ClipBackbone(cfg)
