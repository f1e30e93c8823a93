"""YAML recipes: safe-loaded, `key=value` overrides applied, validated into typed config.

A recipe names every component by its registry name with its arguments beside it
(``reweighter: {name: ega, alpha: 1.0}`` or just ``reweighter: ega``). `load_recipe` reports every
problem at once — unknown keys, bad types, unknown components and their bad arguments, missing
files — each with the file, the dotted key (and its line), the bad value and the fix.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mmemb import plugins
from mmemb.errors import ConfigError, MmembError, closest
from mmemb.lora import LoraSpec

_M = TypeVar("_M", bound=BaseModel)

Component = dict[str, Any]
"""A component spec: ``{name: <registry name>, <argument>: <value>, ...}``."""


def _component(value: Any) -> Any:
    # `pooler: last_token` is shorthand for `pooler: {name: last_token}`.
    return {"name": value} if isinstance(value, str) else value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataEntry(_Strict):
    """One dataset: its shard directory, and optionally how to prepare it when missing."""

    shards: str
    source: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    weight: float = Field(1.0, gt=0)
    limit: int | None = Field(None, gt=0, description="prepare at most this many samples")


class DataConfig(_Strict):
    train: list[DataEntry] = Field(default_factory=list)
    eval: list[DataEntry] = Field(default_factory=list)
    num_workers: int = Field(0, ge=0)
    shuffle_buffer: int = Field(1000, ge=0)
    task_homogeneous: bool = False
    resample: bool = True


class ModelConfig(_Strict):
    backbone: Component
    pooler: Component = Field(default_factory=lambda: {"name": "last_token"})
    normalize: bool = True
    lora: LoraSpec | None = None

    _as_component = field_validator("backbone", "pooler", mode="before")(_component)


class LossConfig(BaseModel):
    """`loss`: one object built from this section (`mmemb.loss.build_loss`).

    ``name`` is a registered ``loss`` component (``full``: the whole B×M matrix; ``tiled``: tiles,
    a Triton kernel on CUDA); any other key is an option of that component (``tile_size`` and
    ``implementation`` for ``tiled``), validated against its config."""

    model_config = ConfigDict(extra="allow")

    name: str = Field("full", description="the loss implementation: full | tiled | a plugin's")
    temperature: float = Field(0.02, gt=0)
    reweighter: Component = Field(default_factory=lambda: {"name": "ega"})
    symmetric: bool = False
    mask_duplicate_positives: bool = Field(
        True,
        description="mask, in each row, candidates whose content equals the row's positive "
        "(another query's copy of it): on label-like data they are not negatives",
    )

    _as_component = field_validator("reweighter", mode="before")(_component)

    @property
    def options(self) -> dict[str, Any]:
        """The named loss component's own options (every key this model does not define)."""
        return dict(self.model_extra or {})

    def spec(self) -> dict[str, Any]:
        """The whole section as `mmemb.loss.build_loss` reads it."""
        return {**self.model_dump(exclude=set(self.options)), **self.options}


class GradCacheConfig(_Strict):
    """`train.grad_cache`: embed the batch in chunks without a graph, then re-run each chunk with
    one (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
    Setup"), so the global batch is bounded by the loss's memory, not the model's activations."""

    query_chunk: int = Field(gt=0, description="queries per forward/backward chunk")
    candidate_chunk: int = Field(
        gt=0, description="candidates (positives + hard negatives) per forward/backward chunk"
    )


class TrainConfig(_Strict):
    engine: Literal["torch", "deepspeed"] = Field(
        "torch", description="torch: plain PyTorch (data parallel over gloo/nccl); deepspeed: ZeRO"
    )
    deepspeed: dict[str, Any] | str | None = Field(
        None,
        description="DeepSpeed config, inline or a JSON file path; 'auto' values are filled from "
        "this section (batch_size, lr, weight_decay, warmup_steps, steps, grad_clip, precision)",
    )
    steps: int = Field(gt=0)
    batch_size: int = Field(gt=0, description="queries per device per step")
    negatives: int = Field(0, ge=0, description="hard negatives per query taken from the data")
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    grad_clip: float | None = Field(1.0, gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_cache: GradCacheConfig | None = None
    log_every: int = Field(10, gt=0)
    save_every: int | None = Field(
        None, gt=0, description="write a checkpoint every N steps (and always at the end)"
    )
    keep_last: int = Field(2, gt=0, description="checkpoints kept; older ones are deleted")
    eval_every: int | None = Field(
        None, gt=0, description="evaluate on data.eval every N steps (rank 0)"
    )
    tensorboard: bool = Field(True, description="also log to OUTPUT_DIR/tensorboard if installed")
    stop_on_collapse: bool = Field(
        False,
        description="stop (exit status 3) when the collapse alarm fires: after warm-up, the loss "
        "stayed at ln(candidates) or positives scored like the hardest negatives for 3 log "
        "intervals; it always prints a warning and records it in metrics.jsonl",
    )
    device: str | None = None
    threads: int | None = Field(
        None, gt=0,
        description="CPU threads for torch; default: the CPUs this process may use (or "
        "OMP_NUM_THREADS). `mmemb --threads N` overrides it",
    )


class EvalConfig(_Strict):
    task: Component = Field(default_factory=lambda: {"name": "mmeb"})
    batch_size: int = Field(32, gt=0)
    before_training: bool = True

    _as_component = field_validator("task", mode="before")(_component)


class ExportConfig(_Strict):
    exporter: Component = Field(default_factory=lambda: {"name": "hf"})
    dir: str | None = None

    _as_component = field_validator("exporter", mode="before")(_component)


class Recipe(_Strict):
    """A whole training recipe. Paths are relative to the working directory, except backbone
    paths and shard directories, which are tried relative to the recipe file first."""

    seed: int = 0
    output_dir: str
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)


class LoadedRecipe(BaseModel):
    """A validated recipe together with where it came from."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    recipe: Recipe
    path: Path | None
    overrides: list[str]
    raw: dict[str, Any]

    @property
    def base_dir(self) -> Path:
        return self.path.parent if self.path is not None else Path.cwd()

    def resolve_path(self, value: str) -> str:
        """`value` relative to the recipe file if it exists there, else as given (cwd or hub id)."""
        candidate = self.base_dir / value
        if not Path(value).is_absolute() and candidate.exists():
            return str(candidate)
        return value

    def dump(self) -> str:
        """The resolved recipe as YAML (overrides applied, defaults filled in)."""
        header = f"# resolved from {self.path or '<dict>'}"
        if self.overrides:
            header += f" with overrides: {' '.join(self.overrides)}"
        body = yaml.safe_dump(self.recipe.model_dump(mode="json"), sort_keys=False)
        return f"{header}\n{body}"


# ---------------------------------------------------------------------------------------------
# overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (['a','b','c'], value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError([f"override {text!r}: expected key=value, e.g. train.lr=1e-5"])
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError([f"override {text!r}: the value is not valid YAML ({exc})"]) from exc
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of `raw` with each ``key=value`` applied. A number indexes a list
    (``data.train.0.weight=2``); a component given as a bare name is widened to ``{name: ...}``
    when an override reaches inside it. Every bad override is reported, in one `ConfigError`."""
    out = copy.deepcopy(raw)
    problems: list[str] = []
    for text in overrides:
        try:
            _apply_one(out, text)
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        raise ConfigError(problems, header=f"{len(problems)} bad override(s)")
    return out


def _apply_one(out: dict[str, Any], text: str) -> None:
    keys, value = parse_override(text)
    node: Any = out
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        where = ".".join(keys[: i + 1])
        if isinstance(node, list):
            if not (key.isdigit() and int(key) < len(node)):
                raise ConfigError([
                    f"override {text!r}: {'.'.join(keys[:i])} is a list of {len(node)}; "
                    f"'{key}' is not an index into it (0..{len(node) - 1})"
                ])
            slot: Any = int(key)
        elif isinstance(node, dict):
            slot = key
        else:
            parent = ".".join(keys[:i])
            raise ConfigError(
                [f"override {text!r}: {parent} is {node!r}, not a mapping, so it has no keys"]
            )
        if last:
            node[slot] = value
            return
        child = node[slot] if isinstance(node, list) else node.get(slot)
        if isinstance(child, str):
            child = {"name": child}
        elif child is None:
            child = {}
        elif not isinstance(child, (dict, list)):
            raise ConfigError(
                [f"override {text!r}: {where} is {child!r}, not a mapping, so it has no keys"]
            )
        node[slot] = child
        node = child


# ---------------------------------------------------------------------------------------------
# loading and validation


def _line_index(text: str) -> dict[str, int]:
    """Dotted key -> 1-based line where it is defined, for error messages."""
    index: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                dotted = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
                index[dotted] = key_node.start_mark.line + 1
                walk(value_node, dotted)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                dotted = f"{prefix}.{i}"
                index[dotted] = item.start_mark.line + 1
                walk(item, dotted)

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return index
    if root is not None:
        walk(root, "")
    return index


Lines = Mapping[str, "int | str"]
"""Dotted key -> the 1-based recipe line defining it, or the ``key=value`` override that set it."""


def _where(source: str, key: str, lines: Lines) -> str:
    parts = key.split(".")
    for n in range(len(parts), 0, -1):  # the deepest key that the file or an override defines
        line = lines.get(".".join(parts[:n]))
        if isinstance(line, str):
            return f"{source} (override {line}): {key}"
        if line is not None:
            return f"{source}:{line}: {key}"
    return f"{source}: {key}"


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (``X``, ``X | None``, ``list[X]``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _model_at(loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The config model that holds the keys at dotted location `loc` of a recipe (list indices
    are stepped over), or None when `loc` leaves the typed part (a component's arguments)."""
    model: type[BaseModel] | None = Recipe
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(str(part))
        model = _model_of(field.annotation) if field is not None else None
        if model is None:
            return None
    return model


def _unknown_key_hint(key: str, known: Iterable[str]) -> str:
    """The closest known key (a typo) or, failing that, the valid keys."""
    parent, _, last = key.rpartition(".")
    known = sorted(known)
    close = closest(last, known)
    if close is not None:
        return f"Did you mean '{parent + '.' if parent else ''}{close}'?"
    return f"Valid keys{' of ' + parent if parent else ''}: {', '.join(known)}."


def _pydantic_problems(exc: ValidationError, source: str, lines: Lines) -> list[str]:
    def hint(loc: tuple[Any, ...]) -> str:
        model = _model_at(loc[:-1])
        key = ".".join(str(p) for p in loc)
        return _unknown_key_hint(key, model.model_fields if model is not None else ())

    return plugins.format_validation_error(
        exc, place=lambda key: _where(source, key, lines), unknown_hint=hint
    )


class _Sections:
    """Each part of a recipe that is valid on its own, so that its components can be checked even
    when another part of the recipe is broken (every problem is reported in one run)."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self.model = self._one(ModelConfig, data, "model")
        self.loss = self._one(LossConfig, data, "loss")
        self.eval = self._one(EvalConfig, data, "eval")
        self.export = self._one(ExportConfig, data, "export")
        raw_data = data.get("data", {})
        self.data_listed = isinstance(raw_data, dict) and bool(raw_data.get("train"))
        # Data entries one by one: a bad weight in one entry must not hide another's bad source.
        self.entries: list[tuple[str, DataEntry]] = []
        for split in ("train", "eval"):
            items = raw_data.get(split) if isinstance(raw_data, dict) else None
            for i, item in enumerate(items if isinstance(items, list) else []):
                with contextlib.suppress(ValidationError):  # its problems come from `Recipe`
                    self.entries.append((f"data.{split}.{i}", DataEntry.model_validate(item)))

    @staticmethod
    def _one(model: type[_M], data: Mapping[str, Any], name: str) -> _M | None:
        try:
            if name in data:
                return model.model_validate(data[name])
            default = Recipe.model_fields[name].get_default(call_default_factory=True)
            return default if isinstance(default, model) else None
        except ValidationError:
            return None


class RecipeCheck(BaseModel):
    """What `check_recipe` found: the recipe (None when it is invalid) and every problem."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    source: str
    path: Path | None
    overrides: list[str]
    data: dict[str, Any]
    lines: dict[str, int | str]
    recipe: Recipe | None
    problems: list[str]

    def where(self, key: str) -> str:
        """``file:line: key`` (or the override that set it) for messages about `key`."""
        return _where(self.source, key, self.lines)

    def resolve_path(self, value: str) -> str:
        """As `LoadedRecipe.resolve_path`: relative to the recipe file if it exists there."""
        return _resolver(self.path)(value)

    def loaded(self) -> LoadedRecipe:
        """The validated recipe; raises `ConfigError` with every problem (and their count)."""
        if self.problems or self.recipe is None:
            raise ConfigError(self.problems, header=f"{self.source}: {_count(self.problems)}")
        return LoadedRecipe(recipe=self.recipe, path=self.path, overrides=self.overrides,
                            raw=self.data)


def _count(problems: Sequence[str]) -> str:
    return f"{len(problems)} problem(s)"


def _read(path: str | Path | None, raw: Mapping[str, Any] | None) -> tuple[dict[str, Any], str]:
    """(recipe mapping, its text) from a file or `raw`; a file that cannot be read at all is one
    problem that stops everything else."""
    if raw is not None:
        return dict(raw), ""
    if path is None:
        raise MmembError("load_recipe needs a path or raw=")
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"recipe {path}: no such file. Recipes ship in recipes/."])
    text = p.read_text()
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {exc}"]) from exc
    if not isinstance(loaded, dict):
        raise ConfigError([f"{path}: a recipe is a mapping of sections (got {loaded!r})"])
    return loaded, text


def check_recipe(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    raw: Mapping[str, Any] | None = None,
    check_components: bool = True,
    check_inputs: bool = False,
) -> RecipeCheck:
    """Read, override and check a recipe, collecting every problem instead of stopping at the
    first: bad overrides, unknown keys (with the closest valid key), bad values, unknown
    components and their bad arguments, missing shard directories and — with `check_inputs` —
    missing source input files of datasets that still have to be prepared."""
    source = str(path) if path is not None else "<recipe>"
    base, text = _read(path, raw)
    lines: dict[str, int | str] = dict(_line_index(text))
    data = copy.deepcopy(base)
    problems: list[str] = []
    for override in overrides:
        try:
            _apply_one(data, override)
        except ConfigError as exc:
            problems += exc.problems
            continue
        lines[override.partition("=")[0]] = override
    recipe: Recipe | None = None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        problems += _pydantic_problems(exc, source, lines)
    sections = _Sections(data)
    resolve = _resolver(Path(path) if path is not None else None)
    if check_components:
        problems += _component_problems(sections, resolve, source, lines)
    if check_inputs:
        problems += input_problems(sections, resolve, source, lines)
    return RecipeCheck(source=source, path=Path(path) if path is not None else None,
                       overrides=list(overrides), data=data, lines=lines, recipe=recipe,
                       problems=problems)


def load_recipe(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    raw: Mapping[str, Any] | None = None,
    check_components: bool = True,
) -> LoadedRecipe:
    """Read, override and validate a recipe; raises one `ConfigError` listing every problem."""
    return check_recipe(path, overrides, raw=raw, check_components=check_components).loaded()


def _resolver(path: Path | None) -> Callable[[str], str]:
    base = path.parent if path is not None else Path.cwd()

    def resolve(value: str) -> str:  # as LoadedRecipe.resolve_path
        candidate = base / value
        return str(candidate) if not Path(value).is_absolute() and candidate.exists() else value

    return resolve


def _check(
    kind: str, spec: Component, key: str, source: str, lines: Lines,
    *, name_key: str | None = None, also_known: Iterable[str] = (),
) -> list[str]:
    """Problems with one component spec; `name_key` is where its name sits (default key.name).
    Arguments the component does not take are named with the closest one it does take (or
    among `also_known`, the keys of the section the component's options sit in)."""
    args = {k: v for k, v in spec.items() if k != "name"}
    name = spec.get("name")
    name_key = name_key or f"{key}.name"
    if not isinstance(name, str):
        return [f"{_where(source, key, lines)}: needs a 'name' naming a {kind} (got {spec!r})"]
    try:
        comp = plugins.get(kind, name, where=_where(source, name_key, lines))
    except MmembError as exc:
        return str(exc).splitlines()
    problems: list[str] = []
    if comp.config is not None:
        fields = list(comp.config.model_fields)
        also = sorted(k for k in also_known if k not in fields)
        for arg in [a for a in args if a not in fields]:
            close = closest(arg, [*fields, *also])
            hint = f" Did you mean '{key}.{close}'?" if close else ""
            known = ", ".join(sorted(fields)) or "none"
            section = f" Keys of {key} itself: {', '.join(also)}." if also else ""
            problems.append(
                f"{_where(source, f'{key}.{arg}', lines)}: unknown argument for {kind} '{name}' "
                f"(got {args.pop(arg)!r}).{hint} Known: {known}.{section}"
            )
    try:
        plugins.validate_config(kind, name, args, where=_where(source, key, lines))
    except MmembError as exc:
        problems += str(exc).splitlines()
    return problems


def component_problems(
    loaded: LoadedRecipe, *, lines: Lines | None = None, source: str | None = None
) -> list[str]:
    """Every unknown component, bad component argument and missing shard directory in a
    validated recipe."""
    return _component_problems(
        _Sections(loaded.raw), loaded.resolve_path, source or str(loaded.path or "<recipe>"),
        lines or {},
    )


def _component_problems(
    s: _Sections, resolve: Callable[[str], str], source: str, lines: Lines
) -> list[str]:
    problems: list[str] = []
    if s.model is not None:
        # Backbone paths are resolved like `train` resolves them: a relative local dir is accepted.
        backbone = dict(s.model.backbone)
        if isinstance(backbone.get("path"), str):
            backbone["path"] = resolve(backbone["path"])
        problems += _check("backbone", backbone, "model.backbone", source, lines)
        problems += _check("pooler", s.model.pooler, "model.pooler", source, lines)
    if s.loss is not None:
        loss = s.loss
        problems += _check("reweighter", loss.reweighter, "loss.reweighter", source, lines)
        if loss.name == "full" and "tile_size" in loss.options:
            problems.append(
                f"{_where(source, 'loss.tile_size', lines)}: tile_size is an option of the tiled "
                "loss, but loss.name is 'full' (the whole matrix). Set loss.name: tiled, or remove "
                "tile_size."
            )
        else:
            # Other keys of `loss` are the named loss component's options, checked against its
            # config; a misspelt `loss` key (temprature) is named as such.
            problems += _check(
                "loss", {"name": loss.name, **loss.options}, "loss", source, lines,
                name_key="loss.name", also_known=LossConfig.model_fields,
            )
    if s.eval is not None:
        problems += _check("eval_task", s.eval.task, "eval.task", source, lines)
    if s.export is not None:
        problems += _check("exporter", s.export.exporter, "export.exporter", source, lines)
    for key, entry in s.entries:
        if entry.source is not None:
            spec = {"name": entry.source, **entry.args}
            problems += _check(
                "source", spec, f"{key}.args", source, lines, name_key=f"{key}.source"
            )
        elif not Path(resolve(entry.shards)).exists():
            problems.append(
                f"{_where(source, key + '.shards', lines)}: no shards at {entry.shards!r}. "
                "Run `mmemb prepare` to make them, or give a `source:` to prepare them from."
            )
    if not s.data_listed:
        problems.append(f"{_where(source, 'data.train', lines)}: no training data listed")
    return problems


_GLOB_CHARS = "*?["


def _exists(item: str) -> bool:
    """Whether a source input (a file, a directory or a glob) names anything, as prepare reads it
    (relative to the working directory)."""
    p = Path(item).expanduser()
    if p.exists():
        return True
    if any(ch in item for ch in _GLOB_CHARS):
        anchor = Path(p.anchor) if p.is_absolute() else Path(".")
        pattern = str(p.relative_to(anchor)) if p.is_absolute() else str(p)
        return next(anchor.glob(pattern), None) is not None
    return False


def input_problems(
    s: _Sections, resolve: Callable[[str], str], source: str, lines: Lines
) -> list[str]:
    """Missing `input` files and `image_root` folders of the datasets that will be prepared (a
    `source:` and no shards yet) — the `--input`/`--image-root` of `mmemb prepare`, which reads
    them relative to the working directory. Each missing input is named with its recipe line; a
    missing image root shared by several datasets is named once."""
    problems: list[str] = []
    cwd = Path.cwd()
    roots: dict[str, list[str]] = {}
    for key, entry in s.entries:
        if entry.source is None or (Path(resolve(entry.shards)) / "manifest.json").is_file():
            continue
        value = entry.args.get("input")
        items = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        for n, item in enumerate(items):
            if not isinstance(item, str) or _exists(item):
                continue
            at = f"{key}.args.input" + (f".{n}" if isinstance(value, list) else "")
            problems.append(
                f"{_where(source, at, lines)}: {item!r} does not exist (relative to {cwd}). Fix "
                f"the path, or run `mmemb prepare` beforehand and point {key}.shards at its output."
            )
        root = entry.args.get("image_root")
        if isinstance(root, str) and not Path(root).expanduser().is_dir():
            roots.setdefault(root, []).append(f"{key}.args.image_root")
    for root, keys in roots.items():
        more = len(keys) - 1
        others = f" (and {more} more dataset(s) with this image_root)" if more else ""
        problems.append(
            f"{_where(source, keys[0], lines)}: directory {root!r} does not exist (relative to "
            f"{cwd}){others}. Relative image paths of the source are read under it; fix the path."
        )
    return problems
