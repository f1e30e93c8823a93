"""LoRA settings from a recipe (`model.lora`), and applying them to a backbone with peft."""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from mmemb.errors import ConfigError

if TYPE_CHECKING:  # torch is imported only when LoRA is applied: recipes import LoraSpec cheaply
    from torch import nn


Tower = Literal["language", "vision", "projector"]


class LoraSpec(BaseModel):
    """`model.lora` in a recipe. `target_modules` is a list of module-name suffixes or one regex
    matched against full module names; `towers` says which parts of a multimodal backbone get
    adapters (the vision tower's q/k/v are not caught by accident)."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    towers: list[Tower] = Field(default_factory=lambda: list[Tower](["language"]))


# --- applying LoRA to a backbone ---------------------------------------------------------------
#
# A backbone that supports LoRA exposes two attributes (see docs/backbones.md):
#   model        -- the torch module peft wraps (a transformers PreTrainedModel); after
#                   `apply_lora` it is a `peft.PeftModel` whose LoRA layers sit inside the original
#                   modules, so a backbone that calls sub-modules of the unwrapped model still runs
#                   the adapters (`peft_model.get_base_model()` returns that model);
#   lora_towers  -- {"language" | "vision" | "projector": regex} where each regex matches the
#                   module-name prefix of that tower inside `model` (e.g. r"model\.language_model").
# Adapters are placed with one regex over full module names, so a tower that is not selected is
# never caught by a suffix such as "q_proj" that both towers use.


@runtime_checkable
class SupportsLora(Protocol):
    """What `apply_lora` needs from a backbone."""

    model: nn.Module
    lora_towers: Mapping[str, str]


def lora_target_regex(spec: LoraSpec, towers: Mapping[str, str]) -> str:
    """The regex (matched with `re.fullmatch` against full module names, as peft does) selecting
    the modules of `spec.towers` named by `spec.target_modules`."""
    missing = [t for t in spec.towers if t not in towers]
    if missing:
        raise ConfigError([
            f"model.lora.towers: {missing} not available for this backbone; it has "
            f"{sorted(towers)}."
        ])
    tower_re = "(?:" + "|".join(f"(?:{towers[t]})" for t in spec.towers) + ")"
    if isinstance(spec.target_modules, str):
        try:
            re.compile(spec.target_modules)
        except re.error as exc:
            raise ConfigError([
                f"model.lora.target_modules: {spec.target_modules!r} is not a valid regex: {exc}."
            ]) from exc
        # The lookahead restricts the user's regex to the selected towers without changing it.
        return rf"(?={tower_re}\.)(?:{spec.target_modules})"
    if not spec.target_modules:
        raise ConfigError(["model.lora.target_modules: empty; name at least one module."])
    names = "|".join(re.escape(n) for n in spec.target_modules)
    return rf"{tower_re}\.(?:.*\.)?(?:{names})"


def has_lora(backbone: nn.Module) -> bool:
    """Whether `backbone.model` is wrapped by peft."""
    from peft import PeftModel

    return isinstance(getattr(backbone, "model", None), PeftModel)


def apply_lora(backbone: nn.Module, spec: LoraSpec) -> None:
    """Wrap ``backbone.model`` with a peft LoRA adapter, in place; only adapter weights stay
    trainable. Works with gradient checkpointing (backbones enable the non-reentrant variant)."""
    from peft import LoraConfig, get_peft_model
    from torch import nn

    if not isinstance(backbone, SupportsLora):
        raise ConfigError([
            f"model.lora: backbone {type(backbone).__name__} does not support LoRA (it needs "
            "`model` and `lora_towers` attributes; see docs/backbones.md)."
        ])
    if has_lora(backbone):
        raise ConfigError([
            "model.lora: this backbone already carries a LoRA adapter (loaded from its "
            "directory's lora_adapter/). Merge it first (`mmemb export`), or drop model.lora to "
            "use it as is."
        ])
    pattern = lora_target_regex(spec, backbone.lora_towers)
    supported = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d)
    hits = [n for n, m in backbone.model.named_modules()
            if re.fullmatch(pattern, n) and isinstance(m, supported)]
    if not hits:
        tower_re = re.compile("|".join(f"(?:{backbone.lora_towers[t]})" for t in spec.towers))
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in backbone.model.named_modules()
                         if isinstance(m, nn.Linear) and tower_re.match(n)})
        raise ConfigError([
            f"model.lora.target_modules: {spec.target_modules!r} matches no linear layer in "
            f"towers {spec.towers}. Linear layer names there: {', '.join(linear) or '(none)'}."
        ])
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,  # type: ignore[arg-type]  # peft annotates int; any number works
        lora_dropout=spec.dropout,
        target_modules=pattern,
        bias="none",
    )
    with warnings.catch_warnings():
        # peft (0.21) calls a transformers attribute deprecated in 5.x; not the user's concern.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                category=FutureWarning)
        backbone.model = get_peft_model(backbone.model, config)


def merge_lora(backbone: nn.Module) -> None:
    """Fold the LoRA weights into the base weights and drop peft (for export); a backbone without
    an adapter is left as it is."""
    if has_lora(backbone):
        peft_model: Any = backbone.model
        backbone.model = peft_model.merge_and_unload()
