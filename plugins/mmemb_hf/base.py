"""`HFBackbone`: the load sequence every Hugging Face backbone shares, written once.

check the path -> read the model config -> `_configure` (check the architecture, adjust the
config, pick the transformers class) -> tokenizer (and image processor) -> `_make_processor` ->
build the model (pretrained or seeded random) -> `_prepare_model` -> freeze the requested parts ->
reapply a saved LoRA adapter -> `_finish`.

A backbone fills in those hooks; its errors, their order and the resulting model are those of the
sequence each backbone used to spell out for itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from mmemb.model import Backbone, InputProcessor
from mmemb_hf.configs import HFBackboneConfig
from mmemb_hf.loading import (
    build_hf_model,
    check_path,
    freeze_modules,
    load_or_fail,
    maybe_load_adapter,
    save_hf_model,
)


class HFBackbone(Backbone):
    """A `Backbone` holding a transformers model (`self.model`, peft-wrapped when an adapter was
    saved with it) and its `InputProcessor` (`self._processor`)."""

    backbone_name: ClassVar[str]
    """The registry name, used in error messages ('freeze: unknown part ... for backbone X')."""

    PARTS: ClassVar[Mapping[str, Sequence[str]]] = {}
    """Freezable part -> module-name prefixes inside the transformers model."""

    uses_image_processor: ClassVar[bool] = True
    """Whether `path` holds an image processor to load (text-only backbones: False)."""

    def __init__(self, cfg: HFBackboneConfig) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        self.cfg = cfg
        check_path(cfg.path)
        hf_config = load_or_fail("model config", cfg.path, AutoConfig.from_pretrained)
        model_cls = self._configure(hf_config)
        tokenizer = load_or_fail("tokenizer", cfg.path, AutoTokenizer.from_pretrained,
                                 **self._tokenizer_kwargs())
        image_processor = (
            load_or_fail("image processor", cfg.path, AutoImageProcessor.from_pretrained)
            if self.uses_image_processor else None
        )
        self._processor = self._make_processor(hf_config, tokenizer, image_processor)
        model = build_hf_model(model_cls, cfg, config=hf_config)
        self._prepare_model(model)
        freeze = getattr(cfg, "freeze", ())  # each backbone's config declares its parts
        freeze_modules(model, freeze, self._freeze_parts(model), backbone=self.backbone_name)
        self.model: Any = maybe_load_adapter(model, cfg.path)
        self._finish(hf_config, model)

    # -- hooks, in the order they run ----------------------------------------------------------

    def _configure(self, hf_config: Any) -> Any:
        """Check that `hf_config` is an architecture this backbone reads (a `ConfigError` naming
        the path otherwise), adjust it if needed, and return the transformers model class."""
        raise NotImplementedError

    def _tokenizer_kwargs(self) -> dict[str, Any]:
        """Extra arguments of `AutoTokenizer.from_pretrained`."""
        return {}

    def _make_processor(self, hf_config: Any, tokenizer: Any,
                        image_processor: Any) -> InputProcessor:
        """The processor (checks between tokenizer, image processor and config belong here);
        `image_processor` is None when `uses_image_processor` is False."""
        raise NotImplementedError

    def _prepare_model(self, model: Any) -> None:
        """Changes to the freshly built model before freezing (e.g. freeze an unused LM head)."""

    def _freeze_parts(self, model: Any) -> Mapping[str, Sequence[str]]:
        """Part name -> module-name prefixes that `freeze` may name."""
        return self.PARTS

    def _finish(self, hf_config: Any, model: Any) -> None:
        """Attributes read from the config or the (unwrapped) model once everything is loaded."""

    # -- shared behaviour ----------------------------------------------------------------------

    def save_pretrained(self, path: str | Path) -> None:
        save_hf_model(self.model, path)
        self._processor.save_pretrained(path)
