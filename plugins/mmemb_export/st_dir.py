"""Export a text encoder as a sentence-transformers directory.

``SentenceTransformer(dir)`` then embeds like `mmemb encode`: the Transformer module is the
`hf_text` backbone's model and tokenizer (with its ``max_length``), the Pooling module its pooler,
a Normalize module its normalisation, and the query/target instructions become the ``query`` and
``document`` prompts (``encode_query`` / ``encode_document``, or ``prompt_name=``). The files use
the long-standing layout (``modules.json``, ``sentence_bert_config.json``, ``1_Pooling``), which
sentence-transformers 2.x to 6.x read. ``mmemb.json`` is written too, so mmemb reloads the
directory as the encoder it was.

When sentence-transformers is installed, the written directory is loaded with it and must embed
the probe texts like mmemb does (both sides), or nothing is written.

Multimodal backbones are refused: sentence-transformers' multimodal loading goes through
transformers' ``AutoProcessor`` and its own chat rendering, which do not reproduce mmemb's prompt
and image handling; use ``--format hf``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mmemb import __version__
from mmemb.data.schema import Item
from mmemb.encoder_io import ST_POOLERS, save_encoder
from mmemb.export import reads_images
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

# mmemb pooler -> the legacy sentence-transformers flag (read by every version since 2.x).
_POOLING_FLAGS = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token",
                  "last_token": "pooling_mode_lasttoken", "max": "pooling_mode_max_tokens"}
_ALL_FLAGS = ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens",
              "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens",
              "pooling_mode_lasttoken")
assert set(_POOLING_FLAGS) == set(ST_POOLERS.values())


class STDirConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    atol: float = Field(1e-4, gt=0, description="max abs difference of probe embeddings")
    overwrite: bool = False
    check: bool = Field(True, description="load the result with sentence-transformers (when "
                                          "installed) and compare its embeddings with mmemb's")


def _refuse(spec: Mapping[str, Any], encoder: Encoder | None) -> str | None:
    """Why this encoder has no sentence-transformers form, in one line (None: it has one).
    Without `encoder` only the spec is checked (before the model is loaded)."""
    name = spec["backbone"].get("name")
    if name != "hf_text" or (encoder is not None and reads_images(encoder)):
        try:
            import sentence_transformers

            version = f"sentence-transformers {sentence_transformers.__version__}"
        except ImportError:
            version = "sentence-transformers"
        return (f"--format sentence-transformers: backbone '{name}' is multimodal, and {version} "
                "cannot reproduce mmemb's prompt and image processing for it; use --format hf "
                "(its model card has a transformers-only snippet).")
    bb = spec["backbone"]
    pooler = spec["pooler"].get("name")
    if pooler not in _POOLING_FLAGS or set(spec["pooler"]) - {"name"}:
        return (f"--format sentence-transformers: pooler {spec['pooler']} has no "
                f"sentence-transformers Pooling mode (supported: {', '.join(_POOLING_FLAGS)}).")
    if bb.get("chat_template", "{content}") != "{content}":
        return ("--format sentence-transformers: the backbone's chat_template wraps the text in "
                "markup, which sentence-transformers prompts (prefixes) cannot express; use "
                "--format hf.")
    for key in ("append_eos", "max_text_tokens"):
        if bb.get(key):
            return (f"--format sentence-transformers: backbone setting {key}={bb[key]!r} has no "
                    "sentence-transformers equivalent; use --format hf.")
    return None


def _prefix(instruction: str | None, separator: str) -> str:
    return instruction + separator if instruction else ""


class STDirExporter:
    def __init__(self, config: STDirConfig) -> None:
        self.config = config

    def check(self, spec: Mapping[str, Any]) -> None:
        """Refuse before the model is loaded (see `mmemb.export.precheck`)."""
        why = _refuse(spec, None)
        if why:
            raise ExportError(why)

    def export(self, encoder: Encoder, *, spec: Mapping[str, Any], out: Path) -> Path:
        why = _refuse(spec, encoder)
        if why:
            raise ExportError(why)
        tmp = stage(out, self.config.overwrite)
        try:
            reference = probe(encoder)
            merge_checked(encoder, reference, self.config.atol)
            prompt = prompt_description(encoder) or {}
            extra = {k: v for k, v in spec.items() if k not in ("backbone", "pooler", "normalize")}
            extra["prompt"] = prompt
            extra["mmemb_export"] = {"format": "sentence-transformers",
                                     "mmemb_version": __version__}
            save_encoder(encoder, tmp, backbone=spec["backbone"], pooler=spec["pooler"],
                         extra=extra)
            self._write_st_files(tmp, encoder, spec, prompt)
            worst = self._check(tmp, encoder, reference, prompt)
            (tmp / "README.md").write_text(_card(spec, prompt, worst))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return publish(tmp, out)

    @staticmethod
    def _write_st_files(path: Path, encoder: Encoder, spec: Mapping[str, Any],
                        prompt: Mapping[str, Any]) -> None:
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling",
             "type": "sentence_transformers.models.Pooling"},
        ]
        if encoder.normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
            (path / "2_Normalize").mkdir()
        (path / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
        (path / "sentence_bert_config.json").write_text(json.dumps(
            {"max_seq_length": int(prompt["max_length"]), "do_lower_case": False}, indent=2))
        flags = {f: False for f in _ALL_FLAGS}
        flags[_POOLING_FLAGS[spec["pooler"]["name"]]] = True
        (path / "1_Pooling").mkdir()
        (path / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": encoder.backbone.hidden_size, **flags,
             "include_prompt": True}, indent=2))
        sep = prompt.get("instruction_separator", " ")
        prompts = {"query": _prefix(prompt.get("query_instruction"), sep),
                   "document": _prefix(prompt.get("target_instruction"), sep)}
        (path / "config_sentence_transformers.json").write_text(json.dumps(
            {"__version__": {"mmemb": __version__}, "prompts": prompts,
             "default_prompt_name": None, "similarity_fn_name": "cosine"}, indent=2))

    def _check(self, path: Path, encoder: Encoder, reference: Mapping[str, Any],
               prompt: Mapping[str, Any]) -> float | None:
        """Embed the probe texts with sentence-transformers from `path`; None when it is not
        installed (or the check is off)."""
        if not self.config.check:
            return None
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            return None
        import torch

        st = SentenceTransformer(str(path), device="cpu")
        items: list[Item] = [it for it in _probe_texts()]
        sep = prompt.get("instruction_separator", " ")
        got: dict[str, torch.Tensor] = {}
        for side, default in (("query", prompt.get("query_instruction")),
                              ("target", prompt.get("target_instruction"))):
            rows = []
            for it in items:
                instruction = it.instruction or default
                rows.append(st.encode([it.text or ""], prompt=_prefix(instruction, sep),
                                      convert_to_tensor=True).cpu()[0])
            got[side] = torch.stack(rows).float()
        return compare(probe(encoder, items), got, self.config.atol,
                       f"loading {path} with sentence-transformers")


def _probe_texts() -> list[Item]:
    from mmemb.export import probe_items

    return [it for it in probe_items() if it.image is None]


def _card(spec: Mapping[str, Any], prompt: Mapping[str, Any], worst: float | None) -> str:
    check = (f"Loaded with sentence-transformers, it reproduced mmemb's embeddings of a probe set "
             f"to {worst:.2g} (max abs difference)." if worst is not None else
             "sentence-transformers was not installed at export time: the directory was not "
             "loaded with it.")
    return f"""---
library_name: sentence-transformers
pipeline_tag: sentence-similarity
tags: [sentence-transformers, embedding, mmemb]
---
# Text embedding model (mmemb)

Exported with mmemb {__version__} from backbone `hf_text`, pooler `{spec['pooler']['name']}`,
L2-normalised: {spec.get('normalize', True)}, at most {prompt.get('max_length')} tokens.

```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("path/to/this/directory")
queries = model.encode_query(["a dog on a beach"])        # the "query" prompt
documents = model.encode_document(["A dog runs on sand."])  # the "document" prompt
```

Prompts (prepended to the text): query `{json.dumps(_prefix(prompt.get('query_instruction'),
prompt.get('instruction_separator', ' ')))}`, document `{json.dumps(_prefix(
prompt.get('target_instruction'), prompt.get('instruction_separator', ' ')))}`. An item's own
instruction goes in as `model.encode(texts, prompt=instruction + {json.dumps(
prompt.get('instruction_separator', ' '))})`.

mmemb reads the same directory: `mmemb encode --model path/to/this/directory ...`.

{check}
"""
