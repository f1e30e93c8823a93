"""The interface of `mmemb prepare` sources, and helpers every source uses.

A source plugin reads one dataset format and yields, for each input row, either a `Sample` or a
`Reject` (why the row cannot become a sample, and where it is). It never drops a row silently:
`prepare` counts rejects by reason, stops at the first one (``--on-error fail``) or writes them to
``rejects.jsonl`` (``skip``), and checks ``read = written + rejected``.

Sources only read; `prepare` does the checks every source needs, the same way for all of them:
image bytes decode (and are downscaled when asked), texts are not empty, ids are unique. So a
source puts each sample's location in ``meta["origin"] = {"file": ..., "line": ...}`` (the
`origin` helper), which `prepare` uses when it rejects the sample later.

A source registers like any plugin::

    @mmemb.hookimpl
    def mmemb_register_sources(registry):
        registry.add("my_format", MySource, config=MyConfig, summary="one line for --help")

`MySource(config)` is built by `mmemb.plugins.build("source", "my_format", **args)`. Class
attributes `example` (a command line shown by ``mmemb prepare --help``), `kind` ('train' or
'eval') and `pool_images` tell `prepare` how to present and store its output.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from mmemb.data.images import ImageError, read_image_file
from mmemb.data.schema import Item, Sample
from mmemb.errors import DataError

REJECT_REASONS: dict[str, str] = {
    "missing_image": "an image file the row names does not exist",
    "corrupt_image": "an image that cannot be read or decoded",
    "missing_field": "a required field is absent, null or of the wrong type",
    "empty_text": "a text that is empty or only whitespace, with no image beside it",
    "duplicate_id": "a sample id that was already written",
    "bad_row": "a line (or JSON array element) that is not a JSON object",
}
"""Why a row can be rejected; `Reject.reason` is one of these keys."""


@dataclass(frozen=True)
class Reject:
    """An input row that cannot become a sample: the reason (a `REJECT_REASONS` key), the file
    and 1-based line (or row) it came from, a human explanation, and the sample id if known."""

    reason: str
    file: str
    line: int | None
    detail: str
    id: str | None = None

    def __post_init__(self) -> None:
        if self.reason not in REJECT_REASONS:
            raise ValueError(
                f"unknown reject reason {self.reason!r}; use one of {', '.join(REJECT_REASONS)}"
            )

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}" if self.line is not None else self.file

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


Record = Sample | Reject


class Source(abc.ABC):
    """Reads a dataset and yields one `Sample` or `Reject` per input row."""

    kind: ClassVar[Literal["train", "eval"]] = "train"
    """'eval' sources keep each query's own candidate list (pos = the correct candidate)."""

    pool_images: ClassVar[bool] = False
    """Store each distinct image once (eval sets whose candidate lists share images)."""

    example: ClassVar[str] = ""
    """A command line for ``mmemb prepare --help``."""

    @abc.abstractmethod
    def __iter__(self) -> Iterator[Record]:
        """One record per input row, in a deterministic order."""


# --------------------------------------------------------------------------------------------
# helpers for sources


def origin(file: str | Path, line: int | None) -> dict[str, Any]:
    """The ``meta["origin"]`` of a sample read from `file` at 1-based `line` (or row)."""
    return {"file": str(file), "line": line}


def expand_inputs(input: str | Path | Sequence[str | Path], suffixes: Sequence[str]) -> list[Path]:
    """Input files: a file, a directory (its files with one of `suffixes`, sorted), a glob, or a
    list of those. Raises `DataError` when nothing matches."""
    items = [input] if isinstance(input, (str, Path)) else list(input)
    out: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in suffixes)
            if not found:
                raise DataError(
                    f"{p}: the directory has no {'/'.join(suffixes)} files. Point --input at a "
                    "file or a directory of them."
                )
            out += found
        elif p.is_file():
            out.append(p)
        elif any(ch in str(item) for ch in "*?["):
            base = Path(str(item)).expanduser()
            anchor = Path(base.anchor) if base.is_absolute() else Path(".")
            pattern = str(base.relative_to(anchor)) if base.is_absolute() else str(base)
            found = sorted(f for f in anchor.glob(pattern) if f.is_file())
            if not found:
                raise DataError(f"{item}: the pattern matches no files.")
            out += found
        else:
            raise DataError(f"{p}: no such file or directory (--input).")
    return out


def read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | Reject]]:
    """(1-based line or row number, row dict or a 'bad_row' `Reject`) for a jsonl, json or parquet
    file.

    A ``.json`` file whose first character (after whitespace) is ``[`` is one JSON array of rows
    (numbered by position in the array); any other ``.json``/``.jsonl`` file is JSON Lines.
    Parquet needs `pyarrow` (``pip install pyarrow``); rows are streamed in record batches.
    """
    if path.suffix == ".parquet":
        yield from _read_parquet(path)
        return
    if path.suffix == ".json" and _starts_with(path, "["):
        array = _load_json_array(path)
        if array is not None:
            for number, row in enumerate(array, start=1):
                yield number, _as_row(row, path, number, "an array element")
            return
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines are not rows (a trailing newline is common)
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield lineno, Reject("bad_row", str(path), lineno, f"not valid JSON: {exc}")
                continue
            yield lineno, _as_row(row, path, lineno, "a row")


def _as_row(value: Any, path: Path, number: int, what: str) -> dict[str, Any] | Reject:
    if isinstance(value, dict):
        return value
    return Reject(
        "bad_row", str(path), number, f"{what} must be a JSON object, got {type(value).__name__}"
    )


def _starts_with(path: Path, char: str) -> bool:
    """Whether the file's first non-whitespace character is `char` (reads a few bytes)."""
    with open(path, encoding="utf-8") as f:
        while chunk := f.read(4096):
            stripped = chunk.lstrip()
            if stripped:
                return stripped[0] == char
    return False


def _load_json_array(path: Path) -> list[Any] | None:
    """The file as one JSON array; None when it is JSON Lines whose first row is an array
    (several values, one a line: read as JSON Lines so each line is counted). A file that starts
    an array but is not valid JSON cannot be split into rows, so it is an error."""
    text = path.read_text(encoding="utf-8")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":
            return None
        raise DataError(
            f"{path}: the file starts with '[' (a JSON array of rows) but is not valid JSON: "
            f"{exc}. Fix the file, or write one JSON object a line (JSON Lines)."
        ) from exc
    return value if isinstance(value, list) else None


def _read_parquet(path: Path) -> Iterator[tuple[int, dict[str, Any] | Reject]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DataError(
            f"{path}: reading parquet needs pyarrow. Install it (pip install pyarrow) or convert "
            "the file to jsonl."
        ) from exc
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid/OSError types
        raise DataError(f"{path}: not a readable parquet file ({exc}).") from exc
    row_no = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            row_no += 1
            yield row_no, row


class ImageLoader:
    """Reads image files named by rows, relative to `root`, turning failures into rejects."""

    def __init__(
        self, root: Path | None, *, default_root: Path | None = None, default_why: str = ""
    ) -> None:
        self.root = root
        self.default_root = default_root
        self.default_why = default_why  # why default_root is the default: told when one is missing

    def path(self, rel: str) -> Path:
        p = Path(rel).expanduser()
        if p.is_absolute():
            return p
        base = self.root if self.root is not None else self.default_root
        return (base / p) if base is not None else p

    def load(
        self, rel: str, *, file: Path, line: int, field: str, id: str | None
    ) -> bytes | Reject:
        """The file's bytes, or a `Reject` ('missing_image' / 'corrupt_image')."""
        path = self.path(rel)
        try:
            return read_image_file(path)
        except FileNotFoundError:
            hint = ""
            if self.root is None:
                where = (
                    f"; the default image root is {self.default_root}"
                    if self.default_root is not None
                    else ""
                )
                why = f", {self.default_why}" if self.default_why and where else ""
                hint = f" (no --image-root was given{where}{why})"
            return Reject(
                "missing_image",
                str(file),
                line,
                f"{field}: image file {path} does not exist{hint}",
                id,
            )
        except ImageError as exc:
            return Reject("corrupt_image", str(file), line, f"{field}: {exc}", id)


def make_item(text: str | None, image: bytes | None, instruction: str | None = None) -> Item | None:
    """An `Item`, or None when it would have neither text nor image. Text is kept as given
    (emptiness is judged by `prepare`, so it can report 'empty_text' with the row's location)."""
    if text is None and image is None:
        return None
    return Item(text=text, image=image, instruction=instruction)
