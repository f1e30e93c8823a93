"""`hf_text`: any transformers `AutoModel` text encoder (BERT/MiniLM, a Qwen2 decoder, ...).

Prompt: ``chat_template`` (default ``{content}``: no markup) with content = instruction +
separator + text, the instruction on the query side as for the multimodal backbones (e.g.
``query_instruction: "query: "`` with ``instruction_separator: ""`` for E5). Items with an image
are rejected. Padding side: the tokenizer's own unless `padding_side` is set (BERT: right; decoder
embedders such as gte-Qwen2: left, with last-token pooling).
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
from mmemb_hf.configs import HFTextConfig
from mmemb_hf.loading import unwrap_peft
from mmemb_hf.prompts import left_padded_positions, render_content, split_trimmed, truncate_text

# Model families whose position ids are derived from the padding index: passing 0-based ids
# would shift them; they compute padding-aware positions themselves.
_OWN_POSITIONS = {"roberta", "xlm-roberta", "camembert", "longformer", "xlm-roberta-xl", "bart"}


class HFTextProcessor(InputProcessor):
    """Items -> ``input_ids``/``attention_mask`` (and ``token_type_ids`` if the tokenizer makes
    them), each (N, L). Picklable."""

    def __init__(self, tokenizer: Any, cfg: HFTextConfig, padding_side: str,
                 max_length: int) -> None:
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.padding_side = padding_side
        self.max_length = max_length

    def prompt(self, item: Item, side: Side, index: int) -> str:
        if item.image is not None:
            raise DataError(
                f"{side} item {index} of this batch has an image, but backbone 'hf_text' reads "
                "text only. Use llava_onevision, qwen2_vl or clip for images, or drop the image "
                "column in `mmemb prepare`."
            )
        text = truncate_text(self.tokenizer, item.text, self.cfg.max_text_tokens)
        content = render_content(item, side, self.cfg, image_placeholder="", reserved=(),
                                 index=index, text=text)
        prompt = self.cfg.chat_template.replace("{content}", content)
        if self.cfg.append_eos and self.tokenizer.eos_token:
            prompt += self.tokenizer.eos_token
        return prompt

    def __call__(self, items: Sequence[Item], *, side: Side) -> ModelInputs:
        prompts = [self.prompt(item, side, i) for i, item in enumerate(items)]
        enc = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=self.max_length,
            padding_side=self.padding_side, return_tensors="pt",
        )
        return {k: v for k, v in enc.items()
                if k in ("input_ids", "attention_mask", "token_type_ids")}

    def split(self, inputs: ModelInputs, size: int) -> list[ModelInputs]:
        # Positions come from the attention mask: a chunk can drop its all-padding columns.
        return split_trimmed(inputs, size)

    def save_pretrained(self, path: str | Path) -> None:
        self.tokenizer.save_pretrained(path)


DEFAULT_MAX_LENGTH = 512


# Families whose position embeddings start after the padding index (RoBERTa: 514 embeddings,
# 512 usable). BART also offsets by 2 but allocates max_position_embeddings + 2 rows itself.
_PADDING_OFFSET_POSITIONS = _OWN_POSITIONS - {"bart"}
# Families with a learned absolute position table, which fails past its end.
_ABSOLUTE_POSITIONS = _OWN_POSITIONS | {"bert", "electra", "distilbert", "albert", "mpnet",
                                        "ernie", "mbart", "gpt2", "opt"}


def position_limit(hf_config: Any) -> tuple[int | None, bool]:
    """(how many tokens the model reads, whether that is a hard limit). Hard: a learned absolute
    position table (BERT, RoBERTa, BART, ...), which fails beyond its end. Rotary and relative
    positions (Qwen2, DeBERTa-v3) only degrade beyond ``max_position_embeddings``. None: no limit
    known."""
    text_config = hf_config.get_text_config()
    n = getattr(text_config, "max_position_embeddings", None)
    if not isinstance(n, int) or n <= 0:
        return None, False
    if getattr(hf_config, "model_type", "") in _PADDING_OFFSET_POSITIONS:
        pad = getattr(text_config, "pad_token_id", None) or 0
        n -= pad + 1
    model_type = getattr(hf_config, "model_type", "")
    hard = (model_type in _ABSOLUTE_POSITIONS
            or getattr(text_config, "position_embedding_type", None) == "absolute")
    return n, hard


def resolve_max_length(cfg: HFTextConfig, hf_config: Any) -> int:
    """`max_length`, or 512 capped at the model's position limit. A value beyond a hard limit
    would fail inside the model on the first long text, so it is an error here."""
    limit, hard = position_limit(hf_config)
    if cfg.max_length is None:
        return min(DEFAULT_MAX_LENGTH, limit) if limit else DEFAULT_MAX_LENGTH
    if hard and limit is not None and cfg.max_length > limit:
        raise ConfigError([
            f"max_length: {cfg.max_length} is more than the {limit} positions the model at "
            f"{cfg.path} can read; set max_length to at most {limit} (or leave it unset)."
        ])
    return cfg.max_length


class HFTextBackbone(HFBackbone):
    """Last hidden layer of an `AutoModel` over the tokenized prompt."""

    backbone_name = "hf_text"
    uses_image_processor = False
    cfg: HFTextConfig
    _processor: HFTextProcessor

    def __init__(self, cfg: HFTextConfig) -> None:
        super().__init__(cfg)

    def _configure(self, hf_config: Any) -> Any:
        from transformers import AutoModel

        return AutoModel  # any architecture: AutoModel picks the class from the config

    def _make_processor(self, hf_config: Any, tokenizer: Any,
                        image_processor: Any) -> InputProcessor:
        cfg = self.cfg
        if tokenizer.pad_token is None:
            # Decoder tokenizers often have no pad token; padded positions are masked anyway.
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        side = cfg.padding_side or tokenizer.padding_side
        processor = HFTextProcessor(tokenizer, cfg, side, resolve_max_length(cfg, hf_config))
        self.appends_eos = bool(cfg.append_eos and tokenizer.eos_token)
        return processor

    def _freeze_parts(self, model: Any) -> Mapping[str, Sequence[str]]:
        return {"embeddings": [self._embedding_prefix(model)]}

    def _finish(self, hf_config: Any, model: Any) -> None:
        self._hidden = int(hf_config.get_text_config().hidden_size)
        params = inspect.signature(model.forward).parameters
        self._accepts = set(params)
        self._own_positions = getattr(hf_config, "model_type", "") in _OWN_POSITIONS

    @staticmethod
    def _embedding_prefix(model: Any) -> str:
        emb = model.get_input_embeddings()
        for name, module in model.named_modules():
            if module is emb:
                return name + "."
        raise DataError("hf_text: the model exposes no input embeddings")  # pragma: no cover

    # Every top-level module counts as the language tower: LoRA target names are matched below it.
    lora_towers: Mapping[str, str] = {"language": r"[^.]+"}

    @property
    def hidden_size(self) -> int:
        return self._hidden

    @property
    def processor(self) -> HFTextProcessor:
        return self._processor

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> BackboneOutput:
        model = unwrap_peft(self.model)
        mask = inputs["attention_mask"]
        kwargs: dict[str, Any] = {"input_ids": inputs["input_ids"], "attention_mask": mask}
        if "token_type_ids" in inputs and "token_type_ids" in self._accepts:
            kwargs["token_type_ids"] = inputs["token_type_ids"]
        if (self._processor.padding_side == "left" and "position_ids" in self._accepts
                and not self._own_positions):
            kwargs["position_ids"] = left_padded_positions(mask)
        if "use_cache" in self._accepts:
            kwargs["use_cache"] = False
        out = model(**kwargs)
        return BackboneOutput(hidden_states=out.last_hidden_state, attention_mask=mask)


def build(cfg: HFTextConfig) -> HFTextBackbone:
    """Registry factory."""
    return HFTextBackbone(cfg)
