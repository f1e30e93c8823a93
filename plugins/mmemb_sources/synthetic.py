"""`synthetic`: coloured-shape scenes with compositional captions, for the offline quickstart.

The world is deliberately small so that a tiny randomly-initialised model learns it on a CPU in a
minute or two:

- 4 colours with very distinct RGB values, 3 shapes (circle, square, triangle);
- one-object scenes place the object on the left/right/top/bottom ("a red circle on the left");
- two-object scenes relate two objects of different colours ("a red circle above a blue square";
  relations above/below/left of/right of).

Each sample is one scene. Hard negatives are the same scene with exactly one attribute changed
(a colour, a shape, the position or the relation), each negative changing a different attribute
where the scene has enough of them, so the model has to read every part of the caption. Samples
alternate between two tasks:

- ``synthetic_t2i``: query = caption (+ instruction), candidates = images;
- ``synthetic_i2t``: query = image (+ instruction), candidates = captions.

Images are PNG (64 px by default) on a light-grey background whose level, and each object's size
and position, are jittered per image, so no two images are the same. Sample `i` depends only on
(`seed`, `split`, `i`): a smaller `n` gives a prefix of a larger one, and `split='eval'` with the
same seed gives scenes drawn independently of 'train'. ``meta`` records each scene's attributes
(``scene``, ``neg_scenes``, ``neg_changes``) so tests and analyses can check the negatives.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mmemb.data.schema import Item, Sample
from mmemb.data.sources import Record, Source, origin

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 210, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
RELATIONS: tuple[str, ...] = ("above", "below", "left of", "right of")

T2I_INSTRUCTION = "Find an image that matches the given caption."
I2T_INSTRUCTION = "Find a caption that describes the given image."

_POSITION_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
# Object centres as fractions of the image side.
_NEAR, _FAR, _MID = 0.27, 0.73, 0.5
_SINGLE_CENTRE = {
    "left": (_NEAR, _MID),
    "right": (_FAR, _MID),
    "top": (_MID, _NEAR),
    "bottom": (_MID, _FAR),
}
# relation -> (centre of object 0, centre of object 1)
_PAIR_CENTRES = {
    "above": ((_MID, _NEAR), (_MID, _FAR)),
    "below": ((_MID, _FAR), (_MID, _NEAR)),
    "left of": ((_NEAR, _MID), (_FAR, _MID)),
    "right of": ((_FAR, _MID), (_NEAR, _MID)),
}

Scene = dict[str, str]
"""Flat attributes: one object {color0, shape0, position}; two {color0, shape0, color1, shape1,
relation}."""


class SyntheticConfig(BaseModel):
    """Arguments of the `synthetic` source."""

    model_config = ConfigDict(extra="forbid")

    n: int = Field(1000, ge=1, description="number of samples")
    seed: int = Field(0, description="generator seed; the same seed gives the same samples")
    split: Literal["train", "eval"] = Field(
        "train", description="'eval' draws scenes independently of 'train' for the same seed"
    )
    image_size: int = Field(64, ge=32, le=1024, description="image side in pixels")
    negatives: int = Field(
        3, ge=0, le=8, description="hard negatives per sample (a one-object scene has 8 variants)"
    )
    tasks: list[Literal["t2i", "i2t"]] = Field(
        default_factory=lambda: ["t2i", "i2t"],  # type: ignore[arg-type]
        description="tasks to alternate: t2i (caption -> image), i2t (image -> caption)",
    )
    max_objects: Literal[1, 2] = Field(2, description="1: one-object scenes only")
    two_object_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="share of two-object scenes when max_objects is 2"
    )

    @field_validator("tasks")
    @classmethod
    def _some_task(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("give at least one task (t2i, i2t)")
        return v


# --------------------------------------------------------------------------------------------
# scenes


def caption(scene: Scene) -> str:
    """The scene described in words ("a red circle above a blue square")."""
    first = f"a {scene['color0']} {scene['shape0']}"
    if "relation" in scene:
        return f"{first} {scene['relation']} a {scene['color1']} {scene['shape1']}"
    return f"{first} {_POSITION_PHRASE[scene['position']]}"


def random_scene(rng: random.Random, two: bool) -> Scene:
    """One object and a position, or two objects of different colours and a relation."""
    colors = rng.sample(list(COLORS), 2)
    if not two:
        return {
            "color0": colors[0],
            "shape0": rng.choice(SHAPES),
            "position": rng.choice(POSITIONS),
        }
    return {
        "color0": colors[0],
        "shape0": rng.choice(SHAPES),
        "color1": colors[1],
        "shape1": rng.choice(SHAPES),
        "relation": rng.choice(RELATIONS),
    }


def alternatives(scene: Scene) -> dict[str, list[str]]:
    """For each attribute, the values it can change to (objects keep different colours)."""
    alts: dict[str, list[str]] = {}
    for attr, value in scene.items():
        if attr.startswith("color"):
            other = scene.get("color1" if attr == "color0" else "color0")
            alts[attr] = [c for c in COLORS if c != value and c != other]
        elif attr.startswith("shape"):
            alts[attr] = [s for s in SHAPES if s != value]
        elif attr == "position":
            alts[attr] = [p for p in POSITIONS if p != value]
        elif attr == "relation":
            alts[attr] = [r for r in RELATIONS if r != value]
    return alts


def hard_negatives(scene: Scene, k: int, rng: random.Random) -> list[tuple[str, Scene]]:
    """`k` distinct scenes, each differing from `scene` in exactly one attribute; returns
    (changed attribute, scene). Attributes are visited in a random order, one value each, before
    any attribute is changed twice, so the negatives test different parts of the caption."""
    alts = {a: rng.sample(v, len(v)) for a, v in alternatives(scene).items()}
    order = rng.sample(list(alts), len(alts))
    out: list[tuple[str, Scene]] = []
    while len(out) < k and any(alts.values()):
        for attr in order:
            if len(out) == k:
                break
            if alts[attr]:
                out.append((attr, {**scene, attr: alts[attr].pop()}))
    if len(out) < k:
        raise ValueError(f"a scene has only {len(out)} one-attribute variants; asked for {k}")
    return out


def render(scene: Scene, size: int, rng: random.Random) -> bytes:
    """PNG bytes of the scene; background level, object sizes and positions are jittered."""
    level = rng.randint(205, 250)
    im = Image.new("RGB", (size, size), (level, level, level))
    draw = ImageDraw.Draw(im)
    jitter = 0.05 * size
    if "relation" in scene:
        centres = _PAIR_CENTRES[scene["relation"]]
        objects = [
            (scene["color0"], scene["shape0"], centres[0]),
            (scene["color1"], scene["shape1"], centres[1]),
        ]
        lo, hi = 0.26, 0.34
    else:
        objects = [(scene["color0"], scene["shape0"], _SINGLE_CENTRE[scene["position"]])]
        lo, hi = 0.30, 0.40
    for color, shape, (fx, fy) in objects:
        side = rng.uniform(lo, hi) * size
        cx = fx * size + rng.uniform(-jitter, jitter)
        cy = fy * size + rng.uniform(-jitter, jitter)
        box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
        fill = COLORS[color]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:  # triangle, apex up
            draw.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# the source


class SyntheticSource(Source):
    """Generates `n` samples; sample `i` alternates over `tasks`."""

    example: ClassVar[str] = (
        "mmemb prepare --source synthetic --arg n=2000 --arg seed=0 --out data/synth-train\n"
        "mmemb prepare --source synthetic --arg n=200 --arg split=eval --out data/synth-eval"
    )
    kind: ClassVar[Literal["train", "eval"]] = "train"

    def __init__(self, config: SyntheticConfig) -> None:
        self.config = config
        # An eval split is marked as such in the manifest, so it cannot be trained on by mistake.
        self.kind = config.split  # type: ignore[misc]

    def _rng(self, i: int) -> random.Random:
        # A string seed is hashed (sha512) by `random`, so nearby (seed, i) give unrelated streams.
        return random.Random(f"mmemb-synthetic:{self.config.split}:{self.config.seed}:{i}")

    def sample(self, i: int) -> Sample:
        """Sample number `i` (deterministic)."""
        cfg = self.config
        rng = self._rng(i)
        task = cfg.tasks[i % len(cfg.tasks)]
        two = cfg.max_objects == 2 and rng.random() < cfg.two_object_fraction
        scene = random_scene(rng, two)
        negs = hard_negatives(scene, cfg.negatives, rng)
        meta: dict[str, Any] = {
            "task": task,
            "scene": scene,
            "neg_scenes": [s for _, s in negs],
            "neg_changes": [a for a, _ in negs],
            "origin": origin(f"synthetic(seed={cfg.seed}, split={cfg.split})", i + 1),
        }
        size = cfg.image_size
        if task == "t2i":
            query = Item(text=caption(scene), instruction=T2I_INSTRUCTION)
            pos = Item(image=render(scene, size, rng))
            neg_items = [Item(image=render(s, size, rng)) for _, s in negs]
        else:
            query = Item(image=render(scene, size, rng), instruction=I2T_INSTRUCTION)
            pos = Item(text=caption(scene))
            neg_items = [Item(text=caption(s)) for _, s in negs]
        return Sample(
            id=f"synthetic-{cfg.split}-{cfg.seed}-{i:07d}",
            dataset=f"synthetic_{task}",
            query=query,
            pos=pos,
            negs=neg_items,
            meta=meta,
        )

    def __iter__(self) -> Iterator[Record]:
        for i in range(self.config.n):
            yield self.sample(i)
