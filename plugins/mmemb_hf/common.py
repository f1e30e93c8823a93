"""The names `mmemb_hf.common` used to hold, kept importable for code written against it.

New code imports from the module that owns each name: `mmemb_hf.configs` (shared config fields),
`mmemb_hf.loading` (load, save, freeze), `mmemb_hf.prompts` (items -> token rows),
`mmemb_hf.vision` (images and image features), `mmemb_hf.uniform` (the uniform forward) and
`mmemb_hf.base` (`HFBackbone`, the shared load sequence).
"""

from __future__ import annotations

from mmemb_hf.configs import (
    QWEN_CHAT_TEMPLATE,
    HFBackboneConfig,
    InstructionConfig,
    PromptConfig,
    TextPromptConfig,
)
from mmemb_hf.loading import (
    ADAPTER_DIR,
    DTYPES,
    BackboneLoadError,
    build_hf_model,
    check_path,
    enable_gradient_checkpointing,
    freeze_lm_head,
    freeze_modules,
    load_or_fail,
    maybe_load_adapter,
    quiet_transformers_progress,
    save_hf_model,
    torch_dtype,
    tower_regexes,
    unwrap_peft,
)
from mmemb_hf.prompts import (
    TOKEN_KEYS,
    expand_image_tokens,
    item_instruction,
    left_padded_positions,
    pad_rows,
    render_content,
    split_trimmed,
    truncate_text,
)
from mmemb_hf.uniform import needs_placeholder, placeholder_rng, zero_from
from mmemb_hf.vision import (
    decode_image,
    image_features,
    limit_image_side,
    pooled_features,
    scatter_image_features,
)

__all__ = [
    "ADAPTER_DIR",
    "DTYPES",
    "QWEN_CHAT_TEMPLATE",
    "TOKEN_KEYS",
    "BackboneLoadError",
    "HFBackboneConfig",
    "InstructionConfig",
    "PromptConfig",
    "TextPromptConfig",
    "build_hf_model",
    "check_path",
    "decode_image",
    "enable_gradient_checkpointing",
    "expand_image_tokens",
    "freeze_lm_head",
    "freeze_modules",
    "image_features",
    "item_instruction",
    "left_padded_positions",
    "limit_image_side",
    "load_or_fail",
    "maybe_load_adapter",
    "needs_placeholder",
    "pad_rows",
    "placeholder_rng",
    "pooled_features",
    "quiet_transformers_progress",
    "render_content",
    "save_hf_model",
    "scatter_image_features",
    "split_trimmed",
    "tower_regexes",
    "torch_dtype",
    "truncate_text",
    "unwrap_peft",
    "zero_from",
]
