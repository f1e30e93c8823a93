"""Caption-like English for tiny tokenizers and text tests: colours, shapes, positions, sizes,
instruction phrases and common words.

Data, not architecture, so it stays in the kernel: the tiny model writers of any plugin train their
tokenizers on it (``mmemb_hf.tiny``), and tests draw sentences from it. `caption_corpus` is
deterministic for a given seed, which keeps a tokenizer trained on it, and so the committed tiny
model in ``recipes/tiny/``, reproducible.
"""

from __future__ import annotations

import itertools
import random

__all__ = [
    "COLOURS",
    "COMMON_WORDS",
    "INSTRUCTION_PHRASES",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "caption_corpus",
]

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white", "grey", "pink",
           "brown", "cyan")
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "ring", "rectangle", "line",
          "dot", "heart", "hexagon")
RELATIONS = ("above", "below", "left of", "right of", "next to", "inside", "near", "behind",
             "in front of", "beside", "under", "over", "on top of", "to the left of",
             "to the right of")
SIZES = ("small", "large", "big", "tiny", "little", "huge")
INSTRUCTION_PHRASES = (
    "Represent the given image.",
    "Represent the given image with the following question:",
    "Represent the given text.",
    "Represent the given sentence.",
    "Find an image that matches the given caption.",
    "Find a caption that describes the given image.",
    "Retrieve an image of the described scene.",
    "Retrieve a caption for the image.",
    "Select the image that answers the question.",
    "Identify the colour of the shape.",
    "Identify the object in the image.",
    "Answer the question about the image.",
    "What is the colour of the circle?",
    "Which shape is above the square?",
    "How many shapes are there in the picture?",
    "Where is the red star?",
    "Is there a blue triangle in this photo?",
    "Given a question, retrieve passages that answer the question.",
    "Given an image, find a similar image.",
    "query: passage: Instruct: Query: Document: Answer: Question: Caption: Image:",
    "You are a helpful assistant.",
)
_COMMON_TEXT = (
    "a an the this that these those there here is are was were be been being has have had do "
    "does did of to in on at by for with from into onto about between through during and or "
    "but not no yes one two three four five six seven eight nine ten many few some all each "
    "every picture photo image photograph drawing scene background object objects shape "
    "shapes colour color colours colors text sentence caption question answer passage "
    "document word words man woman person people dog cat car tree house street table chair "
    "book water sky sun road what which who where when why how can could would should will "
    "may might must left right top bottom middle centre center corner edge side front back up "
    "down it its they them he she his her we us our you your i me my shows showing shown "
    "contains containing with without made drawn painted placed sitting standing lying "
    "looking holding using matching describes describing described given following find "
    "retrieve represent select identify classify compare match similar same different other "
    "another first second third last next new old good bad best simple plain bright dark "
    "light colourful coloured empty full open closed round sharp flat thin thick"
)
COMMON_WORDS: list[str] = _COMMON_TEXT.split()


def caption_corpus(n_captions: int = 600, seed: int = 0) -> list[str]:
    """Caption-like training text for the tiny tokenizer: shapes, colours, positions, instructions,
    questions and common words; deterministic for a given seed (a reproducible tokenizer)."""
    rng = random.Random(seed)
    lines: list[str] = list(INSTRUCTION_PHRASES)
    lines.append(" ".join(COMMON_WORDS))
    lines += [" ".join(COLOURS), " ".join(SHAPES), " ".join(RELATIONS), " ".join(SIZES)]
    for colour, shape in itertools.product(COLOURS, SHAPES):
        lines.append(f"a {colour} {shape}")
    for _ in range(n_captions):
        c1, c2 = rng.sample(COLOURS, 2)
        s1, s2 = rng.choice(SHAPES), rng.choice(SHAPES)
        rel = rng.choice(RELATIONS)
        size = rng.choice(SIZES)
        form = rng.randrange(6)
        if form == 0:
            lines.append(f"a {c1} {s1} {rel} a {c2} {s2}")
        elif form == 1:
            lines.append(f"A {size} {c1} {s1} {rel} the {c2} {s2}.")
        elif form == 2:
            lines.append(f"What colour is the {s1} {rel} the {c2} {s2}?")
        elif form == 3:
            lines.append(f"There is a {c1} {s1} in the {rng.choice(['top', 'bottom', 'middle'])} "
                         f"{rng.choice(['left', 'right', 'centre'])} of the image.")
        elif form == 4:
            lines.append(f"{rng.choice(INSTRUCTION_PHRASES)} {c1} {s1} and {c2} {s2}")
        else:
            words = rng.sample(COMMON_WORDS, 8)
            lines.append(" ".join(words) + ".")
    return lines
