"""Plugin discovery, registries, building with config validation, and the errors users see."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, Field

import mmemb
from mmemb import plugins
from mmemb.errors import ConfigError, PluginError, UnknownComponentError

ROOT = Path(__file__).resolve().parents[1]


class ScaleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    factor: float = Field(1.0, gt=0)


class Scale:
    def __init__(self, config: ScaleConfig) -> None:
        self.factor = config.factor


class PluginA:
    @mmemb.hookimpl
    def mmemb_register_reweighters(self, registry: plugins.Registrar) -> None:
        registry.add("scale", Scale, config=ScaleConfig, summary="multiplies")
        registry.add("plain", lambda: "plain-built")


class PluginB:
    @mmemb.hookimpl
    def mmemb_register_reweighters(self, registry: plugins.Registrar) -> None:
        registry.add("scale", Scale, config=ScaleConfig)


@pytest.mark.only_plugins()
def test_build_validates_and_passes_config() -> None:
    plugins.register_plugin(PluginA(), name="a", provider="dist-a")
    built = plugins.build("reweighter", "scale", factor=2.5)
    assert isinstance(built, Scale) and built.factor == 2.5
    assert plugins.build("reweighter", "plain") == "plain-built"
    assert plugins.available("reweighter") == ["plain", "scale"]
    assert plugins.get("reweighter", "scale").provider == "dist-a"


@pytest.mark.only_plugins()
def test_bad_arguments_are_all_reported() -> None:
    plugins.register_plugin(PluginA(), name="a")
    with pytest.raises(ConfigError) as err:
        plugins.build("reweighter", "scale", factor=-1, fatcor=2)
    msg = str(err.value)
    assert ("fatcor: unknown argument for reweighter 'scale'. Did you mean 'factor'? "
            "Known: factor.") in msg
    assert "factor: Input should be greater than 0 (got -1)" in msg
    with pytest.raises(ConfigError, match="takes no arguments"):
        plugins.build("reweighter", "plain", x=1)


@pytest.mark.only_plugins()
def test_unknown_name_suggests_closest() -> None:
    plugins.register_plugin(PluginA(), name="a")
    with pytest.raises(UnknownComponentError) as err:
        plugins.build("reweighter", "scal")
    assert str(err.value) == (
        "unknown reweighter 'scal'. Did you mean 'scale'? Known reweighters: plain, scale."
    )
    with pytest.raises(UnknownComponentError, match="unknown component kind 'reweighters'"):
        plugins.available("reweighters")


@pytest.mark.only_plugins()
def test_duplicate_names_name_both_distributions() -> None:
    plugins.register_plugin(PluginA(), name="a", provider="dist-a")
    plugins.register_plugin(PluginB(), name="b", provider="dist-b")
    # pluggy calls the last-registered plugin first: dist-b registers the name, dist-a clashes
    with pytest.raises(PluginError, match="registered twice: by dist-b and by dist-a"):
        plugins.registry("reweighter")


@pytest.mark.only_plugins()
def test_invalid_registrations_are_rejected() -> None:
    class BadName:
        @mmemb.hookimpl
        def mmemb_register_poolers(self, registry: plugins.Registrar) -> None:
            registry.add("Bad Name", object)

    class BadConfig:
        @mmemb.hookimpl
        def mmemb_register_losses(self, registry: plugins.Registrar) -> None:
            registry.add("x", object, config=dict)  # type: ignore[arg-type]

    plugins.register_plugin(BadName(), name="bad-name")
    plugins.register_plugin(BadConfig(), name="bad-config")
    with pytest.raises(PluginError, match="names are lower-case"):
        plugins.registry("pooler")
    with pytest.raises(PluginError, match="pydantic BaseModel subclass"):
        plugins.registry("loss")


@pytest.mark.only_plugins()
def test_autoload_disabled_sees_nothing() -> None:
    assert plugins.available("reweighter") == []


def test_default_plugins_come_from_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MMEMB_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    plugins.reset()
    try:
        for kind, name in [
            ("reweighter", "ega"),
            ("pooler", "last_token"),
            ("loss", "tiled"),
            ("backbone", "llava_onevision"),
            ("source", "synthetic"),
            ("eval_task", "mmeb"),
            ("exporter", "hf"),
        ]:
            assert name in plugins.available(kind), (kind, name)
            assert plugins.get(kind, name).provider == "mmemb"
    finally:
        plugins.reset()


def test_third_party_plugin_installs_and_is_listed(tmp_path: Path) -> None:
    """pip-install the example plugin into a temporary site dir and list it through the CLI."""
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(site),
            str(ROOT / "plugins/examples/mmemb-hello"),
        ],
        check=True,
        capture_output=True,
        timeout=240,
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("MMEMB_DISABLE_PLUGIN_AUTOLOAD", None)
    out = subprocess.run(
        [sys.executable, "-m", "mmemb", "plugins", "list", "--kind", "pooler"],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    ).stdout
    line = next(ln for ln in out.splitlines() if "hello_max" in ln)
    assert "[mmemb-hello]" in line and "mask-aware max pooling" in line
    assert "last_token" in out  # the default plugins are still there
    # the plugin's own tests pass with the fixtures of mmemb's pytest plugin (entry point pytest11)
    tests = ROOT / "plugins/examples/mmemb-hello/tests"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "4 passed" in run.stdout  # reweighter and pooler contracts, the maximum, a block
