"""Export an encoder as a Hugging Face directory that reloads with `mmemb.encoder_io.load_encoder`.

LoRA adapters are merged first; before anything is written the merged model must embed a set of
probe items like the unmerged one did, and the written copy is reloaded and compared again. The
directory appears only when everything agreed (written to a temporary name, then renamed).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from mmemb import __version__
from mmemb.encoder_io import load_encoder, save_encoder
from mmemb.errors import MmembError
from mmemb.export import probe_items
from mmemb.model import Encoder


class ExportError(MmembError):
    """The exported model does not reproduce the trained model's embeddings."""


class HFDirConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    atol: float = Field(1e-4, gt=0, description="max abs difference of probe embeddings")
    overwrite: bool = False
    model_card: bool = True


def _has_lora(encoder: Encoder) -> bool:
    return any("lora_" in name for name, _ in encoder.named_parameters())


def _probe(encoder: Encoder) -> dict[str, torch.Tensor]:
    items = probe_items()
    return {
        side: encoder.encode(items, side=side, batch_size=len(items))  # type: ignore[arg-type]
        for side in ("query", "target")
    }


def _compare(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float, what: str
) -> float:
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    if not worst <= atol:
        raise ExportError(
            f"{what}: probe embeddings differ by {worst:.3g} (> atol {atol}). Nothing was written. "
            "Check the backbone's save_pretrained, or raise export.exporter.atol for low precision."
        )
    return worst


class HFDirExporter:
    def __init__(self, config: HFDirConfig) -> None:
        self.config = config

    def export(self, encoder: Encoder, *, spec: Mapping[str, Any], out: Path) -> Path:
        if out.exists() and not self.config.overwrite:
            raise ExportError(f"{out} exists. Choose another --out or pass --arg overwrite=true.")
        reference = _probe(encoder)
        if _has_lora(encoder):
            from mmemb.lora import merge_lora

            merge_lora(encoder.backbone)
            _compare(reference, _probe(encoder), self.config.atol, "merging LoRA")
        tmp = out.with_name(out.name + ".tmp-export")
        shutil.rmtree(tmp, ignore_errors=True)
        extra = {k: v for k, v in spec.items() if k not in ("backbone", "pooler", "normalize")}
        save_encoder(encoder, tmp, backbone=spec["backbone"], pooler=spec["pooler"], extra=extra)
        worst = _compare(reference, _probe(load_encoder(tmp)), self.config.atol, f"reloading {tmp}")
        if self.config.model_card:
            (tmp / "README.md").write_text(_model_card(spec, encoder, worst))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        return out


def _model_card(spec: Mapping[str, Any], encoder: Encoder, worst: float) -> str:
    backbone = dict(spec["backbone"])
    pooler = dict(spec["pooler"])
    n_params = sum(p.numel() for p in encoder.parameters())
    return f"""---
library_name: mmemb
tags: [embedding, multimodal, mmemb]
---
# Multimodal embedding model (mmemb)

Exported with mmemb {__version__}. Backbone plugin `{backbone.get("name")}`, pooler
`{pooler.get("name")}`, L2-normalised: {encoder.normalize}. Parameters: {n_params:,}.

Backbone settings: `{ {k: v for k, v in backbone.items() if k != "name"} }`

## Use

```python
from mmemb.data.schema import Item
from mmemb.encoder_io import load_encoder

encoder = load_encoder("path/to/this/directory")
item = Item(text="a dog on a beach", instruction="Find an image that matches the caption.")
q = encoder.encode([item], side="query")
```

or `mmemb encode --model path/to/this/directory --input items.jsonl --out emb.npy`.

The exported weights reproduced the trained model's embeddings of a probe set to {worst:.2g}
(max abs difference).
"""
