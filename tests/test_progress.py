"""The one progress reporter (mmemb.progress.Progress): plain lines off a terminal, a redrawn
line on one, a known or unknown total, a caller's own line format (prepare's rows)."""

from __future__ import annotations

import io

from mmemb.progress import Progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_every_n_and_at_the_end() -> None:
    out = io.StringIO()
    with Progress(5, desc="train", log_every=2, stream=out) as bar:
        for i in range(5):
            bar.update(1, loss=1.0 / (i + 1))
    lines = out.getvalue().splitlines()
    assert [line.split(" eta")[0] for line in lines] == ["train 2/5", "train 4/5", "train 5/5"]
    assert lines[-1].endswith("loss=0.2")


def test_unknown_total_and_a_custom_line() -> None:
    out = io.StringIO()
    with Progress(None, desc="prepare", log_every=3, stream=out,
                  line=lambda p: f"read {p.done} written {p.fields['written']}") as bar:
        for i in range(7):
            bar.update(1, written=i)
    assert out.getvalue().splitlines() == ["read 3 written 2", "read 6 written 5"]


def test_a_terminal_gets_one_redrawn_bar_and_a_final_newline() -> None:
    out = _Tty()
    with Progress(4, desc="encode", stream=out) as bar:
        bar.update(4)
    text = out.getvalue()
    assert text.startswith("\rencode [" + "#" * 30 + "] 4/4") and text.endswith("\033[K\n")


def test_disabled_prints_nothing_but_counts() -> None:
    out = _Tty()
    with Progress(3, desc="x", stream=out, enabled=False) as bar:
        bar.update(3)
    assert out.getvalue() == "" and bar.done == 3
