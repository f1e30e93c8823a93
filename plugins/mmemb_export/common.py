"""What the exporters share: the embedding check, the prompt description, staging and modes."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from mmemb.data.schema import Item
from mmemb.errors import MmembError
from mmemb.export import accepted_probe_items, reads_images
from mmemb.fileio import replace_dir
from mmemb.model import Encoder


class ExportError(MmembError):
    """The export cannot be written, or would not reproduce the model's embeddings."""


def has_lora(encoder: Encoder) -> bool:
    return any("lora_" in name for name, _ in encoder.named_parameters())


def probe(encoder: Encoder, items: list[Item] | None = None) -> dict[str, torch.Tensor]:
    """Embeddings of the probe items the encoder accepts, on both sides."""
    items = accepted_probe_items(encoder) if items is None else items
    return {
        side: encoder.encode(items, side=side, batch_size=len(items))  # type: ignore[arg-type]
        for side in ("query", "target")
    }


def compare(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], atol: float,
            what: str) -> float:
    """The largest |difference| between two probes; an `ExportError` above `atol`."""
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    if not worst <= atol:
        raise ExportError(
            f"{what}: probe embeddings differ by {worst:.3g} (> atol {atol}). Nothing was written. "
            "Check the backbone's save_pretrained, or raise --arg atol=... for low precision."
        )
    return worst


def merge_checked(encoder: Encoder, reference: Mapping[str, torch.Tensor], atol: float) -> None:
    """Merge LoRA adapters into the weights, checking the embeddings did not change."""
    if has_lora(encoder):
        from mmemb.lora import merge_lora

        merge_lora(encoder.backbone)
        compare(reference, probe(encoder), atol, "merging LoRA")


PROMPT_FIELDS = ("chat_template", "image_placeholder", "query_instruction", "target_instruction",
                 "target_image_instruction", "instruction_separator", "append_eos",
                 "max_text_tokens", "max_image_side")


def prompt_description(encoder: Encoder) -> dict[str, Any] | None:
    """The prompt template as data: the backbone's prompt settings, the processor's token limit
    and padding side, and the exact prompt string per side and modality (``{text}`` and
    ``{instruction}`` stand for the item's own). None when the backbone exposes no settings."""
    cfg = getattr(encoder.backbone, "cfg", None)
    if cfg is None:
        return None
    desc: dict[str, Any] = {f: getattr(cfg, f) for f in PROMPT_FIELDS if hasattr(cfg, f)}
    proc = encoder.processor
    for attr in ("max_length", "padding_side"):
        value = getattr(proc, attr, None) or getattr(cfg, attr, None)
        if value is not None:
            desc[attr] = value
    render: Callable[..., str] | None = getattr(proc, "prompt", None) or getattr(
        proc, "_prompt", None)
    if render is None or "chat_template" not in desc:
        return desc
    image = next(it.image for it in accepted_probe_items(encoder) if it.image is not None) if (
        reads_images(encoder)) else None
    kinds: dict[str, Item] = {"text": Item(text="{text}"),
                              "text+instruction": Item(text="{text}", instruction="{instruction}")}
    if image is not None:
        kinds.update({
            "image": Item(image=image),
            "image+text": Item(image=image, text="{text}"),
            "image+text+instruction": Item(image=image, text="{text}",
                                           instruction="{instruction}"),
        })
    desc["prompts"] = {f"{side}/{kind}": render(item, side, 0)
                       for side in ("query", "target") for kind, item in kinds.items()}
    return desc


def stage(out: Path, overwrite: bool) -> Path:
    """A fresh temporary directory beside `out` (refusing an existing `out` unless
    `overwrite`)."""
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists. Choose another --out or pass --arg overwrite=true.")
    tmp = out.with_name(out.name + ".tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, out: Path) -> Path:
    """Make `tmp` world-readable (files 0644, directories 0755: some writers create 0600 files,
    which a shared model directory must not have) and move it to `out`."""
    for root, dirs, files in os.walk(tmp):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
    os.chmod(tmp, 0o755)
    replace_dir(tmp, out)
    return out
