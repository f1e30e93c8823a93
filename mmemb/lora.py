"""LoRA settings from a recipe (`model.lora`), applied to a backbone with peft."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


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
    towers: list[Literal["language", "vision", "projector"]] = Field(
        default_factory=lambda: ["language"]
    )
