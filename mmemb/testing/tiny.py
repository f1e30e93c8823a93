"""``python -m mmemb.testing.tiny KIND OUT_DIR [--no-weights] [--seed N]``: write a tiny model.

Writes a tiny random-initialised model directory (nothing is downloaded) of one architecture,
loadable with ``from_pretrained`` like a hub checkpoint; ``--no-weights`` writes a commit-ready
definition (config, tokenizer, image processor) for a backbone built with ``init: random``::

    python -m mmemb.testing.tiny llava_onevision OUT_DIR [--no-weights] [--seed 0]

The kernel knows no architecture: KIND is any registered ``tiny_model`` component
(`mmemb.testing.tiny_model`; ``mmemb_hf`` registers llava_onevision, qwen2_vl, clip, siglip and
text, built by ``mmemb_hf.tiny``), so the choices come from the installed plugins.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from mmemb.errors import MmembError
from mmemb.testing.tiny_model import KIND, make_tiny_model, tiny_model_kinds

PROG = "python -m mmemb.testing.tiny"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mmemb.testing.tiny KIND OUT_DIR [--no-weights] [--seed N]``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Write a tiny random-initialised model directory (nothing is downloaded).",
    )
    try:
        kinds = tiny_model_kinds()
    except MmembError as exc:  # a broken plugin: one clear line, not a traceback
        parser.exit(1, f"{PROG}: error: {exc}\n")
    # argparse names the valid kinds when KIND is not one of them
    parser.add_argument("kind", choices=kinds or None)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--no-weights", action="store_true",
                        help="config, tokenizer and image processor only (use init: random)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not kinds:
        parser.error(
            f"no installed plugin registers a {KIND}, so there is no {args.kind!r} to write. "
            "The default ones come from mmemb's mmemb_hf plugin: reinstall mmemb "
            "(`pip install -e .`), or unset MMEMB_DISABLE_PLUGIN_AUTOLOAD; "
            f"`mmemb plugins list --kind {KIND}` shows what is registered."
        )
    try:
        out = make_tiny_model(args.kind, args.out_dir, weights=not args.no_weights, seed=args.seed)
    except MmembError as exc:
        parser.exit(1, f"{PROG}: error: {exc}\n")
    files = sorted(p.name for p in out.iterdir())
    print(json.dumps({"kind": args.kind, "path": str(out), "files": files}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
