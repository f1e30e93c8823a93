"""Plugin manager: finds plugins through entry points and keeps one registry per component kind.

Every concrete component (backbones, poolers, miners, reweighters, losses, sources, eval tasks,
exporters) comes from a plugin, the default ones included: they are packages in `plugins/`
registered through the entry-point group ``mmemb`` exactly as a third-party package would be. The
kernel never imports them.

    >>> from mmemb import plugins
    >>> plugins.available("reweighter")          # doctest: +SKIP
    ['ega', 'llave', 'none', 'topk_mask']
    >>> ega = plugins.build("reweighter", "ega", alpha=2.0)   # doctest: +SKIP

Set ``MMEMB_DISABLE_PLUGIN_AUTOLOAD=1`` to skip entry-point loading (tests register plugins by hand
with `register_plugin`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pluggy
from pydantic import BaseModel, ValidationError

from mmemb import hookspecs
from mmemb.errors import ConfigError, PluginError, UnknownComponentError

ENTRY_POINT_GROUP = "mmemb"

BUILTIN_PLUGINS: tuple[str, ...] = ("mmemb.loss.builtin",)
"""Kernel modules registered as plugins in every plugin manager, autoload or not: the reference
implementations the kernel itself owns (the ``full`` loss). Named, not imported, here so this
module does not depend on them."""

KINDS: dict[str, str] = {
    "backbone": "mmemb_register_backbones",
    "pooler": "mmemb_register_poolers",
    "miner": "mmemb_register_miners",
    "reweighter": "mmemb_register_reweighters",
    "loss": "mmemb_register_losses",
    "source": "mmemb_register_sources",
    "eval_task": "mmemb_register_eval_tasks",
    "exporter": "mmemb_register_exporters",
}
"""Component kind -> the registration hook that fills its registry."""

_NAME_RE = re.compile(r"^[a-z][a-z0-9_.-]*$")


@dataclass(frozen=True)
class Component:
    """A registered component: how to build it, its config model, and who provides it."""

    kind: str
    name: str
    factory: Callable[..., Any]
    config: type[BaseModel] | None
    summary: str
    provider: str


class Registrar:
    """Handed to a registration hook; `add` puts one component of this kind in the registry."""

    def __init__(self, kind: str, provider: str, table: dict[str, Component]) -> None:
        self.kind = kind
        self.provider = provider
        self._table = table

    def add(
        self,
        name: str,
        factory: Callable[..., Any],
        *,
        config: type[BaseModel] | None = None,
        summary: str = "",
    ) -> None:
        """Register `factory` under `name`.

        `factory(config_instance)` is called by `build` with the validated config when `config` is
        given, `factory()` otherwise. `summary` is the one line `mmemb plugins list` shows.
        """
        if not _NAME_RE.match(name):
            raise PluginError(
                f"{self.provider} registers {self.kind} {name!r}: names are lower-case letters, "
                "digits, '_', '-' or '.', starting with a letter."
            )
        if config is not None and not (isinstance(config, type) and issubclass(config, BaseModel)):
            raise PluginError(
                f"{self.provider} registers {self.kind} '{name}' with config={config!r}: "
                "it must be a pydantic BaseModel subclass (or None)."
            )
        if name in self._table:
            other = self._table[name].provider
            raise PluginError(
                f"{self.kind} '{name}' is registered twice: by {other} and by {self.provider}. "
                "Uninstall one of them, or ask one to rename its component."
            )
        self._table[name] = Component(self.kind, name, factory, config, summary, self.provider)


class _State:
    def __init__(self) -> None:
        self.pm: pluggy.PluginManager | None = None
        self.providers: dict[int, str] = {}  # id(plugin) -> distribution name
        self.registries: dict[str, dict[str, Component]] = {}
        self.lock = threading.RLock()


_state = _State()


def _new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("mmemb")
    pm.add_hookspecs(hookspecs)
    for module in BUILTIN_PLUGINS:
        plugin = importlib.import_module(module)
        pm.register(plugin, name=module)
        _state.providers[id(plugin)] = "mmemb"
    return pm


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else "unknown distribution"
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken third-party plugin must say which one it is
            raise PluginError(
                f"plugin '{ep.name}' ({ep.value}) from {dist} failed to import: {exc!r}. "
                f"Reinstall or uninstall {dist}, or set MMEMB_DISABLE_PLUGIN_AUTOLOAD=1."
            ) from exc
        if pm.is_registered(plugin):
            continue
        name = ep.name if pm.get_plugin(ep.name) is None else f"{dist}:{ep.name}"
        pm.register(plugin, name=name)
        _state.providers[id(plugin)] = dist


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, loading entry points on first use."""
    with _state.lock:
        if _state.pm is None:
            pm = _new_manager()
            if os.environ.get("MMEMB_DISABLE_PLUGIN_AUTOLOAD", "") not in ("1", "true", "yes"):
                _load_entry_points(pm)
            _state.pm = pm
        return _state.pm


def register_plugin(
    plugin: object, *, name: str | None = None, provider: str | None = None
) -> None:
    """Register a plugin object by hand (tests, notebooks); registries are rebuilt on next use."""
    with _state.lock:
        pm = plugin_manager()
        pm.register(plugin, name=name)
        _state.providers[id(plugin)] = provider or name or repr(plugin)
        _state.registries.clear()


def reset() -> None:
    """Forget every plugin and registry; the next call reloads entry points (for tests)."""
    with _state.lock:
        _state.pm = None
        _state.providers.clear()
        _state.registries.clear()


def registry(kind: str) -> Mapping[str, Component]:
    """Every component of `kind`, by name."""
    if kind not in KINDS:
        raise UnknownComponentError("component kind", kind, KINDS)
    with _state.lock:
        if kind not in _state.registries:
            pm = plugin_manager()
            table: dict[str, Component] = {}
            caller = getattr(pm.hook, KINDS[kind])
            for impl in caller.get_hookimpls():  # in registration order
                provider = _state.providers.get(id(impl.plugin)) or pm.get_name(impl.plugin) or "?"
                registrar = Registrar(kind, provider, table)
                impl.function(**{arg: registrar for arg in impl.argnames})
            _state.registries[kind] = table
        return _state.registries[kind]


def available(kind: str) -> list[str]:
    """Names registered for `kind`, sorted."""
    return sorted(registry(kind))


def get(kind: str, name: str, *, where: str = "") -> Component:
    """The component `name` of `kind`, or an error naming the closest known name."""
    table = registry(kind)
    if name not in table:
        raise UnknownComponentError(kind, name, table, where=where)
    return table[name]


def format_validation_error(exc: ValidationError, *, where: str) -> list[str]:
    """One line per pydantic error: '<where>.<key>: <message> (got <value>)'."""
    problems = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        path = f"{where}.{key}" if where and key else (where or key)
        got = err.get("input")
        shown = "" if err["type"] == "missing" else f" (got {got!r})"
        problems.append(f"{path}: {err['msg']}{shown}")
    return problems


def validate_config(
    kind: str, name: str, kwargs: Mapping[str, Any], *, where: str = ""
) -> BaseModel | None:
    """Validate a component's arguments against its config model; every problem is reported."""
    comp = get(kind, name, where=f"{where}.name" if where else "")
    place = where or f"{kind} '{name}'"
    if comp.config is None:
        if kwargs:
            keys = ", ".join(sorted(kwargs))
            raise ConfigError([f"{place}: {kind} '{name}' takes no arguments (got {keys})."])
        return None
    fields = comp.config.model_fields
    problems = [
        f"{place}.{key}: unknown argument for {kind} '{name}'. Known: {', '.join(sorted(fields))}."
        for key in kwargs
        if key not in fields
    ]
    try:
        cfg = comp.config.model_validate({k: v for k, v in kwargs.items() if k in fields})
    except ValidationError as exc:
        problems += format_validation_error(exc, where=place)
        cfg = None
    if problems:
        raise ConfigError(problems)
    return cfg


def build(kind: str, name: str, /, *, _where: str = "", **kwargs: Any) -> Any:
    """Build component `name` of `kind` after validating `kwargs` against its config model."""
    comp = get(kind, name, where=_where)
    cfg = validate_config(kind, name, kwargs, where=_where)
    return comp.factory(cfg) if cfg is not None else comp.factory()


def build_from(kind: str, spec: Any, *, where: str) -> Any:
    """Build from a recipe entry: a name, or a mapping ``{name: ..., <args>}``."""
    if isinstance(spec, str):
        return build(kind, spec, _where=where)
    if isinstance(spec, Mapping) and isinstance(spec.get("name"), str):
        args = {k: v for k, v in spec.items() if k != "name"}
        return build(kind, spec["name"], _where=where, **args)
    raise ConfigError([f"{where}: expected a {kind} name or a mapping with 'name' (got {spec!r})."])
