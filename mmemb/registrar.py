"""The typed registrar a registration hook receives, and the registered component it records.

Its own module so that the hook specifications (`mmemb.hookspecs`) and the plugin manager
(`mmemb.plugins`) both depend on it and not on each other.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from mmemb.errors import PluginError

__all__ = ["Component", "Registrar"]

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

    def __repr__(self) -> str:
        return f"Registrar(kind={self.kind!r}, provider={self.provider!r})"

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
