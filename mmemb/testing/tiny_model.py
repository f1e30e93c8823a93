"""The ``tiny_model`` component kind: tiny random-initialised model directories, by architecture.

Tests, the quickstart and ``mmemb validate`` on a laptop need real architectures loaded through
``from_pretrained``, small enough to train on two CPU cores and built without the network. The
kernel knows no architecture, so the writers are plugin components registered through
``mmemb_register_tiny_models`` (the default ones come from the ``mmemb_hf`` plugin) and this module
reaches them through the registry only. Every writer takes the same arguments, `TinyModelConfig`,
so ``python -m mmemb.testing.tiny KIND OUT_DIR`` works for any KIND a plugin registers.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from mmemb import plugins
from mmemb.errors import PluginError

__all__ = ["KIND", "TinyModelConfig", "make_tiny_model", "tiny_model_kinds"]

KIND = "tiny_model"
"""The registry kind of tiny model writers (hook ``mmemb_register_tiny_models``)."""


class TinyModelConfig(BaseModel):
    """The arguments every tiny model writer takes (its ``config=`` when registered)."""

    model_config = ConfigDict(extra="forbid")

    out_dir: Path = Field(description="the model directory to write (created if missing)")
    weights: bool = Field(
        True,
        description="write random weights (model.safetensors); False writes only the config, "
        "tokenizer and image processor, for a backbone built with `init: random`",
    )
    seed: int = Field(0, description="seeds the random weights")


def tiny_model_kinds() -> list[str]:
    """The tiny model kinds the installed plugins register, sorted."""
    return plugins.available(KIND)


def make_tiny_model(
    kind: str, out_dir: str | Path, *, weights: bool = True, seed: int = 0
) -> Path:
    """Write the tiny model `kind` (a registered ``tiny_model``) to `out_dir`; return the directory.

    An unknown `kind` raises `UnknownComponentError` naming the registered kinds.
    """
    out = plugins.build(KIND, kind, out_dir=Path(out_dir), weights=weights, seed=seed)
    if not isinstance(out, Path):
        provider = plugins.get(KIND, kind).provider
        raise PluginError(
            f"tiny_model '{kind}' from {provider} returned {out!r}, not the directory it wrote "
            f"(a pathlib.Path). Report it to {provider}'s authors."
        )
    return out
