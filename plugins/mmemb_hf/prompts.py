"""Items -> prompt text -> padded token rows: the instruction an item gets, the rendered content,
text truncation, image-token expansion, padding, and position ids that make padding invisible."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from mmemb.errors import ConfigError, DataError
from mmemb_hf.configs import InstructionConfig

if TYPE_CHECKING:
    import torch

    from mmemb.data.schema import Item

def item_instruction(item: Item, side: str, prompt: InstructionConfig) -> str | None:
    """The instruction an item is rendered with on `side` (see `PromptConfig`)."""
    if item.instruction:
        return item.instruction
    if side == "query":
        return prompt.query_instruction
    if prompt.target_instruction:
        return prompt.target_instruction
    if item.image is not None and not item.text:
        return getattr(prompt, "target_image_instruction", None)
    return None


def render_content(
    item: Item, side: str, prompt: InstructionConfig, *, image_placeholder: str,
    reserved: Sequence[str], index: int, text: str | None = None,
) -> str:
    """The content part of an item's prompt: image placeholder, instruction, text.

    `reserved` are the backbone's media tokens; they may not appear in the item's own text (the
    backbone inserts them for `Item.image`, and a stray one would break the image/token count).
    `text` overrides `item.text` (already truncated by the caller).
    """
    body = item.text if text is None else text
    instruction = item_instruction(item, side, prompt)
    for field_name, value in (("text", body), ("instruction", instruction)):
        for tok in reserved:
            if value and tok in value:
                raise DataError(
                    f"{side} item {index} of this batch: its {field_name} contains the token "
                    f"{tok!r}, which this backbone reserves for images. Remove it: the image "
                    "placeholder is inserted automatically for items with an image."
                )
    parts: list[str] = []
    if item.image is not None:
        parts.append(image_placeholder)
    if instruction:
        parts.append(instruction + (prompt.instruction_separator if body else ""))
    if body:
        parts.append(body)
    return "".join(parts)


def truncate_text(tokenizer: Any, text: str | None, max_tokens: int | None) -> str | None:
    """`text` cut to at most `max_tokens` tokens (decoded back to a string)."""
    if text is None or max_tokens is None:
        return text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    return str(tokenizer.decode(ids[:max_tokens], skip_special_tokens=False))


def expand_image_tokens(
    encoded: Sequence[Sequence[int]], image_token_id: int, counts: Mapping[int, int], *,
    side: str,
) -> list[list[int]]:
    """Replace the single image token of row i by `counts[i]` copies (rows without an image must
    hold none). Expanding ids is cheaper than tokenizing thousands of repeated special tokens."""
    rows: list[list[int]] = []
    for i, ids in enumerate(encoded):
        ids = list(ids)
        n_img = ids.count(image_token_id)
        if n_img != (1 if i in counts else 0):
            raise ConfigError([
                f"image_placeholder/chat_template: the prompt of {side} item {i} holds {n_img} "
                "image tokens; it must hold exactly one per image."
            ])
        if i in counts:
            at = ids.index(image_token_id)
            ids = ids[:at] + [image_token_id] * counts[i] + ids[at + 1:]
        rows.append(ids)
    return rows


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, side: str) -> dict[str, torch.Tensor]:
    """Token id lists -> padded ``input_ids`` and ``attention_mask`` (N, L) on `side`."""
    import torch

    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if not r:
            continue
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = 1
    return {"input_ids": ids, "attention_mask": mask}


def left_padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token, whatever the padding side, so
    a padded item is computed exactly like the same item alone."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)


TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")
"""The (N, L) token-aligned tensors of the text-prompt processors."""


def split_trimmed(inputs: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    """`InputProcessor.split` for processors whose rows compute the same hidden states however
    much padding they carry (position ids from the attention mask): each chunk drops the columns
    that are padding in all of its rows."""
    from mmemb.model import split_rows, trim_padding

    return [trim_padding(chunk, TOKEN_KEYS) for chunk in split_rows(inputs, size)]
