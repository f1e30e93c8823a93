"""Export an encoder as a Hugging Face directory: transformers loads the weights, mmemb reloads the
whole encoder, and the model card shows how to reproduce its embeddings with transformers alone.

LoRA adapters are merged first; before anything is written the merged model must embed a set of
probe items (the ones the backbone accepts) like the unmerged one did, and the written copy is
reloaded and compared again. The directory appears only when everything agreed (written to a
temporary name, then renamed), with files mode 0644.

What the directory holds beyond the backbone's own files:

- ``mmemb.json`` -- backbone/pooler/normalize as before, plus ``prompt``: the prompt settings and
  the exact prompt string per side and modality, and ``provenance`` (recipe, data, eval);
- the tokenizer's chat template set to the embedding prompt's markup (where the backbone has one),
  so ``tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False)``
  returns the prompt for a rendered content;
- ``README.md`` -- the model card (see `model_card`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mmemb import __version__
from mmemb.encoder_io import ENCODER_FILE, load_encoder, save_encoder
from mmemb.model import Encoder
from mmemb_export.common import (
    ExportError,
    compare,
    merge_checked,
    probe,
    prompt_description,
    publish,
    stage,
)
from mmemb_export.snippets import MODEL_PLACEHOLDER, transformers_snippet

__all__ = ["ExportError", "HFDirConfig", "HFDirExporter", "model_card"]

CARD_SNIPPET_HEADING = "## Use with transformers"


class HFDirConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    atol: float = Field(1e-4, gt=0, description="max abs difference of probe embeddings")
    overwrite: bool = False
    model_card: bool = True


def embedding_chat_template(template: str) -> str:
    """A jinja chat template that renders mmemb's ``chat_template`` around the first message's
    content (literal parts in raw blocks, so braces and quotes pass through unchanged)."""
    prefix, _, suffix = template.partition("{content}")

    def raw(s: str) -> str:
        return f"{{% raw %}}{s}{{% endraw %}}" if s else ""

    return raw(prefix) + "{{ messages[0]['content'] }}" + raw(suffix)


def write_chat_template(path: Path, prompt: Mapping[str, Any] | None) -> bool:
    """Set the saved tokenizer's chat template to the embedding prompt's markup, when there is
    markup and the template survives a round trip; returns whether it was written."""
    template = (prompt or {}).get("chat_template")
    if not template or template == "{content}" or "{% endraw %}" in template:
        return False
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = embedding_chat_template(template)
    probe_content = "{text}"
    rendered = tok.apply_chat_template([{"role": "user", "content": probe_content}],
                                       tokenize=False)
    if rendered != template.replace("{content}", probe_content):
        return False  # pragma: no cover - jinja altered the literal text; mmemb.json still has it
    tok.save_pretrained(path)
    return True


class HFDirExporter:
    def __init__(self, config: HFDirConfig) -> None:
        self.config = config

    def export(self, encoder: Encoder, *, spec: Mapping[str, Any], out: Path) -> Path:
        tmp = stage(out, self.config.overwrite)
        try:
            reference = probe(encoder)
            merge_checked(encoder, reference, self.config.atol)
            prompt = prompt_description(encoder)
            extra = {k: v for k, v in spec.items() if k not in ("backbone", "pooler", "normalize")}
            if prompt is not None:
                extra["prompt"] = prompt
            extra["mmemb_export"] = {"format": "hf", "mmemb_version": __version__}
            save_encoder(encoder, tmp, backbone=spec["backbone"], pooler=spec["pooler"],
                         extra=extra)
            chat = write_chat_template(tmp, prompt)
            worst = compare(reference, probe(load_encoder(tmp)), self.config.atol,
                            f"reloading {tmp}")
            if self.config.model_card:
                saved = json.loads((tmp / ENCODER_FILE).read_text())
                n_params = sum(p.numel() for p in encoder.parameters())
                (tmp / "README.md").write_text(model_card(saved, n_params, worst,
                                                          chat_template=chat))
        except BaseException:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return publish(tmp, out)


def _fence(text: str, lang: str = "") -> str:
    return f"```{lang}\n{text.rstrip()}\n```\n"


def _prompt_section(prompt: Mapping[str, Any] | None, chat_template: bool) -> str:
    if not prompt:
        return ""
    lines = ["## Prompt\n",
             "Each item is embedded from this exact prompt (`{text}` and `{instruction}` stand "
             "for the item's own; an item's instruction replaces the default one). The settings "
             f"are in `{ENCODER_FILE}` under `prompt`.\n"]
    for key, value in prompt.get("prompts", {}).items():
        lines.append(f"- `{key}`: `{json.dumps(value)}`")
    settings = {k: v for k, v in prompt.items() if k != "prompts"}
    lines.append("\nSettings:\n")
    lines.append(_fence(json.dumps(settings, indent=2), "json"))
    if chat_template:
        lines.append(
            "The tokenizer's chat template is this prompt's markup: "
            "`tokenizer.apply_chat_template([{\"role\": \"user\", \"content\": content}], "
            "tokenize=False)` returns the prompt for a rendered content (image placeholder + "
            "instruction + separator + text).\n"
        )
    return "\n".join(lines) + "\n"


def _provenance_section(prov: Mapping[str, Any] | None) -> str:
    if not prov:
        return ""
    parts = ["## Training and evaluation\n"]
    if "imported_from" in prov:
        src = prov["imported_from"]
        parts.append(f"Imported from a {src['kind']} model at `{src['location']}`.\n")
    if "recipe" in prov:
        parts.append(f"Training recipe (`{prov['recipe']['path']}`):\n")
        parts.append(_fence(prov["recipe"]["text"], "yaml"))
    if prov.get("data"):
        parts.append("Data (fingerprint: sha256 over the shard manifest's checksums):\n")
        parts.append("| split | shards | fingerprint | samples |")
        parts.append("|---|---|---|---|")
        for row in prov["data"]:
            fp = f"`{row['fingerprint'][:16]}`" if row.get("fingerprint") else "not found"
            samples = ", ".join(f"{k}: {v}" for k, v in (row.get("samples") or {}).items())
            parts.append(f"| {row['split']} | `{row['shards']}` | {fp} | {samples} |")
        parts.append("")
    for res in prov.get("eval") or []:
        parts.append(f"Evaluation (`{res['path']}`, task {res['task']}, overall "
                     f"{res['overall']}):\n")
        parts.append(res["markdown"].rstrip() + "\n")
    return "\n".join(parts) + "\n"


def model_card(spec: Mapping[str, Any], n_params: int, worst: float, *,
               chat_template: bool = False) -> str:
    """README.md: what the model is, its exact prompts, a transformers-only snippet that
    reproduces `mmemb encode` (for the backbones `snippets` covers), the mmemb way, and the
    training recipe, data fingerprints and eval results when known."""
    backbone = dict(spec["backbone"])
    pooler = dict(spec["pooler"])
    snippet = transformers_snippet(spec)
    if snippet is not None:
        use = (f"{CARD_SNIPPET_HEADING}\n\nOnly transformers and torch (and Pillow for images); "
               "torchvision is not needed. Replace the path; `embed` returns what `mmemb encode "
               "--side query|target` writes, one item at a time.\n\n" + _fence(snippet, "python"))
    else:
        use = (f"{CARD_SNIPPET_HEADING}\n\nNo transformers-only snippet is generated for "
               f"backbone `{backbone.get('name')}` with pooler `{pooler.get('name')}`; the "
               "prompt above and the weights in this directory are all it takes, or use mmemb "
               "below.\n")
    return f"""---
library_name: transformers
pipeline_tag: feature-extraction
tags: [embedding, multimodal, mmemb]
---
# Embedding model (mmemb)

Exported with mmemb {__version__}. Backbone plugin `{backbone.get("name")}`, pooler
`{pooler.get("name")}`, L2-normalised: {spec.get("normalize", True)}. Parameters: {n_params:,}.

Backbone settings: `{json.dumps({k: v for k, v in backbone.items() if k != "name"})}`

{_prompt_section(spec.get("prompt"), chat_template)}{use}
## Use with mmemb

```bash
mmemb encode --model {MODEL_PLACEHOLDER} --input items.jsonl --out emb.npy --side query
```

```python
from mmemb.data.schema import Item
from mmemb.encoder_io import load_encoder

encoder = load_encoder("{MODEL_PLACEHOLDER}")
item = Item(text="a dog on a beach", instruction="Find an image that matches the caption.")
q = encoder.encode([item], side="query")
```

The exported weights reproduced the trained model's embeddings of a probe set to {worst:.2g}
(max abs difference).

{_provenance_section(spec.get("provenance"))}"""
