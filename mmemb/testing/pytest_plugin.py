"""mmemb's pytest plugin (entry point ``pytest11``): fixtures for plugin authors' tests.

Loaded by pytest wherever mmemb is installed; it imports nothing heavy until a fixture is used.

- ``only_plugins``: ``with only_plugins(my_module): ...`` — registries holding just those plugins
  (entry points not loaded), restored afterwards;
- ``check_reweighter``: the reweighter contract (``mmemb.testing.contracts.check_reweighter``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import pytest


@pytest.fixture
def only_plugins() -> Callable[..., AbstractContextManager[None]]:
    """A context manager: the plugin registries hold just the given plugin modules/objects."""
    from mmemb.testing.plugins import only_plugins as isolate

    return isolate


@pytest.fixture
def check_reweighter() -> Callable[..., Any]:
    """``check_reweighter(rw, neutral=...)``: tiled = full in float64, finite, stateless, α → 0."""
    from mmemb.testing.contracts import check_reweighter as check

    return check
