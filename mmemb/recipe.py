"""YAML recipes: safe-loaded, `key=value` overrides applied, validated into typed config.

A recipe names every component by its registry name with its arguments beside it
(``reweighter: {name: ega, alpha: 1.0}`` or just ``reweighter: ega``). `load_recipe` reports every
problem at once — unknown keys, bad types, unknown components and their bad arguments, missing
files — each with the file, the dotted key (and its line), the bad value and the fix.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mmemb import plugins
from mmemb.errors import ConfigError, MmembError
from mmemb.lora import LoraSpec

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
    when an override reaches inside it."""
    out = copy.deepcopy(raw)
    for text in overrides:
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
                break
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
    return out


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


def _where(source: str, key: str, lines: Mapping[str, int]) -> str:
    parts = key.split(".")
    for n in range(len(parts), 0, -1):  # the deepest key that exists in the file
        line = lines.get(".".join(parts[:n]))
        if line is not None:
            return f"{source}:{line}: {key}"
    return f"{source}: {key}"


def load_recipe(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    raw: Mapping[str, Any] | None = None,
    check_components: bool = True,
) -> LoadedRecipe:
    """Read, override and validate a recipe; raises one `ConfigError` listing every problem."""
    source = str(path) if path is not None else "<recipe>"
    text = ""
    if raw is None:
        if path is None:
            raise MmembError("load_recipe needs a path or raw=")
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"recipe {path}: no such file. Recipes ship in recipes/."])
        text = p.read_text()
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError([f"{source}: not valid YAML: {exc}"]) from exc
        if not isinstance(loaded, dict):
            raise ConfigError([f"{source}: a recipe is a mapping of sections (got {loaded!r})"])
        raw = loaded
    data = apply_overrides(dict(raw), overrides)
    lines = _line_index(text)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            shown = "" if err["type"] == "missing" else f" (got {err.get('input')!r})"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key; remove it or check its spelling"
            problems.append(f"{_where(source, key, lines)}: {msg}{shown}")
        raise ConfigError(problems, header=f"{source}: {len(problems)} problem(s)") from exc
    loaded_recipe = LoadedRecipe(
        recipe=recipe, path=Path(path) if path is not None else None,
        overrides=list(overrides), raw=data,
    )
    if check_components:
        problems = component_problems(loaded_recipe, lines=lines, source=source)
        if problems:
            raise ConfigError(problems, header=f"{source}: {len(problems)} problem(s)")
    return loaded_recipe


def _check(
    kind: str, spec: Component, key: str, source: str, lines: Mapping[str, int],
    *, name_key: str | None = None,
) -> list[str]:
    """Problems with one component spec; `name_key` is where its name sits (default key.name)."""
    args = {k: v for k, v in spec.items() if k != "name"}
    name = spec.get("name")
    name_key = name_key or f"{key}.name"
    if not isinstance(name, str):
        return [f"{_where(source, key, lines)}: needs a 'name' naming a {kind} (got {spec!r})"]
    try:
        plugins.get(kind, name, where=_where(source, name_key, lines))
        plugins.validate_config(kind, name, args, where=_where(source, key, lines))
    except MmembError as exc:
        return str(exc).splitlines()
    return []


def component_problems(
    loaded: LoadedRecipe, *, lines: Mapping[str, int] | None = None, source: str | None = None
) -> list[str]:
    """Every unknown component, bad component argument and missing input path in a recipe."""
    r = loaded.recipe
    lines = lines or {}
    source = source or str(loaded.path or "<recipe>")
    problems: list[str] = []
    # Backbone paths are resolved like `train` resolves them, so a relative local dir is accepted.
    backbone = dict(r.model.backbone)
    if isinstance(backbone.get("path"), str):
        backbone["path"] = loaded.resolve_path(backbone["path"])
    problems += _check("backbone", backbone, "model.backbone", source, lines)
    problems += _check("pooler", r.model.pooler, "model.pooler", source, lines)
    problems += _check("reweighter", r.loss.reweighter, "loss.reweighter", source, lines)
    if r.loss.name == "full" and "tile_size" in r.loss.options:
        problems.append(
            f"{_where(source, 'loss.tile_size', lines)}: tile_size is an option of the tiled loss, "
            "but loss.name is 'full' (the whole matrix). Set loss.name: tiled, or remove tile_size."
        )
    else:
        problems += _check(
            "loss", {"name": r.loss.name, **r.loss.options}, "loss", source, lines,
            name_key="loss.name",
        )
    problems += _check("eval_task", r.eval.task, "eval.task", source, lines)
    problems += _check("exporter", r.export.exporter, "export.exporter", source, lines)
    for split in ("train", "eval"):
        for i, entry in enumerate(getattr(r.data, split)):
            key = f"data.{split}.{i}"
            if entry.source is not None:
                spec = {"name": entry.source, **entry.args}
                problems += _check(
                    "source", spec, f"{key}.args", source, lines, name_key=f"{key}.source"
                )
            elif not Path(loaded.resolve_path(entry.shards)).exists():
                problems.append(
                    f"{_where(source, key + '.shards', lines)}: no shards at {entry.shards!r}. "
                    "Run `mmemb prepare` to make them, or give a `source:` to prepare them from."
                )
    if not r.data.train:
        problems.append(f"{_where(source, 'data.train', lines)}: no training data listed")
    return problems
