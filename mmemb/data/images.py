"""Image bytes: sniff the format, check that they decode, and downscale only when asked.

Shards keep images as their original encoded bytes (JPEG or PNG) so that preparing never loses
quality and never spends time re-encoding. Bytes in any other format PIL reads (WebP, GIF, BMP,
TIFF, ...) are converted to PNG once, losslessly, because the sample schema promises jpg/png.
"""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

from PIL import Image

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class ImageError(ValueError):
    """Bytes that are not a readable image (truncated, corrupt, or not an image at all)."""


_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def sniff_ext(data: bytes) -> str | None:
    """'jpg' or 'png' from the magic bytes, or None for anything else."""
    if data.startswith(JPEG_MAGIC):
        return "jpg"
    if data.startswith(PNG_MAGIC):
        return "png"
    return None


def image_ext(data: bytes) -> str:
    """The shard extension for image bytes; raises `ImageError` unless they are JPEG or PNG."""
    ext = sniff_ext(data)
    if ext is None:
        raise ImageError(
            f"image bytes are neither JPEG nor PNG (they start with {data[:8]!r}); "
            "pass them through mmemb.data.images.normalize_image first"
        )
    return ext


def decode(data: bytes) -> Image.Image:
    """Fully decode image bytes (so truncated files fail here, not in a training worker)."""
    try:
        with warnings.catch_warnings():
            # A decompression-bomb *warning* is not an error for us; the hard limit still raises.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            im.load()
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, struct.error, ...
        # PIL names the stream object ("<_io.BytesIO object at 0x…>"): drop it, so a message
        # (and the rejects report holding it) is the same on every run.
        detail = _OBJECT_REPR.sub("the bytes", str(exc))
        raise ImageError(f"cannot decode image ({type(exc).__name__}: {detail})") from exc
    return im


def normalize_image(data: bytes, *, max_side: int | None = None) -> bytes:
    """Checked image bytes ready for a shard.

    JPEG/PNG bytes come back unchanged unless `max_side` is set and the longer side exceeds it
    (then the image is downscaled, keeping its aspect ratio, and re-encoded in its own format:
    JPEG quality 95, PNG lossless). Other formats are converted to PNG. Raises `ImageError` for
    bytes that do not decode.
    """
    if not data:
        raise ImageError("the image file is empty (0 bytes)")
    im = decode(data)
    ext = sniff_ext(data)
    too_big = max_side is not None and max(im.size) > max_side
    if ext is not None and not too_big:
        return data
    if too_big:
        assert max_side is not None
        scale = max_side / max(im.size)
        size = (max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale)))
        im = im.resize(size, Image.Resampling.BICUBIC)
    return encode(im, "jpg" if ext == "jpg" else "png")


def encode(im: Image.Image, ext: str) -> bytes:
    """Encode a PIL image as 'jpg' (quality 95) or 'png'."""
    buf = io.BytesIO()
    if ext == "jpg":
        if im.mode not in ("RGB", "L"):
            im = im.convert("RGB")
        im.save(buf, format="JPEG", quality=95)
    elif ext == "png":
        if im.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"):
            im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
        im.save(buf, format="PNG")
    else:
        raise ValueError(f"unknown image extension {ext!r}; use 'jpg' or 'png'")
    return buf.getvalue()


def read_image_file(path: Path) -> bytes:
    """The bytes of an image file; `FileNotFoundError` if it is missing (sources turn that into a
    'missing_image' reject), `ImageError` if it cannot be read (a directory, no permission)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ImageError(f"cannot read {path}: {exc.strerror or exc}") from exc
