"""Small synthetic images for tests: coloured shapes drawn with PIL, returned as PNG bytes."""

from __future__ import annotations

import io

COLOURS_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220),
    "yellow": (240, 220, 30), "purple": (140, 40, 170), "orange": (250, 140, 20),
    "black": (0, 0, 0), "white": (255, 255, 255),
}


def shape_png(
    colour: str = "red", shape: str = "circle", *, size: tuple[int, int] = (64, 64),
    position: str = "centre", background: str = "white",
) -> bytes:
    """A PNG (bytes) of one `shape` ('circle', 'square', 'triangle') of `colour` at `position`
    ('centre', 'left', 'right', 'top', 'bottom') on a plain background; `size` is (width,
    height)."""
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.new("RGB", (w, h), COLOURS_RGB[background])
    draw = ImageDraw.Draw(img)
    s = max(2, min(w, h) // 3)
    cx, cy = {"centre": (w // 2, h // 2), "left": (w // 4, h // 2), "right": (3 * w // 4, h // 2),
              "top": (w // 2, h // 4), "bottom": (w // 2, 3 * h // 4)}[position]
    box = [cx - s // 2, cy - s // 2, cx + s // 2, cy + s // 2]
    fill = COLOURS_RGB[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(box[0], box[3]), (box[2], box[3]), (cx, box[1])], fill=fill)
    else:
        raise ValueError(f"shape must be circle, square or triangle (got {shape!r})")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
