"""Loading and saving a Hugging Face backbone's model: path checks and load errors that name the
fix, dtype, random or pretrained weights, gradient checkpointing, freezing, and the LoRA adapter
kept beside the base weights. torch, transformers and peft are imported where used."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmemb.errors import ConfigError, MmembError
from mmemb_hf.configs import HFBackboneConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

ADAPTER_DIR = "lora_adapter"
"""Sub-directory of a saved backbone holding its peft LoRA adapter (base weights stay unmerged)."""

DTYPES: dict[str, str] = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


class BackboneLoadError(MmembError):
    """A backbone's model, tokenizer or image processor could not be loaded from `path`."""


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a config's `dtype` string."""
    import torch

    if name not in DTYPES:
        raise ConfigError([f"dtype: unsupported value {name!r}; use one of {', '.join(DTYPES)}."])
    return getattr(torch, DTYPES[name])


def _describe_path(path: str) -> str:
    p = Path(path).expanduser()
    if p.exists():
        return f"local directory {p}"
    return f"'{path}' (not a local directory, so treated as a Hugging Face hub id)"


def check_path(path: str, *, field: str = "path") -> None:
    """Fail early, naming the fix, when `path` looks local but is not a directory."""
    p = Path(path).expanduser()
    looks_local = path.startswith(("/", ".", "~")) or path.count("/") > 1 or p.exists()
    if p.exists() and not p.is_dir():
        raise BackboneLoadError(
            f"{field}: {path} is a file; expected a model directory (config.json, weights, "
            "tokenizer) or a hub id such as 'llava-hf/llava-onevision-qwen2-7b-ov-hf'."
        )
    if looks_local and not p.exists():
        raise BackboneLoadError(
            f"{field}: directory {path} does not exist. Pass an existing model directory or a "
            "Hugging Face hub id; build a tiny test model with `python -m mmemb.testing.tiny "
            "llava_onevision DIR`."
        )


def load_or_fail(what: str, path: str, loader: Any, *args: Any, **kwargs: Any) -> Any:
    """Call `loader(path, ...)`, turning its failure into a `BackboneLoadError` that names the path
    and the usual fixes (offline mode without a cache, a typo, a missing file).

    A hub id is read from the local cache only when offline mode is on or the hub does not answer
    one quick request: a missing model then fails at once, not after five network retries."""
    from mmemb import hub

    remote = not Path(path).expanduser().exists()
    if remote and hub.local_only(path):
        kwargs.setdefault("local_files_only", True)
    try:
        return loader(path, *args, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        missing = hub.unavailable(path) if remote else None
        if missing is not None:
            raise BackboneLoadError(f"could not load the {what}: {missing}.") from exc
        detail = str(exc).strip().rstrip(".")  # its own final period would double ours
        raise BackboneLoadError(
            f"could not load the {what} from {_describe_path(path)}: {detail}. Check the path, "
            "or, for a hub id, that it is in the local cache when HF_HUB_OFFLINE=1 is set."
        ) from exc


def quiet_transformers_progress() -> None:
    """Turn off transformers' own progress bars ("Loading weights", "Writing model shards"):
    a bar for reading or writing a file that is already here is noise in the output of eval,
    encode and export, whose last line is the result. The hub's download bars (a real wait)
    keep whatever the user set (HF_HUB_DISABLE_PROGRESS_BARS)."""
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as hf_logging

    hub_bars_off = are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # also turns the hub's off ...
    if not hub_bars_off:
        enable_progress_bars()  # ... which were on: give them back


def build_hf_model(
    model_cls: Any, cfg: HFBackboneConfig, *, config: Any | None = None
) -> Any:
    """Load (`init: pretrained`) or create with seeded random weights (`init: random`) a
    transformers model of class `model_cls` from `cfg.path`, in `cfg.dtype`, with the requested
    attention implementation. `config`, when given, replaces the one read from the path (backbones
    pass it to apply memory knobs such as fewer AnyRes pinpoints)."""
    import torch
    from transformers import AutoConfig

    check_path(cfg.path)
    quiet_transformers_progress()
    dtype = torch_dtype(cfg.dtype)
    if config is None:
        config = load_or_fail("model config", cfg.path, AutoConfig.from_pretrained)
    extra: dict[str, Any] = {}
    if cfg.attn_implementation is not None:
        extra["attn_implementation"] = cfg.attn_implementation
    try:
        if cfg.init == "random":
            # fork_rng: seeding must not change the caller's random stream (data order, dropout).
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                model = model_cls._from_config(config, dtype=dtype, **extra)
        else:
            model = load_or_fail(
                "model weights", cfg.path, model_cls.from_pretrained, config=config, dtype=dtype,
                **extra,
            )
    except ImportError as exc:  # e.g. flash_attention_2 requested without flash-attn installed
        raise ConfigError([
            f"attn_implementation: {cfg.attn_implementation!r} cannot be used here: {exc}. "
            "Install the package it needs or use 'sdpa'/'eager'."
        ]) from exc
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model, what=cfg.path)
    return model


def enable_gradient_checkpointing(model: Any, *, what: str) -> None:
    """Turn on activation checkpointing (active in train mode only).

    Non-reentrant checkpointing also works when a segment's inputs need no gradient (frozen
    embeddings under LoRA), which the reentrant variant silently gets wrong.
    """
    kwargs = {"use_reentrant": False}
    try:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    except ValueError as exc:
        raise ConfigError([
            f"gradient_checkpointing: the model at {what} does not support it ({exc}); set "
            "gradient_checkpointing: false."
        ]) from exc


def maybe_load_adapter(model: Any, path: str) -> Any:
    """Wrap `model` with the LoRA adapter saved under ``path/lora_adapter`` if there is one."""
    adapter = Path(path).expanduser() / ADAPTER_DIR
    if not (adapter / "adapter_config.json").is_file():
        return model
    import warnings

    from peft import PeftModel

    with warnings.catch_warnings():
        # peft (0.21) calls a transformers attribute deprecated in 5.x; not the user's concern.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                category=FutureWarning)
        return PeftModel.from_pretrained(model, str(adapter), is_trainable=False)


def unwrap_peft(model: Any) -> Any:
    """The transformers model inside a peft wrapper (or `model` itself). LoRA layers are injected
    into that model in place, so calling its sub-modules runs the adapters."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def save_hf_model(model: Any, path: str | Path) -> None:
    """Save `model` as safetensors + config. A peft-wrapped model is saved as clean base weights
    (no LoRA keys, the names transformers expects) plus its adapter in ``path/lora_adapter``, so
    the directory loads like any checkpoint and the adapter is reapplied on top."""
    quiet_transformers_progress()
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    base = unwrap_peft(model)
    if base is model:
        model.save_pretrained(out, safe_serialization=True)
        return
    model.save_pretrained(out / ADAPTER_DIR, safe_serialization=True)
    clean: dict[str, Any] = {}
    for name, tensor in base.state_dict().items():
        if "lora_" in name:  # lora_A / lora_B / lora_dropout / lora_embedding_*
            continue
        clean[name.replace(".base_layer.", ".")] = tensor
    base.save_pretrained(out, state_dict=clean, safe_serialization=True)


def freeze_modules(
    model: nn.Module, parts: Iterable[str], available: Mapping[str, Sequence[str]], *,
    backbone: str,
) -> None:
    """Stop gradients for the named parts; `available` maps part name -> module-name prefixes."""
    for part in parts:
        if part not in available:
            raise ConfigError([
                f"freeze: unknown part {part!r} for backbone '{backbone}'. Known parts: "
                f"{', '.join(sorted(available))}."
            ])
        prefixes = tuple(available[part])
        hit = False
        for name, param in model.named_parameters():
            if name.startswith(prefixes):
                param.requires_grad_(False)
                hit = True
        if not hit:
            raise ConfigError([
                f"freeze: part {part!r} of backbone '{backbone}' matched no parameters "
                f"(prefixes {list(prefixes)}); this model's architecture is not the expected one."
            ])


def freeze_lm_head(model: Any) -> None:
    """Freeze an unused LM head. Embeddings never use it, and an unused trainable parameter breaks
    DDP (unused parameters) and wastes optimizer state. A tied head shares the input embeddings,
    which stay trainable."""
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    if head is not None and head.weight is not emb.weight:
        head.weight.requires_grad_(False)


def tower_regexes(prefixes: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """Module-name prefixes per tower -> one regex per tower (as `lora_towers` wants)."""
    return {t: "(?:" + "|".join(re.escape(p.rstrip(".")) for p in ps) + ")"
            for t, ps in prefixes.items()}
