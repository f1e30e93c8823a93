"""Building what a run needs from the recipe, and refusing settings that would silently do
nothing."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmemb.data.shards import read_manifest
from mmemb.distributed import DistEnv
from mmemb.encoder_io import (
    ENCODER_FILE,
    ST_MODULES_FILE,
    ResolvedModel,
    build_encoder,
    resolve_model,
)
from mmemb.errors import ConfigError
from mmemb.model import Encoder
from mmemb.recipe import LoadedRecipe
from mmemb.train.data import shard_dir


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def backbone_spec(loaded: LoadedRecipe) -> dict[str, Any]:
    """The recipe's backbone spec with a local `path` resolved against the recipe's folder.

    `model.backbone.path` may also name a sentence-transformers model or a saved mmemb encoder:
    its settings (the ST Transformer's max_seq_length and prompts; a saved encoder's prompt
    template, ...) become defaults under the recipe's own keys, so training starts from that model
    exactly as `mmemb encode --model` would embed with it."""
    spec = dict(loaded.recipe.model.backbone)
    if isinstance(spec.get("path"), str):
        spec["path"] = loaded.resolve_path(spec["path"])
        found = _pretrained_model(spec["path"])
        if found is not None:
            where = f"{loaded.path or '<recipe>'}: model.backbone"
            if found.backbone["name"] != spec.get("name"):
                raise ConfigError([
                    f"{where}.path {spec['path']} is a {found.kind} model with backbone "
                    f"'{found.backbone['name']}', but model.backbone.name is "
                    f"'{spec.get('name')}'. Set model.backbone.name: {found.backbone['name']}."
                ])
            spec = {**found.backbone, **{k: v for k, v in spec.items() if k != "path"}}
    return spec


def _pretrained_model(path: str) -> ResolvedModel | None:
    """The saved mmemb encoder or sentence-transformers model at local directory `path`, or
    None for anything else (a plain Hugging Face directory or hub id: the backbone reads it)."""
    p = Path(path).expanduser()
    if not ((p / ENCODER_FILE).is_file() or (p / ST_MODULES_FILE).is_file()):
        return None
    return resolve_model(str(p))


def check_pooler(loaded: LoadedRecipe) -> None:
    """Refuse a recipe that starts from a sentence-transformers model or saved encoder but would
    silently swap its pooler or normalisation for the recipe defaults (last_token, normalised):
    the model's embeddings would change before the first step. Naming them in the recipe is fine."""
    path = loaded.recipe.model.backbone.get("path")
    if not isinstance(path, str):
        return
    found = _pretrained_model(loaded.resolve_path(path))
    if found is None:
        return
    model = loaded.recipe.model
    where = f"{loaded.path or '<recipe>'}: model"
    problems = []
    if "pooler" not in model.model_fields_set and dict(model.pooler) != found.pooler:
        problems.append(
            f"{where}.pooler is not set, so it defaults to {dict(model.pooler)}, but the "
            f"{found.kind} model at {path} pools with {found.pooler}. Set model.pooler: "
            f"{found.pooler['name']} (or the pooler you mean to train)."
        )
    if "normalize" not in model.model_fields_set and model.normalize != found.normalize:
        problems.append(
            f"{where}.normalize is not set, so it defaults to {model.normalize}, but the "
            f"{found.kind} model at {path} has normalize {found.normalize}. Set "
            f"model.normalize explicitly."
        )
    if problems:
        raise ConfigError(problems)


def build_model(loaded: LoadedRecipe) -> Encoder:
    """The encoder a recipe describes, with LoRA adapters when `model.lora` is set."""
    r = loaded.recipe
    check_pooler(loaded)
    encoder = build_encoder(backbone_spec(loaded), r.model.pooler, normalize=r.model.normalize)
    if r.model.lora is not None:
        from mmemb.lora import apply_lora

        apply_lora(encoder.backbone, r.model.lora)
    return encoder


def preflight(loaded: LoadedRecipe, encoder: Encoder, env: DistEnv) -> list[str]:
    """Problems that would make training silently do nothing (or less than the recipe says);
    raises `ConfigError` listing all of them."""
    r = loaded.recipe
    t = r.train
    where = str(loaded.path or "<recipe>")
    problems: list[str] = []
    if not any(p.requires_grad for p in encoder.parameters()):
        problems.append(
            f"{where}: model: the model has no trainable parameters (everything is frozen). "
            "Unfreeze a part (model.backbone.freeze) or add LoRA (model.lora)."
        )
    for i, entry in enumerate(r.data.train):
        manifest = read_manifest(shard_dir(loaded, entry))
        for name, ds in manifest.get("datasets", {}).items():
            have = int(ds.get("negatives", {}).get("min", 0))
            if have > 0 and t.negatives == 0:
                problems.append(
                    f"{where}: train.negatives is 0 but dataset '{name}' (data.train.{i}) has "
                    f"{have} hard negative(s) per sample: they would be ignored. Set "
                    f"train.negatives: {have} (or fewer), or prepare the data without negatives."
                )
            elif t.negatives > have:
                problems.append(
                    f"{where}: train.negatives is {t.negatives} but dataset '{name}' "
                    f"(data.train.{i}) has only {have} per sample (negatives.min in its "
                    f"manifest.json). Lower train.negatives to {have}, or mine more negatives."
                )
    gc = t.grad_cache
    if gc is not None:
        candidates = t.batch_size * (1 + t.negatives)
        if gc.query_chunk > t.batch_size:
            problems.append(
                f"{where}: train.grad_cache.query_chunk {gc.query_chunk} is larger than "
                f"train.batch_size {t.batch_size} (queries per device): GradCache would do "
                f"nothing. Use a chunk below {t.batch_size}, or drop train.grad_cache."
            )
        if gc.candidate_chunk > candidates:
            problems.append(
                f"{where}: train.grad_cache.candidate_chunk {gc.candidate_chunk} is larger than "
                f"the {candidates} candidates per device (batch_size x (1 + negatives)): "
                "GradCache would do nothing for them. Use a smaller chunk."
            )
    if t.save_every is not None and t.save_every > t.steps:
        problems.append(
            f"{where}: train.save_every {t.save_every} is more than train.steps {t.steps}: no "
            "periodic checkpoint would be written (the final one always is). Lower it or drop it."
        )
    if t.eval_every is not None and not r.data.eval:
        problems.append(
            f"{where}: train.eval_every is set but data.eval lists no evaluation data: nothing "
            "would be evaluated. Add data.eval or drop train.eval_every."
        )
    if t.deepspeed is not None and t.engine != "deepspeed":
        problems.append(
            f"{where}: train.deepspeed is set but train.engine is '{t.engine}': the DeepSpeed "
            "config would be ignored. Set train.engine: deepspeed, or drop train.deepspeed."
        )
    if problems:
        raise ConfigError(problems, header=f"{where}: {len(problems)} setting(s) would do nothing")
    return problems
