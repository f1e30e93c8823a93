"""`mmemb plugins list`: every registered component by kind, with the distribution providing it."""

from __future__ import annotations

import click

from mmemb import plugins


@click.group("plugins")
def command() -> None:
    """Inspect plugins.

    \b
    Example:
      mmemb plugins list
      mmemb plugins list --kind reweighter
    """


@command.command("list")
@click.option("--kind", type=click.Choice(list(plugins.KINDS)), help="Only this kind.")
def list_components(kind: str | None) -> None:
    """List registered components by kind: name, providing distribution, summary."""
    kinds = [kind] if kind else list(plugins.KINDS)
    for k in kinds:
        table = plugins.registry(k)
        click.echo(f"{k}es:" if k.endswith("s") else f"{k}s:")
        if not table:
            click.echo("  (none)")
        width = max((len(n) for n in table), default=0)
        for name in sorted(table):
            comp = table[name]
            summary = f"  {comp.summary}" if comp.summary else ""
            click.echo(f"  {name.ljust(width)}  [{comp.provider}]{summary}")
