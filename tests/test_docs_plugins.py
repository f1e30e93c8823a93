"""docs/plugins.md documents every hook mmemb specifies (as datasette's docs tests do)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from mmemb import hookspecs
from mmemb.plugins import KINDS

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


def test_every_hook_has_a_section_in_the_hook_reference() -> None:
    text = DOC.read_text()
    reference = text[text.index("## Hook reference"):]
    hooks = sorted(name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
                   if name.startswith("mmemb_"))
    assert hooks == sorted(KINDS.values())
    missing = [h for h in hooks if f"### {h}\n" not in reference]
    assert not missing, f"docs/plugins.md has no '### <hook>' section for: {missing}"


def test_every_hookspec_names_the_interface_it_returns() -> None:
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction):
        if name.startswith("mmemb_"):
            doc = inspect.getdoc(fn) or ""
            # a dotted type: an mmemb interface (-> mmemb.model.Backbone), or -> pathlib.Path
            assert re.search(r"-> [a-z_]+\.[\w.]*[A-Z]\w*", doc), (
                f"{name}'s docstring names no interface type"
            )
