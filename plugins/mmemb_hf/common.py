"""Shared machinery of the Hugging Face backbones: config fields, loading, dtype, freezing,
saving (with a LoRA adapter beside the base weights), image decoding and prompt rendering.

Importing this module is cheap (pydantic only); torch and transformers are imported where used so
that ``mmemb plugins list`` never loads a model library.
"""

from __future__ import annotations

import inspect
import io
import re
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mmemb.errors import ConfigError, DataError, MmembError

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from torch import nn

    from mmemb.data.schema import Item

ADAPTER_DIR = "lora_adapter"
"""Sub-directory of a saved backbone holding its peft LoRA adapter (base weights stay unmerged)."""

DTYPES: dict[str, str] = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}

QWEN_CHAT_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
)
"""The Qwen2 chat markup (LLaVA-OneVision's `qwen_1_5` conversation and Qwen2-VL's template with
its default system prompt); ``{content}`` is replaced by the item's rendered content."""


class BackboneLoadError(MmembError):
    """A backbone's model, tokenizer or image processor could not be loaded from `path`."""


class HFBackboneConfig(BaseModel):
    """Fields every Hugging Face backbone accepts (each backbone adds its own)."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="hub id or local directory with config, weights and processor")
    init: Literal["pretrained", "random"] = Field(
        "pretrained",
        description="'random' builds the architecture from path's config with random weights "
        "(seeded by `seed`); tokenizer and processor files still come from `path`",
    )
    seed: int = 0
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: str | None = Field(
        None, description="passed to transformers: 'sdpa', 'eager', 'flash_attention_2', ..."
    )
    gradient_checkpointing: bool = False
    # `freeze: list[<part names>]` is declared by each backbone's config: the parts differ.


class InstructionConfig(BaseModel):
    """Which instruction an item is embedded with (see `item_instruction`)."""

    model_config = ConfigDict(extra="forbid")

    query_instruction: str | None = Field(
        None, description="query items without their own instruction get this one"
    )
    target_instruction: str | None = Field(
        None, description="target items without their own instruction get this one"
    )
    instruction_separator: str = Field(" ", description="between the instruction and the text")


class TextPromptConfig(InstructionConfig):
    """How an item's content is wrapped into the prompt a language model reads."""

    chat_template: str = QWEN_CHAT_TEMPLATE
    append_eos: bool = Field(
        False, description="append the tokenizer's EOS token (pair with the `eos` pooler)"
    )
    max_text_tokens: int | None = Field(
        None, gt=0, description="truncate each item's text to this many tokens (images are kept)"
    )

    @field_validator("chat_template")
    @classmethod
    def _has_content(cls, v: str) -> str:
        if v.count("{content}") != 1:
            raise ValueError(
                "chat_template must contain '{content}' exactly once (use '{content}' for no "
                "chat markup)"
            )
        return v


class PromptConfig(TextPromptConfig):
    """How an `Item` becomes the text a generative multimodal backbone reads (docs/backbones.md).

    content = [image_placeholder] + [instruction + instruction_separator] + [text]
    prompt  = chat_template with ``{content}`` replaced by content [+ eos token if append_eos]

    Query side: the item's own instruction, else `query_instruction`. Target side: the item's own
    instruction, else `target_instruction`, else (image-only targets) `target_image_instruction`.
    """

    target_image_instruction: str | None = Field(
        "Represent the given image.",
        description="image-only target items without an instruction get this one (VLM2Vec)",
    )


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


def tower_regexes(prefixes: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """Module-name prefixes per tower -> one regex per tower (as `lora_towers` wants)."""
    return {t: "(?:" + "|".join(re.escape(p.rstrip(".")) for p in ps) + ")"
            for t, ps in prefixes.items()}


def decode_image(data: bytes, *, index: int, side: str) -> Image.Image:
    """Decode image bytes into an RGB PIL image, or raise a `DataError` naming the item."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        head = data[:8].hex()
        raise DataError(
            f"{side} item {index} of this batch: its image ({len(data)} bytes, starting "
            f"0x{head}) cannot be decoded: {exc}. Store images as JPEG or PNG bytes; re-run "
            "`mmemb prepare` with --on-error skip to drop such rows with a reject count."
        ) from exc
    if rgb.width < 1 or rgb.height < 1:
        raise DataError(f"{side} item {index} of this batch: its image is empty ({rgb.size}).")
    return rgb


def limit_image_side(img: Image.Image, max_side: int | None) -> Image.Image:
    """Downscale (keeping the aspect ratio) so the longer side is at most `max_side` pixels."""
    if max_side is None or max(img.size) <= max_side:
        return img
    scale = max_side / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    from PIL import Image

    return img.resize(size, Image.Resampling.BICUBIC)


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


def left_padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token, whatever the padding side, so
    a padded item is computed exactly like the same item alone."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)


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


def freeze_lm_head(model: Any) -> None:
    """Freeze an unused LM head. Embeddings never use it, and an unused trainable parameter breaks
    DDP (unused parameters) and wastes optimizer state. A tied head shares the input embeddings,
    which stay trainable."""
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    if head is not None and head.weight is not emb.weight:
        head.weight.requires_grad_(False)


def image_features(get_image_features: Any, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
    """Call an HF model's `get_image_features` and return its per-image features. Asks for an
    output object (`return_dict=True`) where the method takes keyword arguments: under a config
    with ``return_dict=False`` transformers 5 would otherwise return a plain tuple."""
    params = inspect.signature(get_image_features).parameters.values()
    if any(p.kind is p.VAR_KEYWORD or p.name == "return_dict" for p in params):
        kwargs["return_dict"] = True
    return pooled_features(get_image_features(*args, **kwargs))


def pooled_features(out: Any) -> list[torch.Tensor]:
    """The per-image features of a `get_image_features` call: transformers 5 returns an output
    object whose ``pooler_output`` holds them, 4.x the tensors (or a tuple of them) directly."""
    import torch

    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    return [feats] if isinstance(feats, torch.Tensor) else list(feats)


def scatter_image_features(
    embeds: torch.Tensor, token_mask: torch.Tensor, features: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Token embeddings (N, L, H) with the image-token positions (`token_mask`, N x L) replaced,
    in row-major order, by the image features (what the HF models do inside their forward)."""
    import torch

    flat = torch.cat(list(features), dim=0)
    n_tokens = int(token_mask.sum())
    if n_tokens != flat.shape[0]:
        raise MmembError(
            f"the batch holds {n_tokens} image tokens but the vision tower produced "
            f"{flat.shape[0]} features; the processor and the model's config disagree (image "
            "grid pinpoints, patch or merge size). Rebuild the model directory's processor files "
            "from its config."
        )
    mask = token_mask.unsqueeze(-1).expand_as(embeds)
    return embeds.masked_scatter(mask, flat.to(embeds.device, embeds.dtype))


def zero_from(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Exactly 0, as a scalar that depends on `tensors`: adding it to an output puts the modules
    that produced them in the autograd graph (their gradients are zeros) without changing the
    output. Used by backbones under `require_uniform_forward`."""
    import torch

    # nan_to_num: 0 * inf is NaN, and an fp16 tower may overflow on a blank input.
    total = sum((t.float().sum() * 0.0 for t in tensors), torch.zeros((), device=tensors[0].device))
    return torch.nan_to_num(total, nan=0.0, posinf=0.0, neginf=0.0)


def needs_placeholder(uniform: bool, *parts: Any) -> bool:
    """Whether a forward must run a tower the batch has no input for: always under a uniform
    forward (ZeRO-3), and while training when the tower has trainable weights -- otherwise a
    chunk's embeddings may depend on no trainable weight at all (CLIP with LoRA on the text tower
    and an image-only GradCache chunk), its backward fails, and data-parallel ranks would
    exchange gradients for different parameter sets. `parts` are the tower's modules and
    parameters (None entries are skipped)."""
    import torch

    if uniform:
        return True
    if not torch.is_grad_enabled():
        return False
    for part in parts:
        if part is None:
            continue
        params = [part] if isinstance(part, torch.nn.Parameter) else part.parameters()
        if any(p.requires_grad for p in params):
            return True
    return False


def placeholder_rng(device: torch.device) -> AbstractContextManager[object]:
    """Run a placeholder forward without drawing from the global random streams: it runs only
    while gradients are on, so GradCache's no-grad first pass skips it, and its dropout draws
    would otherwise shift the replayed chunk's masks away from the first pass's. (Its output is
    multiplied by zero, so its own masks do not matter.)"""
    import torch

    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")
"""The (N, L) token-aligned tensors of the text-prompt processors."""


def split_trimmed(inputs: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    """`InputProcessor.split` for processors whose rows compute the same hidden states however
    much padding they carry (position ids from the attention mask): each chunk drops the columns
    that are padding in all of its rows."""
    from mmemb.model import split_rows, trim_padding

    return [trim_padding(chunk, TOKEN_KEYS) for chunk in split_rows(inputs, size)]
