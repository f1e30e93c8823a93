"""Errors a user can cause and fix.

Every `MmembError` is shown by the CLI as one message (what went wrong, where, and the fix) and a
non-zero exit, without a traceback unless `--traceback` is given. Anything else is a bug in mmemb.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MmembError(Exception):
    """A problem the user can fix (bad recipe, missing file, unknown component, corrupt data)."""


class PluginError(MmembError):
    """A plugin registered something invalid, or two plugins registered the same name."""


class UnknownComponentError(MmembError):
    """A recipe or a call named a component that no plugin registered."""

    def __init__(self, kind: str, name: str, known: Iterable[str], *, where: str = "") -> None:
        self.kind = kind
        self.name = name
        self.known = sorted(known)
        close = closest(name, self.known)
        hint = f" Did you mean '{close}'?" if close else ""
        place = f"{where}: " if where else ""
        listing = ", ".join(self.known) if self.known else "(none registered)"
        super().__init__(f"{place}unknown {kind} '{name}'.{hint} Known {kind}s: {listing}.")


class ConfigError(MmembError):
    """Arguments for a component, or a recipe, failed validation. `problems` lists each one."""

    def __init__(self, problems: list[str], *, header: str = "") -> None:
        self.problems = problems
        lines = [header] if header else []
        lines += problems
        super().__init__("\n".join(lines) if len(lines) > 1 else lines[0])


class DataError(MmembError):
    """Input data is missing, unreadable or does not follow the schema."""


def closest(name: str, known: Iterable[str]) -> str | None:
    """The known name most like `name` (ignoring case and '-'/'_'), or None if nothing is close."""

    def norm(s: str) -> str:
        return s.lower().replace("-", "").replace("_", "")

    by_norm = {norm(k): k for k in known}
    if norm(name) in by_norm:
        return by_norm[norm(name)]
    match = difflib.get_close_matches(norm(name), list(by_norm), n=1, cutoff=0.6)
    return by_norm[match[0]] if match else None
