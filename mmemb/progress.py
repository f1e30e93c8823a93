"""Progress for long work: a bar on a terminal, plain log lines otherwise (job schedulers, CI)."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import click


class Progress:
    """`update(n, **fields)` advances; fields (loss, lr, ...) are shown on the bar or in the line.

    On a terminal it redraws one line in place; elsewhere it prints one line every `log_every`
    steps and at the end, so scheduler logs stay readable.
    """

    def __init__(
        self,
        total: int,
        *,
        desc: str,
        log_every: int = 10,
        stream: TextIO | None = None,
        enabled: bool = True,
    ) -> None:
        self.total = total
        self.desc = desc
        self.log_every = max(1, log_every)
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self.done = 0
        self.start = time.perf_counter()
        self.fields: dict[str, Any] = {}

    def _fmt_fields(self) -> str:
        parts = []
        for key, value in self.fields.items():
            parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
        return " ".join(parts)

    def _eta(self) -> str:
        elapsed = time.perf_counter() - self.start
        if self.done == 0:
            return "?"
        left = elapsed / self.done * (self.total - self.done)
        return f"{int(left // 60)}:{int(left % 60):02d}"

    def update(self, n: int = 1, **fields: Any) -> None:
        self.done += n
        self.fields.update(fields)
        if not self.enabled:
            return
        if self.tty:
            width = 30
            filled = int(width * self.done / max(1, self.total))
            bar = "#" * filled + "-" * (width - filled)
            line = f"\r{self.desc} [{bar}] {self.done}/{self.total} eta {self._eta()} "
            self.stream.write(line + self._fmt_fields() + "\033[K")
            self.stream.flush()
        elif self.done % self.log_every == 0 or self.done == self.total:
            click.echo(
                f"{self.desc} {self.done}/{self.total} eta {self._eta()} {self._fmt_fields()}",
                file=self.stream,
            )

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def format_metrics(metrics: Mapping[str, Any]) -> str:
    return " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
    )
