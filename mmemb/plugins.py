"""Plugin manager: finds plugins through entry points and keeps one registry per component kind.

Every concrete component (backbones, poolers, miners, reweighters, losses, sources, eval tasks,
exporters, tiny model writers) comes from a plugin, the default ones included: they are packages
in `plugins/` registered through the entry-point group ``mmemb`` exactly as a third-party package
would be. The kernel never imports them.

    >>> from mmemb import plugins
    >>> plugins.available("reweighter")          # doctest: +SKIP
    ['ega', 'llave', 'none', 'topk_mask']
    >>> ega = plugins.build("reweighter", "ega", alpha=2.0)   # doctest: +SKIP

Set ``MMEMB_DISABLE_PLUGIN_AUTOLOAD=1`` to skip entry-point loading (tests register plugins by hand
with `register_plugin`), ``MMEMB_TRACE_PLUGINS=1`` to print every hook call on stderr. A plugin
that misspells a hook, declares another ``MMEMB_PLUGIN_API`` or raises inside a hook or a factory
is reported naming the distribution that provides it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

import pluggy
from pydantic import BaseModel, ValidationError

from mmemb import hookspecs
from mmemb.errors import ConfigError, MmembError, PluginError, UnknownComponentError, closest
from mmemb.registrar import Component, Registrar

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
    "tiny_model": "mmemb_register_tiny_models",
}
"""Component kind -> the registration hook that fills its registry."""


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
    if os.environ.get("MMEMB_TRACE_PLUGINS", "") not in ("", "0"):
        # pluggy's own tracing: every hook call, its plugins and its result, on stderr
        pm.trace.root.setwriter(lambda message: print(message, end="", file=sys.stderr))
        pm.enable_tracing()
    for module in BUILTIN_PLUGINS:
        _register(pm, importlib.import_module(module), name=module, provider="mmemb")
    return pm


def _register(pm: pluggy.PluginManager, plugin: object, *, name: str | None, provider: str) -> None:
    """Register one plugin, checking its API version and its hook names; errors name `provider`."""
    declared = getattr(plugin, "MMEMB_PLUGIN_API", None)
    if declared is not None and declared != hookspecs.MMEMB_PLUGIN_API:
        raise PluginError(
            f"plugin '{name}' from {provider} was written for mmemb plugin API {declared}, but "
            f"this mmemb provides API {hookspecs.MMEMB_PLUGIN_API}. Install a version of "
            f"{provider} made for this mmemb, or uninstall it."
        )
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin '{name}' from {provider}: {exc}") from exc
    _state.providers[id(plugin)] = provider
    unknown = [
        attr for attr in dir(plugin)
        if attr.startswith("mmemb_") and pm.parse_hookimpl_opts(plugin, attr) is not None
        and not (hasattr(pm.hook, attr) and getattr(pm.hook, attr).has_spec())
    ]
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        pm.unregister(plugin)
        _state.providers.pop(id(plugin), None)
        hints = []
        for attr in unknown:
            close = closest(attr, KINDS.values())
            hints.append(f"'{attr}'" + (f" (did you mean '{close}'?)" if close else ""))
        raise PluginError(
            f"plugin '{name}' from {provider} implements no known hook: {', '.join(hints) or exc}. "
            f"mmemb's hooks: {', '.join(sorted(KINDS.values()))}."
        ) from exc


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
        _register(pm, plugin, name=name, provider=dist)


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
        _register(pm, plugin, name=name, provider=provider or name or repr(plugin))
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
            hook = KINDS[kind]
            # One pluggy call per plugin, in pluggy's call order (tryfirst/trylast honoured, and
            # traced with MMEMB_TRACE_PLUGINS=1), so each registrar knows who it registers for.
            for impl in reversed(getattr(pm.hook, hook).get_hookimpls()):
                provider = _state.providers.get(id(impl.plugin)) or pm.get_name(impl.plugin) or "?"
                others = [p for p in pm.get_plugins() if p is not impl.plugin]
                call = pm.subset_hook_caller(hook, remove_plugins=others)
                try:
                    call(registry=Registrar(kind, provider, table))
                except MmembError:
                    raise
                except Exception as exc:
                    raise PluginError(
                        f"{hook} of {provider} raised {exc!r}. Report it to {provider}'s authors, "
                        "or uninstall it."
                    ) from exc
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


def format_validation_error(
    exc: ValidationError,
    *,
    where: str = "",
    place: Callable[[str], str] | None = None,
    unknown_hint: Callable[[tuple[Any, ...]], str] | None = None,
) -> list[str]:
    """One line per pydantic error: ``<place>: <message> (got <value>)``.

    The one formatter for config errors (recipes and component arguments alike). ``place`` maps
    the dotted key to where it sits (default ``<where>.<key>``, e.g. a recipe file and line);
    ``unknown_hint`` adds a hint (a did-you-mean) to an unknown key, given the error's location.
    """
    problems = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        path = place(key) if place else (f"{where}.{key}" if where and key else (where or key))
        shown = "" if err["type"] == "missing" else f" (got {err.get('input')!r})"
        msg, hint = err["msg"], ""
        if err["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling"
            hint = f". {unknown_hint(tuple(err['loc']))}" if unknown_hint else ""
        problems.append(f"{path}: {msg}{shown}{hint}")
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
    problems = []
    for key in kwargs:
        if key not in fields:
            close = closest(key, fields)
            hint = f" Did you mean '{close}'?" if close else ""
            problems.append(f"{place}.{key}: unknown argument for {kind} '{name}'.{hint} "
                            f"Known: {', '.join(sorted(fields)) or 'none'}.")
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
    try:
        return comp.factory(cfg) if cfg is not None else comp.factory()
    except MmembError:
        raise
    except Exception as exc:
        # a bug or an environment problem inside a plugin: say whose, keep the cause chained
        raise PluginError(
            f"building {kind} '{name}' (from {comp.provider}) failed: {exc!r}"
            + (f" [{_where}]" if _where else "")
        ) from exc


def build_from(kind: str, spec: Any, *, where: str) -> Any:
    """Build from a recipe entry: a name, or a mapping ``{name: ..., <args>}``."""
    if isinstance(spec, str):
        return build(kind, spec, _where=where)
    if isinstance(spec, Mapping) and isinstance(spec.get("name"), str):
        args = {k: v for k, v in spec.items() if k != "name"}
        return build(kind, spec["name"], _where=where, **args)
    raise ConfigError([f"{where}: expected a {kind} name or a mapping with 'name' (got {spec!r})."])
