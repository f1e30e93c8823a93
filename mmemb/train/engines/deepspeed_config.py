"""The DeepSpeed config of a run: the recipe's `train.deepspeed` (inline or a JSON file) with its
"auto" values filled from the recipe, and checks for settings mmemb's step cannot honour."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from mmemb.errors import ConfigError
from mmemb.recipe import TrainConfig


def load_ds_config(value: dict[str, Any] | str | None, base_dir: Path) -> dict[str, Any]:
    """`train.deepspeed` as a dict: inline, or read from a JSON path (relative to the recipe)."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return copy.deepcopy(value)
    path = Path(value)
    if not path.is_absolute() and (base_dir / path).is_file():
        path = base_dir / path
    if not path.is_file():
        raise ConfigError([f"train.deepspeed: {value!r} is not a JSON file. Give a path to a "
                           "DeepSpeed config, or the config inline as a mapping."])
    try:
        return dict(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise ConfigError([f"train.deepspeed: {path} is not valid JSON: {exc}"]) from exc


def _fill(node: Any, values: dict[str, Any], where: str, problems: list[str]) -> Any:
    """Replace "auto" leaves by `values[key]`; an "auto" mmemb has no value for is dropped (the
    DeepSpeed default applies)."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if value == "auto":
                if key in values:
                    out[key] = values[key]
                continue
            out[key] = _fill(value, values, f"{where}.{key}", problems)
        return out
    return node


def resolve_ds_config(
    cfg: TrainConfig, world_size: int, base_dir: Path, *, cpu: bool
) -> dict[str, Any]:
    """The config passed to `deepspeed.initialize`."""
    ds = load_ds_config(cfg.deepspeed, base_dir)
    global_batch = cfg.batch_size * world_size
    values = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "train_batch_size": global_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.grad_clip or 0.0,
        "lr": cfg.lr,
        "weight_decay": cfg.weight_decay,
        "warmup_num_steps": cfg.warmup_steps,
        "warmup_max_lr": cfg.lr,
        "total_num_steps": cfg.steps,
    }
    problems: list[str] = []
    ds = _fill(ds, values, "train.deepspeed", problems)
    for key in ("train_micro_batch_size_per_gpu", "train_batch_size",
                "gradient_accumulation_steps", "gradient_clipping"):
        ds.setdefault(key, values[key])
    for key, want in (("train_micro_batch_size_per_gpu", cfg.batch_size),
                      ("train_batch_size", global_batch), ("gradient_accumulation_steps", 1)):
        if ds[key] != want:
            problems.append(
                f"train.deepspeed.{key} is {ds[key]!r} but the recipe means {want!r} "
                f"(train.batch_size {cfg.batch_size} x {world_size} process(es), one backward "
                "per step: the contrastive batch is not split into accumulation steps; use "
                "train.grad_cache for a larger batch). Set it to \"auto\"."
            )
    for name in ("bf16", "fp16"):
        section = ds.get(name)
        if isinstance(section, dict) and section.get("enabled") == "auto":
            section["enabled"] = cfg.precision == name
    if cfg.precision in ("bf16", "fp16"):
        ds.setdefault(cfg.precision, {}).setdefault("enabled", True)
    enabled = [n for n in ("bf16", "fp16") if ds.get(n, {}).get("enabled")]
    if enabled and enabled != [cfg.precision]:
        problems.append(
            f"train.deepspeed enables {enabled} but train.precision is '{cfg.precision}'. Make "
            "them agree (set the DeepSpeed sections' enabled to \"auto\")."
        )
    if cpu and "optimizer" in ds:
        # DeepSpeed's fused CPU Adam is a JIT-built op (a minute or more); torch's is exact.
        ds["optimizer"].setdefault("params", {}).setdefault("torch_adam", True)
    # mmemb's own optimizer (AdamW, no decay on biases and norms) is allowed under ZeRO.
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10**9)  # mmemb prints its own progress
    if problems:
        raise ConfigError(problems, header=f"train.deepspeed: {len(problems)} problem(s)")
    return dict(ds)
