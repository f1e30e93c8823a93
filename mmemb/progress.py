"""Progress for long work: a bar on a terminal, plain log lines otherwise (job schedulers, CI)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import click


class Progress:
    """`update(n, **fields)` advances; fields (loss, lr, ...) are shown on the bar or in the line.

    On a terminal it redraws one line in place (a bar when the total is known, the count and the
    rate otherwise); elsewhere it prints one line every `log_every` steps and at the end, so
    scheduler logs stay readable. `line`, when given, writes the text of a line (it gets the
    `Progress`: `done`, `total`, `fields`, `rate`) instead of the default
    ``"{desc} {done}/{total} eta {eta} {fields}"``. `end_line=False`: no extra plain line when
    the total is reached (for a caller that prints its own summary then).

    The one progress reporter of mmemb: training steps, eval and mining encoding, prepare's rows.
    """

    def __init__(
        self,
        total: int | None,
        *,
        desc: str,
        log_every: int = 10,
        stream: TextIO | None = None,
        enabled: bool = True,
        line: Callable[[Progress], str] | None = None,
        end_line: bool = True,
    ) -> None:
        self.total = total or 0  # 0: unknown
        self.desc = desc
        self.log_every = max(1, log_every)
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.line = line
        self.end_line = end_line
        self.tty = self.stream.isatty()
        self.done = 0
        self.start = time.perf_counter()
        self.fields: dict[str, Any] = {}
        self._drawn = False
        self._last_draw = 0.0

    @property
    def rate(self) -> float:
        """Steps per second so far."""
        return self.done / max(1e-9, time.perf_counter() - self.start)

    def _eta(self) -> str:
        elapsed = time.perf_counter() - self.start
        if self.done == 0 or not self.total:
            return "?"
        left = elapsed / self.done * (self.total - self.done)
        return f"{int(left // 60)}:{int(left % 60):02d}"

    def text(self) -> str:
        """The current line, without a bar."""
        if self.line is not None:
            return self.line(self)
        count = f"{self.done}/{self.total} eta {self._eta()}" if self.total else (
            f"{self.done} ({self.rate:.0f}/s)")
        return f"{self.desc} {count} {format_metrics(self.fields)}"

    def update(self, n: int = 1, **fields: Any) -> None:
        self.done += n
        self.fields.update(fields)
        if not self.enabled:
            return
        if self.tty:
            if self.total:
                width = 30
                filled = int(width * min(self.done, self.total) / self.total)
                bar = "#" * filled + "-" * (width - filled)
                text = f"{self.desc} [{bar}] {self.done}/{self.total} eta {self._eta()} " + (
                    format_metrics(self.fields))
            else:  # no total: the count and rate, at most 5 times a second
                now = time.perf_counter()
                if now - self._last_draw <= 0.2:
                    return
                self._last_draw = now
                text = self.text()
            self.stream.write("\r" + text + "\033[K")
            self.stream.flush()
            self._drawn = True
        elif self.done % self.log_every == 0 or (self.end_line and self.done == self.total):
            click.echo(self.text(), file=self.stream)

    def close(self) -> None:
        if self.enabled and self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """``key=value`` pairs, floats to 4 significant digits."""
    return " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
    )
