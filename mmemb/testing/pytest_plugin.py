"""mmemb's pytest plugin (entry point ``pytest11``): a marker and fixtures for plugins' tests.

Loaded by pytest wherever mmemb is installed; it imports nothing heavy until a fixture is used.

- marker ``only_plugins(*plugins)``: the registries hold just those plugins (modules, objects or
  importable module names; entry points not loaded) — for the whole module, its module-scoped
  fixtures included, as ``pytestmark``; for one test on a test or class;
- fixture ``only_plugins``: the same as a context manager, ``with only_plugins(my_module): ...``;
- fixtures ``check_reweighter``, ``check_backbone``, ``check_pooler``, ``check_source``: the
  contracts of `mmemb.testing.contracts`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import pytest

MARKER = "only_plugins"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(*plugins): the mmemb plugin registries hold just these plugins (modules, "
        "objects or module names) for the module (pytestmark) or the test",
    )


def _isolate(marker: pytest.Mark | None) -> AbstractContextManager[None]:
    from contextlib import nullcontext

    if marker is None:
        return nullcontext()
    from mmemb.testing.plugins import only_plugins

    return only_plugins(*marker.args)


@pytest.fixture(scope="module", autouse=True)
def _mmemb_only_plugins_module(request: pytest.FixtureRequest) -> Iterator[None]:
    """A module's ``pytestmark = pytest.mark.only_plugins(...)``, for the whole module. Autouse
    and module-scoped so it is active before the module's own module-scoped fixtures run."""
    module = request.node
    marker = next((m for m in getattr(module, "own_markers", []) if m.name == MARKER), None)
    with _isolate(marker):
        yield


@pytest.fixture(autouse=True)
def _mmemb_only_plugins_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """``@pytest.mark.only_plugins(...)`` on a test or its class (a module's is active already)."""
    marker = None
    for node, mark in request.node.iter_markers_with_node(MARKER):
        if not isinstance(node, pytest.Module):
            marker = mark
        break  # the closest marker decides
    with _isolate(marker):
        yield


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


@pytest.fixture
def check_backbone() -> Callable[..., Any]:
    """``check_backbone(backbone, reload=...)``: processor, forward, padding, appends_eos, split,
    uniform forward, save/load."""
    from mmemb.testing.contracts import check_backbone as check

    return check


@pytest.fixture
def check_pooler() -> Callable[..., Any]:
    """``check_pooler(pooler)``: one finite vector per row, blind to padding."""
    from mmemb.testing.contracts import check_pooler as check

    return check


@pytest.fixture
def check_source() -> Callable[..., Any]:
    """``check_source(name, args, rows=N)``: rows in = written + rejected, deterministic output."""
    from mmemb.testing.contracts import check_source as check

    return check
