"""Options shared by several verbs."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from mmemb.encoder_io import ModelSource

recipe_argument = click.argument("recipe", type=click.Path(dir_okay=False))
overrides_argument = click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")

F = TypeVar("F", bound=Callable[..., Any])

MODEL_HELP = (
    "The encoder: a directory written by `mmemb train` (OUTPUT_DIR or OUTPUT_DIR/model) or "
    "`mmemb export`; a sentence-transformers directory or hub id; or a Hugging Face model "
    "directory/hub id together with --backbone and --pooler."
)


def model_options(*, required: bool = True, help: str = MODEL_HELP) -> Callable[[F], F]:
    """``--model``, ``--backbone``, ``--pooler`` and ``--model-arg``: what `model_source` reads.

    The command receives them as keyword arguments ``model``, ``backbone``, ``pooler`` and
    ``model_args``."""

    def decorate(f: F) -> F:
        f = click.option(
            "--model-arg", "model_args", multiple=True, metavar="KEY=VALUE",
            help="A model setting (repeatable): a backbone argument (max_length=256, "
                 "dtype=bfloat16, backbone.query_instruction='query: '), pooler.KEY=VALUE, or "
                 "normalize=false.",
        )(f)
        f = click.option(
            "--pooler", default=None, metavar="NAME",
            help="Pooler for a plain Hugging Face --model (mean, cls, last_token, eos, max, ...).",
        )(f)
        f = click.option(
            "--backbone", default=None, metavar="NAME",
            help="Backbone plugin for a plain Hugging Face --model (hf_text, llava_onevision, "
                 "qwen2_vl, clip; `mmemb plugins list` shows all).",
        )(f)
        return click.option("--model", "model", required=required, help=help)(f)

    return decorate


def parse_key_values(pairs: tuple[str, ...] | list[str], *, flag: str) -> dict[str, Any]:
    """``('n=100', 'tasks=[t2i]', 'a.b=1')`` -> ``{'n': 100, 'tasks': ['t2i'], 'a.b': 1}``: the one
    parser behind every ``--arg``/``--model-arg`` flag (values read as YAML, like recipe overrides;
    dotted keys kept as written). Every bad pair is reported at once, naming `flag`."""
    from mmemb.errors import ConfigError
    from mmemb.recipe import parse_override

    out: dict[str, Any] = {}
    problems: list[str] = []
    for text in pairs:
        try:
            keys, value = parse_override(text)
        except ConfigError as exc:
            if "YAML" in exc.problems[0]:
                problems.append(f"{flag} {text!r}: {exc.problems[0].split(': ', 1)[-1]}")
            else:
                problems.append(f"{flag} {text!r}: expected KEY=VALUE, e.g. {flag} max_length=256")
            continue
        out[".".join(keys)] = value
    if problems:
        raise ConfigError(problems)
    return out


def model_source(
    model: str, backbone: str | None, pooler: str | None, model_args: tuple[str, ...]
) -> ModelSource:
    """The `ModelSource` the model options name (``--model-arg`` values parse as YAML)."""
    from mmemb.encoder_io import ModelSource

    args = parse_key_values(model_args, flag="--model-arg")
    return ModelSource(model, backbone=backbone, pooler=pooler, args=args)
