"""Build an `Encoder` from component specs, and save/load one as a self-describing directory.

A saved encoder is the backbone's own files (weights as safetensors, config, processor) plus
``mmemb.json``, which names the backbone and pooler plugins and their arguments, so any mmemb
command (`eval`, `encode`, `mine`) reloads it with ``load_encoder(path)``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmemb import __version__, plugins
from mmemb.errors import ConfigError, MmembError
from mmemb.model import Encoder

ENCODER_FILE = "mmemb.json"


def build_encoder(
    backbone: Mapping[str, Any],
    pooler: Mapping[str, Any],
    *,
    normalize: bool = True,
    where: str = "model",
    saved: bool = False,
) -> Encoder:
    """Build backbone and pooler from ``{name: ..., <args>}`` specs (as in a recipe's `model`).

    A pooler that cannot read the backbone is a `ConfigError` -- unless `saved` (reloading a
    trained encoder): that loads as it was trained, with a warning."""
    bb = plugins.build_from("backbone", dict(backbone), where=f"{where}.backbone")
    pool = plugins.build_from("pooler", dict(pooler), where=f"{where}.pooler")
    if saved:
        try:
            pool.check_backbone(bb)
        except ConfigError as exc:
            warnings.warn(f"{where}: {exc} (loaded as saved)", stacklevel=2)
    return Encoder(bb, pool, normalize=normalize, check=not saved)


def save_encoder(
    encoder: Encoder,
    path: str | Path,
    *,
    backbone: Mapping[str, Any],
    pooler: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write the backbone's files and ``mmemb.json`` into `path`; returns the path.

    `backbone`/`pooler` are the specs the encoder was built from; the backbone's `path` is replaced
    by the saved directory and `init` by ``pretrained`` so the copy loads its own weights.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    encoder.backbone.save_pretrained(out)
    bb_spec = {k: v for k, v in backbone.items() if k not in ("path", "init")}
    desc = {
        "mmemb_version": __version__,
        "backbone": bb_spec,
        "pooler": dict(pooler),
        "normalize": encoder.normalize,
        **(dict(extra) if extra else {}),
    }
    (out / ENCODER_FILE).write_text(json.dumps(desc, indent=2) + "\n")
    return out


def read_encoder_spec(path: str | Path) -> dict[str, Any]:
    """The contents of a saved encoder's ``mmemb.json``."""
    f = Path(path) / ENCODER_FILE
    if not f.is_file():
        raise MmembError(
            f"{path} is not a saved mmemb encoder: {ENCODER_FILE} is missing. Pass a directory "
            "written by `mmemb train` (its output_dir/model) or `mmemb export`."
        )
    return dict(json.loads(f.read_text()))


def load_encoder(path: str | Path, **backbone_overrides: Any) -> Encoder:
    """Rebuild a saved encoder from its directory (weights included)."""
    spec = read_encoder_spec(path)
    backbone = {**spec["backbone"], "path": str(Path(path)), **backbone_overrides}
    return build_encoder(
        backbone,
        spec["pooler"],
        normalize=spec.get("normalize", True),
        where=str(Path(path) / ENCODER_FILE),
        saved=True,
    )
