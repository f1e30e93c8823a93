"""The plugin API at pytest/tox level: misspelt hooks, errors inside hooks and factories, the API
version, tracing, and the kernel's own built-in plugin."""

from __future__ import annotations

import subprocess
import sys

import pytest

import mmemb
from mmemb import plugins
from mmemb.errors import PluginError


class Misspelt:
    @mmemb.hookimpl
    def mmemb_register_reweighter(self, registry: plugins.Registrar) -> None:  # no trailing s
        registry.add("x", object)


class RaisesInHook:
    @mmemb.hookimpl
    def mmemb_register_poolers(self, registry: plugins.Registrar) -> None:
        raise RuntimeError("boom in the hook")


class RaisesInFactory:
    @mmemb.hookimpl
    def mmemb_register_poolers(self, registry: plugins.Registrar) -> None:
        def factory() -> object:
            raise ZeroDivisionError("boom in the factory")

        registry.add("broken", factory)


class FutureApi:
    MMEMB_PLUGIN_API = mmemb.MMEMB_PLUGIN_API + 1


@pytest.mark.only_plugins()
def test_a_misspelt_hook_is_an_error_naming_the_plugin() -> None:
    with pytest.raises(PluginError) as info:
        plugins.register_plugin(Misspelt(), name="typo", provider="mmemb-typo")
    msg = str(info.value)
    assert "plugin 'typo' from mmemb-typo" in msg
    assert "'mmemb_register_reweighter' (did you mean 'mmemb_register_reweighters'?)" in msg
    # the bad plugin is not left registered: the rest of mmemb keeps working
    assert plugins.available("reweighter") == []


@pytest.mark.only_plugins()
def test_an_exception_in_a_hook_names_the_distribution() -> None:
    plugins.register_plugin(RaisesInHook(), name="bad", provider="mmemb-bad")
    with pytest.raises(PluginError, match="mmemb_register_poolers of mmemb-bad raised") as info:
        plugins.available("pooler")
    assert isinstance(info.value.__cause__, RuntimeError)


@pytest.mark.only_plugins()
def test_an_exception_in_a_factory_names_the_distribution() -> None:
    plugins.register_plugin(RaisesInFactory(), name="f", provider="mmemb-f")
    with pytest.raises(PluginError, match=r"building pooler 'broken' \(from mmemb-f\) failed") as e:
        plugins.build("pooler", "broken")
    assert isinstance(e.value.__cause__, ZeroDivisionError)


@pytest.mark.only_plugins()
def test_a_plugin_for_another_api_version_is_refused() -> None:
    with pytest.raises(PluginError, match="written for mmemb plugin API 2, but this mmemb"):
        plugins.register_plugin(FutureApi(), name="future", provider="mmemb-future")


@pytest.mark.only_plugins()
def test_the_kernel_full_loss_is_there_without_entry_points() -> None:
    assert plugins.available("loss") == ["full"]
    assert plugins.get("loss", "full").provider == "mmemb"


def test_tracing_shows_hook_calls() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "from mmemb import plugins; plugins.available('loss')"],
        capture_output=True, text=True, env={**__import__("os").environ,
                                             "MMEMB_TRACE_PLUGINS": "1"}, check=True,
    )
    assert "mmemb_register_losses" in out.stderr and "Registrar(kind='loss'" in out.stderr
