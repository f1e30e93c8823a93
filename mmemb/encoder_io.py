"""Build an `Encoder` from component specs, save/load one, and resolve what `--model` names.

A saved encoder is the backbone's own files (weights as safetensors, config, processor) plus
``mmemb.json``, which names the backbone and pooler plugins and their arguments, so any mmemb
command (`eval`, `encode`, `mine`, `export`) reloads it with ``load_encoder(path)``.

`load_encoder` (and every ``--model``) also accepts, through `resolve_model`:

- a training output directory holding the encoder in ``model/``;
- a **sentence-transformers** directory (or hub id): ``modules.json`` with a Transformer, a
  Pooling and optionally a Normalize module, mapped onto the text backbone `hf_text` with the
  Transformer's ``max_seq_length``, the Pooling module's mode and the normalisation;
- a plain **Hugging Face** model directory or hub id, with ``--backbone NAME --pooler NAME`` (a
  `ModelSource` carrying them and any ``--model-arg key=value`` settings).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mmemb import __version__, plugins
from mmemb.errors import ConfigError, MmembError
from mmemb.model import Encoder

ENCODER_FILE = "mmemb.json"
ST_MODULES_FILE = "modules.json"

ST_BACKBONE = "hf_text"
"""The backbone a sentence-transformers Transformer module maps onto (by registry name: the
kernel names it, never imports it)."""

ST_POOLERS: dict[str, str] = {"mean": "mean", "cls": "cls", "lasttoken": "last_token",
                              "max": "max"}
"""sentence-transformers pooling mode -> mmemb pooler name."""

_ST_LEGACY_POOLING = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}

ModelKind = Literal["mmemb", "sentence-transformers", "hf"]


class ModelSourceError(MmembError):
    """`--model` (with --backbone/--pooler/--model-arg) does not name a usable model."""


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
            "written by `mmemb train` (its output_dir/model) or `mmemb export`, a "
            "sentence-transformers directory, or a Hugging Face model with --backbone/--pooler."
        )
    return dict(json.loads(f.read_text()))


# --- what --model names -----------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """What ``--model PATH [--backbone NAME --pooler NAME] [--model-arg KEY=VALUE ...]`` names.

    `args` keys: ``pooler.KEY`` (a pooler argument), ``normalize`` (L2-normalise the embeddings),
    ``backbone.KEY`` or a bare ``KEY`` (a backbone argument, e.g. ``max_length``, ``dtype``)."""

    path: str
    backbone: str | None = None
    pooler: str | None = None
    args: Mapping[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        parts = [f"backbone {self.backbone}" if self.backbone else "",
                 f"pooler {self.pooler}" if self.pooler else "",
                 ", ".join(f"{k}={v}" for k, v in self.args.items())]
        named = "; ".join(p for p in parts if p)
        return f"{self.path} ({named})" if named else self.path

    def split_args(self) -> tuple[dict[str, Any], dict[str, Any], bool | None]:
        """(backbone arguments, pooler arguments, normalize or None)."""
        bb: dict[str, Any] = {}
        pool: dict[str, Any] = {}
        normalize: bool | None = None
        for key, value in self.args.items():
            head, _, rest = key.partition(".")
            if key == "normalize":
                if not isinstance(value, bool):
                    raise ModelSourceError(
                        f"--model-arg normalize={value!r}: expected true or false."
                    )
                normalize = value
            elif head == "pooler" and rest:
                pool[rest] = value
            elif head == "backbone" and rest:
                bb[rest] = value
            elif head in ("name", "path") or key in ("backbone", "pooler"):
                raise ModelSourceError(
                    f"--model-arg {key}=...: use --model for the path and --backbone/--pooler "
                    "for the component names."
                )
            else:
                bb[key] = value
        return bb, pool, normalize


@dataclass(frozen=True)
class ResolvedModel:
    """An encoder's full description, ready for `build_encoder`."""

    kind: ModelKind
    location: str
    """The directory (or hub id) the model was found at."""
    backbone: dict[str, Any]
    pooler: dict[str, Any]
    normalize: bool
    extra: dict[str, Any] = field(default_factory=dict)
    """The rest of a saved encoder's ``mmemb.json`` (its prompt description, provenance)."""

    def spec(self) -> dict[str, Any]:
        """``mmemb.json``-shaped: backbone (without path/init), pooler, normalize, extras."""
        bb = {k: v for k, v in self.backbone.items() if k not in ("path", "init")}
        return {**self.extra, "backbone": bb, "pooler": dict(self.pooler),
                "normalize": self.normalize}


def _looks_local(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or path.count("/") > 1 or Path(path).exists()


def _hub_file(repo: str, filename: str) -> Path | None:
    """`filename` of hub repository `repo` (from the local cache when offline), or None."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover - transformers depends on it
        return None
    try:
        return Path(hf_hub_download(repo, filename))
    except Exception:  # missing file, unknown repo, offline without a cache: not this kind
        return None


def _model_files(location: str) -> tuple[Any, str]:
    """A function ``name -> Path | None`` finding a file of the model at `location` (a local
    directory or a hub id), and a description for messages."""
    p = Path(location).expanduser()
    if p.is_dir():
        return (lambda name: (p / name) if (p / name).is_file() else None), f"directory {p}"
    return (lambda name: _hub_file(location, name)), f"hub model '{location}'"


def resolve_model(source: str | Path | ModelSource) -> ResolvedModel:
    """Work out what `source` is (see the module docstring) and how to build its encoder."""
    src = source if isinstance(source, ModelSource) else ModelSource(str(source))
    bb_args, pool_args, normalize = src.split_args()
    location = src.path
    p = Path(location).expanduser()
    if p.exists() and not p.is_dir():
        raise ModelSourceError(f"--model {location}: is a file; pass a model directory.")
    if _looks_local(location) and not p.exists():
        raise ModelSourceError(
            f"--model {location}: no such directory. Pass a directory written by `mmemb train` or "
            "`mmemb export`, a sentence-transformers directory, or a Hugging Face model "
            "directory/hub id with --backbone NAME --pooler NAME."
        )
    if p.is_dir() and not (p / ENCODER_FILE).is_file() and (p / "model" / ENCODER_FILE).is_file():
        p, location = p / "model", str(p / "model")  # a training output directory
    find, described = _model_files(location)
    saved = find(ENCODER_FILE)
    st_modules = None if saved else find(ST_MODULES_FILE)

    if src.backbone or src.pooler:
        if saved or st_modules:
            what = "a saved mmemb encoder" if saved else "a sentence-transformers model"
            raise ModelSourceError(
                f"--model {location} is {what}, which names its own backbone and pooler: drop "
                "--backbone/--pooler (change a setting with --model-arg KEY=VALUE)."
            )
        if not (src.backbone and src.pooler):
            missing = "--pooler" if src.backbone else "--backbone"
            raise ModelSourceError(
                f"--model {location}: {missing} is missing. A plain Hugging Face model needs "
                "both, e.g. --backbone hf_text --pooler mean (BERT-style encoders) or "
                "--backbone llava_onevision --pooler last_token."
            )
        backbone = {**bb_args, "name": src.backbone, "path": location}
        pooler = {**pool_args, "name": src.pooler}
        return ResolvedModel("hf", location, backbone, pooler,
                             True if normalize is None else normalize)

    if saved:
        spec = dict(json.loads(saved.read_text()))
        backbone = {**spec["backbone"], "path": location, **bb_args}
        pooler = {**spec["pooler"], **pool_args}
        extra = {k: v for k, v in spec.items() if k not in ("backbone", "pooler", "normalize")}
        norm = bool(spec.get("normalize", True)) if normalize is None else normalize
        return ResolvedModel("mmemb", location, backbone, pooler, norm, extra)
    if st_modules:
        backbone, pooler, norm = read_sentence_transformers(location, find)
        backbone.update(bb_args)
        pooler.update(pool_args)
        return ResolvedModel("sentence-transformers", location, backbone, pooler,
                             norm if normalize is None else normalize)
    hint = ("it has a config.json, so it is a Hugging Face model: "
            if find("config.json") else "")
    raise ModelSourceError(
        f"--model {location}: {described} is neither a saved mmemb encoder ({ENCODER_FILE}) nor "
        f"a sentence-transformers model ({ST_MODULES_FILE}); {hint}pass --backbone NAME "
        "--pooler NAME to read it as a plain Hugging Face model (e.g. --backbone hf_text "
        "--pooler mean), or point --model at a directory written by `mmemb train`/`mmemb export`."
    )


def _read_json(path: Path, where: str) -> Any:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelSourceError(f"{where}: {path} cannot be read as JSON ({exc}).") from exc
    if not isinstance(data, (dict, list)):
        raise ModelSourceError(f"{where}: {path} holds {type(data).__name__}, not JSON object.")
    return data


def _st_pooling_mode(cfg: Mapping[str, Any], where: str) -> str:
    """The one pooling mode of a Pooling module's config (new `pooling_mode` or legacy flags)."""
    mode: Any = cfg.get("pooling_mode")
    if mode is None:
        mode = [m for key, m in _ST_LEGACY_POOLING.items() if cfg.get(key)]
    modes = [mode] if isinstance(mode, str) else list(mode)
    if len(modes) != 1 or modes[0] not in ST_POOLERS:
        raise ModelSourceError(
            f"{where}: pooling mode {modes or 'none'} has no mmemb pooler; mmemb maps exactly one "
            f"of {', '.join(ST_POOLERS)} (to {', '.join(ST_POOLERS.values())})."
        )
    return ST_POOLERS[modes[0]]


def read_sentence_transformers(
    location: str, find: Any | None = None
) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """(backbone spec, pooler spec, normalize) for the sentence-transformers model at `location`
    (a directory, or a hub id whose files `find(name)` fetches). Only Transformer -> Pooling ->
    [Normalize] pipelines map onto mmemb; anything else is refused, naming the module."""
    if find is None:
        find, _ = _model_files(location)
    modules_path = find(ST_MODULES_FILE)
    if modules_path is None:
        raise ModelSourceError(f"{location}: no {ST_MODULES_FILE}; not a sentence-transformers "
                               "model.")
    where = f"{location}/{ST_MODULES_FILE}"
    modules = _read_json(modules_path, where)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ModelSourceError(f"{where}: expected a list of modules.")
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    expected = ["Transformer", "Pooling"]
    if kinds[:2] != expected or kinds[2:] not in ([], ["Normalize"]):
        raise ModelSourceError(
            f"{where}: modules {kinds}; mmemb reads sentence-transformers models made of "
            "Transformer, Pooling and optionally Normalize, in that order (a Dense, Router or "
            "multimodal module has no mmemb equivalent). Load it with sentence-transformers."
        )

    def sub(module: Mapping[str, Any], name: str) -> str:
        rel = str(module.get("path", "")).strip("/")
        return f"{rel}/{name}" if rel else name

    tf_rel = str(modules[0].get("path", "")).strip("/")
    if tf_rel and not Path(location).is_dir():
        raise ModelSourceError(
            f"{where}: the Transformer module lives in sub-folder '{tf_rel}' of hub model "
            f"'{location}'; download the model and pass its local directory."
        )
    tf_location = str(Path(location) / tf_rel) if tf_rel else location
    backbone: dict[str, Any] = {"name": ST_BACKBONE, "path": tf_location,
                                "chat_template": "{content}"}
    sbert_path = find(sub(modules[0], "sentence_bert_config.json"))
    sbert = _read_json(sbert_path, where) if sbert_path else {}
    if sbert.get("do_lower_case"):
        raise ModelSourceError(
            f"{location}: sentence_bert_config.json sets do_lower_case, which mmemb's hf_text "
            "does not do; lower-case the texts yourself or use a tokenizer that does."
        )
    task = sbert.get("transformer_task", "feature-extraction")
    if task != "feature-extraction":
        raise ModelSourceError(
            f"{location}: the Transformer module's task is {task!r}; mmemb maps only "
            "'feature-extraction' (text encoders) onto hf_text."
        )
    max_len = sbert.get("max_seq_length")
    if max_len is None:
        # sentence-transformers >= 6 keeps it in the tokenizer, capped at the model's positions.
        tok_path = find(sub(modules[0], "tokenizer_config.json"))
        cfg_path = find(sub(modules[0], "config.json"))
        tok_max = _read_json(tok_path, where).get("model_max_length") if tok_path else None
        pos = _read_json(cfg_path, where).get("max_position_embeddings") if cfg_path else None
        known = [int(v) for v in (tok_max, pos) if isinstance(v, (int, float)) and 0 < v < 1e9]
        max_len = min(known) if known else None
    if max_len is not None:
        backbone["max_length"] = int(max_len)

    pool_path = find(sub(modules[1], "config.json"))
    if pool_path is None:
        raise ModelSourceError(f"{location}: the Pooling module's config.json is missing.")
    pool_cfg = _read_json(pool_path, f"{location}/{sub(modules[1], 'config.json')}")
    pooler = {"name": _st_pooling_mode(pool_cfg, f"{location}: Pooling module")}

    st_cfg_path = find("config_sentence_transformers.json")
    st_cfg = _read_json(st_cfg_path, location) if st_cfg_path else {}
    prompts = {k: v for k, v in dict(st_cfg.get("prompts") or {}).items() if v}
    default = st_cfg.get("default_prompt_name")
    query = prompts.get("query") or (prompts.get(default) if default else None)
    target = (prompts.get("document") or prompts.get("passage")
              or (prompts.get(default) if default else None))
    if query or target:
        if pool_cfg.get("include_prompt") is False:
            raise ModelSourceError(
                f"{location}: the Pooling module excludes prompt tokens (include_prompt: false), "
                "which mmemb's poolers cannot; the model's prompts would change its embeddings."
            )
        # sentence-transformers prepends the prompt to the text as is.
        backbone.update(query_instruction=query, target_instruction=target,
                        instruction_separator="")
    return backbone, pooler, len(modules) == 3


def load_encoder(source: str | Path | ModelSource, **backbone_overrides: Any) -> Encoder:
    """The encoder `source` names (weights included): a saved mmemb encoder, a training output
    directory, a sentence-transformers model, or a Hugging Face model with --backbone/--pooler
    (see `resolve_model`). `backbone_overrides` change backbone settings (e.g. ``dtype``)."""
    r = resolve_model(source)
    where = (str(Path(r.location) / ENCODER_FILE) if r.kind == "mmemb"
             else f"--model {r.location}")
    return build_encoder(
        {**r.backbone, **backbone_overrides},
        r.pooler,
        normalize=r.normalize,
        where=where,
        saved=r.kind != "hf",
    )
