"""Run code against a plugin registry holding only the plugins you name (tests)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from mmemb import plugins


@contextmanager
def only_plugins(*modules: object) -> Iterator[None]:
    """Within the block, the registries hold just `modules` (entry points are not loaded), so a
    test does not depend on every installed plugin importing cleanly. Restores the previous
    state (registries are rebuilt on next use) afterwards."""
    old = os.environ.get("MMEMB_DISABLE_PLUGIN_AUTOLOAD")
    os.environ["MMEMB_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    plugins.reset()
    try:
        for module in modules:
            name = getattr(module, "__name__", repr(module))
            plugins.register_plugin(module, name=name, provider=name)
        yield
    finally:
        if old is None:
            os.environ.pop("MMEMB_DISABLE_PLUGIN_AUTOLOAD", None)
        else:
            os.environ["MMEMB_DISABLE_PLUGIN_AUTOLOAD"] = old
        plugins.reset()
