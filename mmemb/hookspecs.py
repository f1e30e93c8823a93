"""The plugin API: registration hooks, one per kind of component.

A plugin is a module (or object) with functions marked `@mmemb.hookimpl`, found through the
entry-point group ``mmemb`` of any installed distribution::

    # pyproject.toml of a plugin package
    [project.entry-points.mmemb]
    hello = "mmemb_hello"

    # mmemb_hello/__init__.py
    import mmemb

    @mmemb.hookimpl
    def mmemb_register_poolers(registry):
        registry.add("hello", HelloPooler, config=HelloConfig, summary="...")

Each hook receives a typed `Registrar` for its kind and is called with keyword arguments. Hooks only
*register* factories: nothing is built until a recipe or `mmemb.plugins.build` asks for it, so
`mmemb plugins list` is cheap and never imports a model.

A plugin may declare the API version it was written for (``MMEMB_PLUGIN_API = 1`` at module
level); a plugin declaring another version is refused at load, naming its distribution.
"""

from __future__ import annotations

import pluggy

from mmemb.registrar import Registrar

MMEMB_PLUGIN_API = 1
"""Bumped when a hook's signature or a component protocol changes incompatibly; checked against
a plugin's own ``MMEMB_PLUGIN_API`` when it declares one."""

hookspec = pluggy.HookspecMarker("mmemb")
hookimpl = pluggy.HookimplMarker("mmemb")


@hookspec
def mmemb_register_backbones(registry: Registrar) -> None:
    """Register backbones: factories ``(config) -> mmemb.model.Backbone``.

    A backbone owns its processor: it turns `Item`s into model inputs (`prepare`, runs in data
    workers) and model inputs into hidden states (`forward`).
    """


@hookspec
def mmemb_register_poolers(registry: Registrar) -> None:
    """Register poolers: factories ``(config) -> mmemb.model.Pooler``.

    A pooler maps hidden states (N, L, H) and the attention mask (N, L) to one vector per item.
    """


@hookspec
def mmemb_register_miners(registry: Registrar) -> None:
    """Register hard-negative miners: factories ``(config) -> mmemb.mine.Miner``.

    A miner chooses each sample's hard negatives from the ranked candidates `mmemb mine` found.
    """


@hookspec
def mmemb_register_reweighters(registry: Registrar) -> None:
    """Register loss reweighters: factories ``(config) -> mmemb.loss.Reweighter``.

    A reweighter changes how each candidate contributes to the contrastive loss through elementwise
    transforms of the logits (forward) and/or the probabilities (backward only); see docs/loss.md.
    """


@hookspec
def mmemb_register_losses(registry: Registrar) -> None:
    """Register loss implementations: factories ``(config) -> mmemb.loss.DirectionalLoss``.

    One direction of the loss (``full``, the kernel's reference, and ``tiled`` are built in); a
    recipe picks one with ``loss.name`` and passes the component's options beside it.
    """


@hookspec
def mmemb_register_sources(registry: Registrar) -> None:
    """Register `mmemb prepare` sources: factories ``(config) -> mmemb.data.sources.Source``.

    A source reads some dataset format and yields `Sample`s (or rejects with a reason).
    """


@hookspec
def mmemb_register_eval_tasks(registry: Registrar) -> None:
    """Register evaluation tasks: factories ``(config) -> mmemb.eval.task.EvalTask``.

    A task scores encoded queries against their candidates (``mmeb``, ``retrieval``).
    """


@hookspec
def mmemb_register_exporters(registry: Registrar) -> None:
    """Register exporters for `mmemb export`: factories ``(config) -> mmemb.export.Exporter``."""


@hookspec
def mmemb_register_tiny_models(registry: Registrar) -> None:
    """Register tiny model writers: factories ``(config) -> pathlib.Path``, ``config`` being a
    ``mmemb.testing.tiny_model.TinyModelConfig`` (register with ``config=TinyModelConfig``).

    A writer puts a tiny random-initialised model directory of one architecture at
    ``config.out_dir`` (weights only when ``config.weights``, seeded by ``config.seed``), written
    locally and loadable with ``from_pretrained``, and returns the directory. Tests, the quickstart
    and ``python -m mmemb.testing.tiny KIND OUT_DIR`` reach them through this registry because the
    kernel knows no architecture; the name is the KIND users type.
    """
