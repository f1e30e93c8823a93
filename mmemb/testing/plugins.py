"""Run code against a plugin registry holding only the plugins you name (tests).

The one way tests isolate plugins, in three spellings that share this code:

- ``with only_plugins(my_module): ...`` (this function, or the pytest fixture of that name);
- ``pytestmark = pytest.mark.only_plugins("mmemb_hf")``: the whole module, its module-scoped
  fixtures included (mmemb's pytest plugin applies the marker);
- ``@pytest.mark.only_plugins()`` on a test or class: just that test (empty registries: the test
  registers what it needs with `mmemb.plugins.register_plugin`).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from contextlib import contextmanager

from mmemb import plugins

AUTOLOAD_ENV = "MMEMB_DISABLE_PLUGIN_AUTOLOAD"

_stack: list[tuple[object, ...]] = []
"""The plugins of each active block, innermost last: leaving a nested block restores the
enclosing block's registries (not the autoloaded ones)."""


def _resolve(plugin: object) -> object:
    """A module name (``"mmemb_hf"``) is imported; anything else is the plugin object itself."""
    return importlib.import_module(plugin) if isinstance(plugin, str) else plugin


def _install(active: tuple[object, ...]) -> None:
    plugins.reset()
    for plugin in active:
        # A module by its name; an object (a class instance with hook methods) by its class.
        name = getattr(plugin, "__name__", None) or type(plugin).__name__
        plugins.register_plugin(plugin, name=name, provider=name)


@contextmanager
def only_plugins(*modules: object) -> Iterator[None]:
    """Within the block, the registries hold just `modules` (plugin modules or objects, or
    importable module names), besides the kernel's built-in ones; entry points are not loaded,
    so a test does not depend on every installed plugin importing cleanly. Afterwards the
    enclosing block's plugins, or (outermost) the autoloaded ones on next use, come back."""
    active = tuple(_resolve(m) for m in modules)
    old = os.environ.get(AUTOLOAD_ENV)
    os.environ[AUTOLOAD_ENV] = "1"
    _stack.append(active)
    try:
        _install(active)
        yield
    finally:
        _stack.pop()
        if old is None:
            os.environ.pop(AUTOLOAD_ENV, None)
        else:
            os.environ[AUTOLOAD_ENV] = old
        if _stack:
            _install(_stack[-1])
        else:
            plugins.reset()
